"""Shared training of the torch baselines: Adam, a fixed epoch budget, early stopping on validation data
(classifiers: validation AUC, ties broken by the loss; regressors: validation MSE).

A model mixin supplies ``_inputs(X) -> float32 array`` and ``_module(X, n_outputs) -> nn.Module``; the
classes here add the sklearn-like ``fit`` / ``predict`` / ``predict_proba``. Validation data is the split's
validation part when given (``X_val``, ``y_val``), else a subject-grouped, stratified share of the
training scans. The deep FC models fit 200-odd training subjects within a few epochs at Adam's usual 1e-3,
so BrainNetCNN and BNT default to BNT's 1e-4, where validation has a usable optimum to stop at.
Everything random (initialisation, batches) follows ``seed``, inside a forked RNG so the
caller's global torch state is left alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from torch import nn

from fmrilm.evaluate.baselines.linear import inner_folds
from fmrilm.evaluate.metrics import auc


class _TorchBase(BaseEstimator):
    """Common training loop; subclasses define the target, the loss and the output transform."""

    def _inputs(self, X) -> np.ndarray:
        raise NotImplementedError

    def _module(self, X: np.ndarray, n_outputs: int) -> nn.Module:
        raise NotImplementedError

    def _validation(self, X, t, groups, classification: bool):
        """Carve a validation share off the training scans (one inner fold), or none if too small."""
        if self.val_fraction <= 0:
            return X, t, None, None
        folds = inner_folds(t, groups, classification, max(2, round(1 / self.val_fraction)), self.seed)
        if not folds:
            return X, t, None, None
        fit, held = folds[0]
        return X[fit], t[fit], X[held], t[held]

    def _val_score(self, output: torch.Tensor, target: np.ndarray, loss: nn.Module) -> tuple[float, float]:
        """Validation score, lower is better (compared as a tuple): the loss."""
        return float(loss(output, torch.from_numpy(target))), 0.0

    def _train(self, X: np.ndarray, t: np.ndarray, X_val, t_val, loss: nn.Module) -> None:
        """Adam for ``epochs`` epochs; keep the weights of the best validation score, stop after ``patience``
        epochs without improvement (the last weights when there is no validation data)."""
        generator = np.random.default_rng(self.seed)
        self.module_ = self._module(X, self._n_outputs(t))
        optimizer = torch.optim.Adam(self.module_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        X_t, t_t = torch.from_numpy(X), torch.from_numpy(t)
        best, best_state, waited = (np.inf, np.inf), None, 0
        for _ in range(self.epochs):
            self.module_.train()
            for batch in np.array_split(generator.permutation(len(X)), max(1, len(X) // self.batch_size)):
                optimizer.zero_grad()
                loss(self.module_(X_t[batch]), t_t[batch]).backward()
                optimizer.step()
            if X_val is None:
                continue
            current = self._val_score(self._forward(X_val), t_val, loss)
            if current < best:
                best, best_state, waited = current, copy.deepcopy(self.module_.state_dict()), 0
            elif (waited := waited + 1) >= self.patience:
                break
        if best_state is not None:
            self.module_.load_state_dict(best_state)

    def _forward(self, X: np.ndarray) -> torch.Tensor:
        self.module_.eval()
        with torch.no_grad():
            return torch.cat([self.module_(torch.from_numpy(X[i:i + 256])) for i in range(0, len(X), 256)])

    def _fit(self, X, target: np.ndarray, groups, X_val, t_val, loss: nn.Module, classification: bool):
        X = self._inputs(X)
        if X_val is None:
            X, target, X_val, t_val = self._validation(X, target, groups, classification)
        else:
            X_val = self._inputs(X_val)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self._train(X, target, X_val, t_val, loss)
        return self


class TorchClassifier(ClassifierMixin, _TorchBase):
    """Cross-entropy training (class-weighted when ``class_weight == "balanced"``); softmax probabilities."""

    def _n_outputs(self, t: np.ndarray) -> int:
        return len(self.classes_)

    def fit(self, X, y: Sequence, *, groups: Sequence | None = None, X_val=None, y_val=None):
        """Fit on inputs ``X`` (S, ...) and labels ``y`` (S,) of any number of classes."""
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        codes = codes.astype(np.int64)
        weight = None
        if getattr(self, "class_weight", None) == "balanced":  # as sklearn: n / (C * count)
            weight = torch.tensor(len(codes) / (len(self.classes_) * np.bincount(codes)), dtype=torch.float32)
        val = None
        if y_val is not None:
            keep = np.isin(np.asarray(y_val), self.classes_)  # a class unseen in training has no output
            X_val, val = np.asarray(X_val)[keep], np.searchsorted(self.classes_, np.asarray(y_val)[keep])
            X_val, val = (X_val, val.astype(np.int64)) if keep.any() else (None, None)
        return self._fit(X, codes, groups, X_val, val, nn.CrossEntropyLoss(weight=weight), True)

    def _val_score(self, output: torch.Tensor, target: np.ndarray, loss: nn.Module) -> tuple[float, float]:
        """(-AUC, loss): AUC first, because the deep FC models become over-confident long before they stop
        ranking better, so the loss alone stops them while they still predict one class; loss breaks ties."""
        value = auc(target, torch.softmax(output, dim=1).numpy()) if output.shape[1] > 1 else np.nan
        return (-value if np.isfinite(value) else 0.0), float(loss(output, torch.from_numpy(target)))

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (S, C), columns in the order of ``classes_``."""
        return torch.softmax(self._forward(self._inputs(X)), dim=1).numpy().astype(np.float64)

    def predict(self, X) -> np.ndarray:
        """Most probable class per scan: (S,)."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class _MSE(nn.Module):
    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.mean((output[:, 0] - target) ** 2)


class TorchRegressor(RegressorMixin, _TorchBase):
    """Mean squared error on the standardized target (so one learning rate suits every target scale)."""

    def _n_outputs(self, t: np.ndarray) -> int:
        return 1

    def fit(self, X, y: Sequence[float], *, groups: Sequence | None = None, X_val=None, y_val=None):
        """Fit on inputs ``X`` (S, ...) and values ``y`` (S,)."""
        y = np.asarray(y, np.float64)
        self.mean_, self.scale_ = float(y.mean()), float(y.std()) or 1.0
        scaled = ((y - self.mean_) / self.scale_).astype(np.float32)
        val = None if y_val is None else ((np.asarray(y_val, np.float64) - self.mean_) / self.scale_).astype(np.float32)
        return self._fit(X, scaled, groups, X_val, val, _MSE(), False)

    def predict(self, X) -> np.ndarray:
        """Predicted value per scan: (S,)."""
        return self._forward(self._inputs(X))[:, 0].numpy().astype(np.float64) * self.scale_ + self.mean_
