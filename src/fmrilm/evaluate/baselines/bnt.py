"""Brain Network Transformer (Kan et al. 2022, NeurIPS) on the N x N Fisher-z FC matrix.

Each ROI is a token whose features are its FC row (so no positional encoding is needed: the row already
says which node it is). Multi-head self-attention layers over the nodes, then OCRead, the orthonormal
clustering readout: K cluster centres with orthonormal initialisation, soft assignment of each node
``P = softmax(encoder(Z) E^T)`` and the cluster embeddings ``P^T Z`` (K, d), reduced per cluster and
classified by an MLP. Differences from the paper, for CPU: the FC row (N) is projected to a small
``d_model`` (which also lets any N work with any head count) and the widths are small; the centres are
frozen after their orthonormal initialisation by default (``learn_centers=True`` trains them).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fmrilm.evaluate.baselines._torch import TorchClassifier, TorchRegressor
from fmrilm.evaluate.baselines.brainnetcnn import fc_input


def orthonormal_centers(k: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """K orthonormal rows of length d (K <= d): (K, d), the Q factor of a Gaussian matrix."""
    if k > d:
        raise ValueError(f"{k} clusters cannot be orthonormal in {d} dimensions; use clusters <= d_model")
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator))
    return q.T.contiguous()


class OCRead(nn.Module):
    """Orthonormal clustering readout: node embeddings (B, N, d) -> cluster embeddings (B, K, d).

    As in BNT's DEC module, the assignment is computed from a learned encoding of all node embeddings
    (a small MLP over the flattened (N d) vector), so the soft clustering depends on the whole graph.
    """

    def __init__(self, n_rois: int, d: int, clusters: int, hidden: int = 32, learn_centers: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(n_rois * d, hidden), nn.LeakyReLU(), nn.Linear(hidden, n_rois * d))
        self.centers = nn.Parameter(orthonormal_centers(clusters, d), requires_grad=learn_centers)

    def assignment(self, z: torch.Tensor) -> torch.Tensor:
        """Soft assignment (B, N, K) of each node to each cluster, rows summing to one."""
        encoded = self.encoder(z.flatten(1)).view_as(z)
        return torch.softmax(encoded @ self.centers.T, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.assignment(z).transpose(1, 2) @ z


class BrainNetworkTransformer(nn.Module):
    """FC rows (B, N, N) -> projection (B, N, d) -> transformer -> OCRead (B, K, d) -> (B, n_outputs)."""

    def __init__(self, n_rois: int, n_outputs: int, d_model: int = 16, heads: int = 2, layers: int = 1,
                 feedforward: int = 32, clusters: int = 4, reduced: int = 4, hidden: int = 32,
                 dropout: float = 0.1, learn_centers: bool = False):
        super().__init__()
        self.embed = nn.Linear(n_rois, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, feedforward, dropout, batch_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.readout = OCRead(n_rois, d_model, clusters, hidden, learn_centers)
        self.reduce = nn.Sequential(nn.Linear(d_model, reduced), nn.LeakyReLU())  # per cluster, as BNT's 8
        self.head = nn.Sequential(nn.Linear(clusters * reduced, hidden), nn.LeakyReLU(), nn.Dropout(dropout),
                                  nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.transformer(self.embed(x))
        return self.head(self.reduce(self.readout(z)).flatten(1))


class _BNTModel:
    """Hyper-parameters and module of both BNT estimators (inputs: FC matrices (S, N, N))."""

    def __init__(self, d_model: int = 16, heads: int = 2, layers: int = 1, feedforward: int = 32,
                 clusters: int = 4, reduced: int = 4, hidden: int = 32, dropout: float = 0.1,
                 learn_centers: bool = False, epochs: int = 100, batch_size: int = 16, lr: float = 1e-4,
                 weight_decay: float = 1e-4, patience: int = 15, val_fraction: float = 0.15,
                 class_weight: str | None = "balanced", seed: int = 0):
        self.d_model, self.heads, self.layers, self.feedforward = d_model, heads, layers, feedforward
        self.clusters, self.reduced, self.hidden, self.dropout = clusters, reduced, hidden, dropout
        self.learn_centers, self.epochs, self.batch_size, self.lr = learn_centers, epochs, batch_size, lr
        self.weight_decay, self.patience, self.val_fraction = weight_decay, patience, val_fraction
        self.class_weight, self.seed = class_weight, seed

    def _inputs(self, X) -> np.ndarray:
        return fc_input(X)

    def _module(self, X: np.ndarray, n_outputs: int) -> nn.Module:
        return BrainNetworkTransformer(X.shape[1], n_outputs, self.d_model, self.heads, self.layers,
                                       self.feedforward, self.clusters, self.reduced, self.hidden, self.dropout,
                                       self.learn_centers)


class BNTClassifier(_BNTModel, TorchClassifier):
    """Brain Network Transformer classifier on FC matrices (S, N, N), any number of classes."""


class BNTRegressor(_BNTModel, TorchRegressor):
    """Brain Network Transformer regressor on FC matrices (S, N, N)."""
