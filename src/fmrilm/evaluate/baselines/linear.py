"""FC baselines: Fisher-z functional connectivity, then logistic / ridge regression or an SVM.

Features are the upper triangle (N (N - 1) / 2 edges) of each scan's Fisher-z Pearson FC, standardized on
the training scans. Hyper-parameters (C, alpha) are chosen by an inner cross-validation on the training
scans only, grouped by subject when ``groups`` is given, so nothing of validation or test subjects is seen.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, SVR

from fmrilm.descriptors.common import correlation, fisher_z

C_GRID = (0.001, 0.01, 0.1, 1.0)
ALPHA_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0)


# ---------------------------------------------------------------------------------------------- features
def fc_matrix(x: np.ndarray) -> np.ndarray:
    """Fisher-z FC (N, N) float32 of one scan (T, N); constant ROIs and the diagonal set to 0 (no coupling),
    so every model sees finite inputs of one scale."""
    z = fisher_z(correlation(x))
    np.fill_diagonal(z, 0.0)
    return np.nan_to_num(z, nan=0.0).astype(np.float32)


def fc_matrices(cohort: object, indices: Sequence[int]) -> np.ndarray:
    """Fisher-z FC of the given scans of a cohort, read one scan at a time: (len(indices), N, N) float32."""
    n = cohort.timeseries.shape[2]
    out = np.empty((len(indices), n, n), np.float32)
    for row, i in enumerate(indices):
        out[row] = fc_matrix(cohort.scan(int(i)))
    return out


def upper_triangle(matrices: np.ndarray) -> np.ndarray:
    """Edges above the diagonal of (S, N, N) matrices -> (S, N (N - 1) / 2); 2-D input passes through."""
    matrices = np.asarray(matrices)
    if matrices.ndim == 2:
        return matrices
    rows, cols = np.triu_indices(matrices.shape[1], k=1)
    return matrices[:, rows, cols]


def fc_features(cohort: object, indices: Sequence[int]) -> np.ndarray:
    """Upper-triangle Fisher-z FC of the given scans: (len(indices), N (N - 1) / 2) float32."""
    return upper_triangle(fc_matrices(cohort, indices))


# -------------------------------------------------------------------------------------------- inner CV
def inner_folds(y: np.ndarray, groups: Sequence | None, classification: bool, n_folds: int,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of an inner CV over the training scans, subject-grouped when ``groups`` is
    given and stratified for classification; empty when a class is too small for two folds."""
    groups = np.arange(len(y)) if groups is None else np.asarray(groups).astype(str)
    if classification:
        per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
        k = min(n_folds, min(per_class))
        if k < 2:
            return []
        splitter = StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y, groups))
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    k = min(n_folds, len(unique))
    if k < 2:
        return []
    fold = dict(zip(unique, np.arange(len(unique)) % k))  # groups dealt round-robin to the folds
    of = np.array([fold[g] for g in groups])
    return [(np.flatnonzero(of != f), np.flatnonzero(of == f)) for f in range(k)]


def tune(estimator: BaseEstimator, grid: dict, X: np.ndarray, y: np.ndarray, groups: Sequence | None,
         classification: bool, n_folds: int, seed: int) -> dict:
    """Best parameters of ``grid`` by inner CV (balanced accuracy or negative MSE); the grid's middle values
    when the training set is too small to cross-validate."""
    folds = inner_folds(y, groups, classification, n_folds, seed)
    if not folds or all(len(v) == 1 for v in grid.values()):
        return {k: v[len(v) // 2] for k, v in grid.items()}
    scoring = "balanced_accuracy" if classification else "neg_mean_squared_error"
    search = GridSearchCV(estimator, {k: list(v) for k, v in grid.items()}, scoring=scoring, cv=folds, refit=False)
    return search.fit(X, y).best_params_


# ------------------------------------------------------------------------------------------- estimators
class _FCBase(BaseEstimator):
    """Shared fit for the FC models: flatten, tune on train, refit on all training scans."""

    _classification = True

    def _pipeline(self):
        raise NotImplementedError

    def _grid(self) -> dict:
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray, *, groups: Sequence | None = None, X_val=None, y_val=None):
        """Fit on FC matrices (S, N, N) or edge vectors (S, E) and targets (S,); ``groups`` (S,) are subjects
        for the inner CV. The validation arguments are accepted for a common interface and not used."""
        X, y = np.asarray(upper_triangle(X), np.float64), np.asarray(y)
        self.best_params_ = tune(self._pipeline(), self._grid(), X, y, groups, self._classification,
                                 self.cv, self.seed)
        self.model_ = self._final(clone(self._pipeline()).set_params(**self.best_params_), X, y, groups)
        if self._classification:
            self.classes_ = self.model_.classes_
        return self

    def _final(self, model, X, y, groups):
        return model.fit(X, y)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted class or value per scan: (S,)."""
        return self.model_.predict(np.asarray(upper_triangle(X), np.float64))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities (S, C), columns in the order of ``classes_``."""
        return self.model_.predict_proba(np.asarray(upper_triangle(X), np.float64))


class FCLogisticRegression(ClassifierMixin, _FCBase):
    """L2 logistic regression on standardized FC edges, C chosen by inner CV (any number of classes)."""

    def __init__(self, Cs: Sequence[float] = C_GRID, cv: int = 3, class_weight: str | None = "balanced",
                 max_iter: int = 2000, seed: int = 0):
        self.Cs, self.cv, self.class_weight, self.max_iter, self.seed = Cs, cv, class_weight, max_iter, seed

    def _pipeline(self):
        return make_pipeline(StandardScaler(), LogisticRegression(
            class_weight=self.class_weight, max_iter=self.max_iter, random_state=self.seed))

    def _grid(self) -> dict:
        return {"logisticregression__C": tuple(self.Cs)}


class FCRidge(RegressorMixin, _FCBase):
    """Ridge regression on standardized FC edges, alpha chosen by inner CV."""

    _classification = False

    def __init__(self, alphas: Sequence[float] = ALPHA_GRID, cv: int = 3, seed: int = 0):
        self.alphas, self.cv, self.seed = alphas, cv, seed

    def _pipeline(self):
        return make_pipeline(StandardScaler(), Ridge())

    def _grid(self) -> dict:
        return {"ridge__alpha": tuple(self.alphas)}


class FCSVC(ClassifierMixin, _FCBase):
    """Linear or RBF SVC on standardized FC edges, C by inner CV; probabilities by Platt scaling on
    cross-validated decision values (what ``SVC(probability=True)`` did, via CalibratedClassifierCV)."""

    def __init__(self, kernel: str = "linear", Cs: Sequence[float] = C_GRID, cv: int = 3,
                 class_weight: str | None = "balanced", seed: int = 0):
        self.kernel, self.Cs, self.cv, self.class_weight, self.seed = kernel, Cs, cv, class_weight, seed

    def _pipeline(self):
        return make_pipeline(StandardScaler(), SVC(kernel=self.kernel, class_weight=self.class_weight,
                                                   random_state=self.seed))

    def _grid(self) -> dict:
        return {"svc__C": tuple(self.Cs)}

    def _final(self, model, X, y, groups):
        folds = inner_folds(y, groups, True, max(self.cv, 2), self.seed)
        if not folds:  # too few scans per class to calibrate: fall back to in-sample Platt scaling
            folds = [(np.arange(len(y)), np.arange(len(y)))]
        return CalibratedClassifierCV(model, method="sigmoid", cv=folds, ensemble=False).fit(X, y)


class FCSVR(RegressorMixin, _FCBase):
    """Linear or RBF support vector regression on standardized FC edges, C by inner CV (target standardized
    so one C grid fits every target scale)."""

    _classification = False

    def __init__(self, kernel: str = "linear", Cs: Sequence[float] = C_GRID, cv: int = 3, seed: int = 0):
        self.kernel, self.Cs, self.cv, self.seed = kernel, Cs, cv, seed

    def _pipeline(self):
        from sklearn.compose import TransformedTargetRegressor

        svr = make_pipeline(StandardScaler(), SVR(kernel=self.kernel))
        return TransformedTargetRegressor(svr, transformer=StandardScaler())

    def _grid(self) -> dict:
        return {"regressor__svr__C": tuple(self.Cs)}
