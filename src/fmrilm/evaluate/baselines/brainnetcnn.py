"""BrainNetCNN (Kawahara et al. 2017, NeuroImage 146: 1038-1049) on the N x N Fisher-z FC matrix.

Layers as in the paper: two edge-to-edge (E2E) layers with cross-shaped filters (row + column of the
adjacency matrix), edge-to-node (E2N, a 1 x N filter per row), node-to-graph (N2G, an N x 1 filter), then
fully connected layers; leaky ReLU (slope 0.33) and dropout. The paper's widths are 32-32-64-256-128-30;
the defaults here are small so the baseline trains on a CPU in seconds (pass the paper's widths to match).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fmrilm.evaluate.baselines._torch import TorchClassifier, TorchRegressor

LEAK = 0.33


def fc_input(X: np.ndarray) -> np.ndarray:
    """FC matrices (S, N, N) as finite float32 (NaN, e.g. constant ROIs, set to 0)."""
    X = np.asarray(X, np.float32)
    if X.ndim != 3 or X.shape[1] != X.shape[2]:
        raise ValueError(f"expected FC matrices of shape (S, N, N), got {X.shape}")
    return np.nan_to_num(X, nan=0.0)


def _across(x: torch.Tensor, weight: torch.Tensor, rows: bool) -> torch.Tensor:
    """Filter (C_out, C_in, N) applied across each row (``rows``) or each column of x (B, C_in, N, N):
    (B, C_out, N). A 1 x N (or N x 1) convolution written as one matrix product."""
    b, c, n, _ = x.shape
    lines = (x.transpose(1, 2) if rows else x.permute(0, 3, 1, 2)).reshape(b, n, c * n)  # (B, line, C_in N)
    return (lines @ weight.reshape(weight.shape[0], -1).T).transpose(1, 2)


def _filter(out_channels: int, in_channels: int, n_rois: int) -> nn.Parameter:
    """A (C_out, C_in, N) line filter initialised as torch initialises the equivalent Conv2d."""
    bound = 1 / np.sqrt(in_channels * n_rois)
    return nn.Parameter(torch.empty(out_channels, in_channels, n_rois).uniform_(-bound, bound))


class E2E(nn.Module):
    """Edge-to-edge: output (i, j) = a filter across row i + a filter across column j, per channel pair.

    (B, C_in, N, N) -> (B, C_out, N, N). The 1 x N and N x 1 convolutions of the paper written as einsums
    (identical maths; several times faster on a CPU than convolutions with such long, thin kernels).
    """

    def __init__(self, in_channels: int, out_channels: int, n_rois: int):
        super().__init__()
        self.row, self.col = _filter(out_channels, in_channels, n_rois), _filter(out_channels, in_channels, n_rois)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = _across(x, self.row, True), _across(x, self.col, False)  # (B, C_out, N) each
        return rows[..., :, None] + cols[..., None, :] + self.bias[:, None, None]


class E2N(nn.Module):
    """Edge-to-node: a 1 x N filter across each row, (B, C_in, N, N) -> (B, C_out, N)."""

    def __init__(self, in_channels: int, out_channels: int, n_rois: int):
        super().__init__()
        self.weight, self.bias = _filter(out_channels, in_channels, n_rois), nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _across(x, self.weight, True) + self.bias[:, None]


class N2G(nn.Module):
    """Node-to-graph: an N x 1 filter over the nodes, (B, C_in, N) -> (B, C_out)."""

    def __init__(self, in_channels: int, out_channels: int, n_rois: int):
        super().__init__()
        self.weight, self.bias = _filter(out_channels, in_channels, n_rois), nn.Parameter(torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bci,oci->bo", x, self.weight) + self.bias


class BrainNetCNN(nn.Module):
    """E2E x len(e2e) -> E2N -> N2G -> MLP. Input (B, N, N), output (B, n_outputs)."""

    def __init__(self, n_rois: int, n_outputs: int, e2e: Sequence[int] = (8, 8), e2n: int = 16,
                 n2g: int = 32, hidden: int = 16, dropout: float = 0.5):
        super().__init__()
        widths = [1, *e2e]
        self.e2e = nn.ModuleList(E2E(a, b, n_rois) for a, b in zip(widths[:-1], widths[1:]))
        self.e2n, self.n2g = E2N(widths[-1], e2n, n_rois), N2G(e2n, n2g, n_rois)
        self.act, self.drop = nn.LeakyReLU(LEAK), nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Linear(n2g, hidden), nn.LeakyReLU(LEAK), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.unsqueeze(1)
        for layer in self.e2e:
            h = self.act(layer(h))
        h = self.drop(self.act(self.e2n(h)))  # (B, e2n, N): one value per node
        h = self.drop(self.act(self.n2g(h)))  # (B, n2g): one value per graph
        return self.head(h)


class _BrainNetCNNModel:
    """Hyper-parameters and module of both BrainNetCNN estimators (inputs: FC matrices (S, N, N))."""

    def __init__(self, e2e: Sequence[int] = (8, 8), e2n: int = 16, n2g: int = 32, hidden: int = 16,
                 dropout: float = 0.5, epochs: int = 100, batch_size: int = 16, lr: float = 1e-4,
                 weight_decay: float = 5e-4, patience: int = 15, val_fraction: float = 0.15,
                 class_weight: str | None = "balanced", seed: int = 0):
        self.e2e, self.e2n, self.n2g, self.hidden, self.dropout = e2e, e2n, n2g, hidden, dropout
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.patience, self.val_fraction, self.class_weight, self.seed = patience, val_fraction, class_weight, seed

    def _inputs(self, X) -> np.ndarray:
        return fc_input(X)

    def _module(self, X: np.ndarray, n_outputs: int) -> nn.Module:
        return BrainNetCNN(X.shape[1], n_outputs, tuple(self.e2e), self.e2n, self.n2g, self.hidden, self.dropout)


class BrainNetCNNClassifier(_BrainNetCNNModel, TorchClassifier):
    """BrainNetCNN classifier on FC matrices (S, N, N), any number of classes."""


class BrainNetCNNRegressor(_BrainNetCNNModel, TorchRegressor):
    """BrainNetCNN regressor on FC matrices (S, N, N)."""
