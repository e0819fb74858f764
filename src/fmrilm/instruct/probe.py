"""Linear probe on LLM hidden states: the regression head of Stage 3 (paper section 3.4, Brain-JEPA's recipe).

The probe is ``BatchNorm1d(affine=False)`` followed by ``Linear(d, 1)``. It is fitted in closed form rather than by
gradient steps: the normalisation statistics are the training scans' mean and (biased) variance, exactly what
BatchNorm applies in eval mode, and the Linear layer is a ridge regression on the normalised states whose
penalty is chosen by exact leave-one-out error over :data:`ALPHAS` (one SVD gives every candidate). A fit is
deterministic, takes milliseconds, and never sees a test scan; the target is centred and scaled on the
training scans and mapped back, so predictions are in the target's units.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fmrilm.errors import FmrilmError

ALPHAS = tuple(10.0 ** k for k in range(-2, 6))  # ridge penalties, relative to unit-variance states


class LinearProbe(nn.Module):
    """``BatchNorm1d(affine=False)`` + ``Linear(d, 1)`` mapping hidden states (n, d) to predictions (n,).

    Parameters
    ----------
    dim : d, the width of the hidden states.
    alphas : ridge penalties tried by leave-one-out; the best is kept in ``alpha_``.
    """

    def __init__(self, dim: int, alphas: Sequence[float] = ALPHAS):
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False)
        self.linear = nn.Linear(dim, 1)
        self.alphas = tuple(float(a) for a in alphas)
        self.alpha_: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        """(n, d) hidden states -> (n,) predictions."""
        return self.linear(self.norm(x.float()))[:, 0]

    @torch.no_grad()
    def fit(self, x: np.ndarray | Tensor, y: np.ndarray | Sequence[float]) -> "LinearProbe":
        """Fit on training states ``x`` (n, d) and targets ``y`` (n,); leaves the probe in eval mode."""
        x = np.asarray(x.detach().cpu() if isinstance(x, Tensor) else x, np.float64)
        y = np.asarray(y, np.float64)
        if x.ndim != 2 or x.shape[1] != self.linear.in_features or len(y) != len(x):
            raise FmrilmError(f"probe fit needs states (n, {self.linear.in_features}) and n targets; got "
                              f"{x.shape} and {y.shape}")
        if len(y) < 3 or not np.all(np.isfinite(y)) or np.ptp(y) == 0:
            raise FmrilmError(f"probe fit needs >= 3 finite, not all equal training targets; got {len(y)}")
        mean, var = x.mean(0), x.var(0)
        z = (x - mean) / np.sqrt(var + self.norm.eps)
        y_mean, y_sd = y.mean(), y.std()
        weights, self.alpha_ = _ridge_loo(z, (y - y_mean) / y_sd, self.alphas)
        self.norm.running_mean.copy_(torch.as_tensor(mean))
        self.norm.running_var.copy_(torch.as_tensor(var))
        self.linear.weight.copy_(torch.as_tensor(weights * y_sd)[None])
        self.linear.bias.fill_(y_mean)  # z is centred on the training scans
        return self.eval()

    @torch.no_grad()
    def predict(self, x: np.ndarray | Tensor) -> np.ndarray:
        """(n, d) states -> (n,) float64 predictions in the target's units."""
        if self.alpha_ is None:
            raise FmrilmError("the probe is not fitted; call fit(train_states, train_targets) first")
        return self.eval()(torch.as_tensor(np.asarray(x, np.float32))).double().numpy()


def _ridge_loo(z: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> tuple[np.ndarray, float]:
    """Ridge weights (d,) on centred ``z`` (n, d), ``y`` (n,) with the penalty of least leave-one-out error.

    With z = U S V^T the hat matrix is U diag(s^2 / (s^2 + a)) U^T (plus 1/n for the intercept), so every
    penalty's leave-one-out residuals (y - y_hat) / (1 - h_ii) come from one SVD.
    """
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    uty = u.T @ y
    best = None
    for alpha in alphas:
        shrink = s**2 / (s**2 + alpha)
        fitted = u @ (shrink * uty)
        leverage = (u**2 * shrink).sum(1) + 1.0 / len(y)
        error = np.mean(((y - fitted) / np.clip(1.0 - leverage, 1e-9, None)) ** 2)
        if best is None or error < best[0]:
            best = (error, alpha)
    alpha = best[1]
    return vt.T @ (s / (s**2 + alpha) * uty), alpha
