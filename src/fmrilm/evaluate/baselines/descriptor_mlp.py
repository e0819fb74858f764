"""An MLP on the z-scored descriptors (``descriptors_z.parquet`` of ``fmrilm describe``).

The descriptors are the numbers the fMRI-LM texts are written from, so this baseline asks how much of a task
the descriptors carry without language. Inputs are already z-scores against the describe reference;
missing values (a network absent from the atlas) are set to 0, the reference mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from torch import nn

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.baselines._torch import TorchClassifier, TorchRegressor

ID_COLUMNS = ("scan_id", "subject_id")


def descriptor_columns(table: pd.DataFrame) -> list[str]:
    """The numeric descriptor columns of a descriptor table (identifiers left out)."""
    return [c for c in table.columns if c not in ID_COLUMNS and pd.api.types.is_numeric_dtype(table[c])]


def descriptor_matrix(table: pd.DataFrame, scan_ids: Sequence[str]) -> np.ndarray:
    """Rows of ``table`` for ``scan_ids`` in that order: (len(scan_ids), D) float32, NaN set to 0."""
    if "scan_id" not in table.columns:
        raise FmrilmError("the descriptor table has no scan_id column; pass the output of fmrilm describe")
    indexed = table.drop_duplicates("scan_id")
    indexed.index = indexed["scan_id"].astype(str)
    wanted = pd.Index([str(s) for s in scan_ids])
    missing = wanted.difference(indexed.index)
    if len(missing):
        raise FmrilmError(f"the descriptors lack {len(missing)} scans of the cohort (e.g. {missing[0]!r}); "
                          "run 'fmrilm describe' on this cohort")
    values = indexed.loc[wanted, descriptor_columns(table)].to_numpy(np.float32)
    return np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)


class MLP(nn.Module):
    """Linear - ReLU - dropout blocks then a linear output: (B, D) -> (B, n_outputs)."""

    def __init__(self, n_inputs: int, n_outputs: int, hidden: Sequence[int] = (64,), dropout: float = 0.3):
        super().__init__()
        layers, width = [], n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        self.net = nn.Sequential(*layers, nn.Linear(width, n_outputs))

    def forward(self, x):
        return self.net(x)


class _DescriptorMLPModel:
    """Hyper-parameters and module of both descriptor-MLP estimators (inputs: (S, D) descriptor z-scores)."""

    def __init__(self, hidden: Sequence[int] = (64,), dropout: float = 0.3, epochs: int = 100,
                 batch_size: int = 16, lr: float = 1e-3, weight_decay: float = 1e-3, patience: int = 15,
                 val_fraction: float = 0.15, class_weight: str | None = "balanced", seed: int = 0):
        self.hidden, self.dropout, self.epochs, self.batch_size, self.lr = hidden, dropout, epochs, batch_size, lr
        self.weight_decay, self.patience, self.val_fraction = weight_decay, patience, val_fraction
        self.class_weight, self.seed = class_weight, seed

    def _inputs(self, X) -> np.ndarray:
        X = np.asarray(X, np.float32)
        if X.ndim != 2:
            raise ValueError(f"expected descriptors of shape (S, D), got {X.shape}")
        return np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)

    def _module(self, X: np.ndarray, n_outputs: int) -> nn.Module:
        return MLP(X.shape[1], n_outputs, tuple(self.hidden), self.dropout)


class DescriptorMLPClassifier(_DescriptorMLPModel, TorchClassifier):
    """MLP classifier on descriptor z-scores (S, D), any number of classes."""


class DescriptorMLPRegressor(_DescriptorMLPModel, TorchRegressor):
    """MLP regressor on descriptor z-scores (S, D)."""
