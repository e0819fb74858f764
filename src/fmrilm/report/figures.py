"""The report's figures: matplotlib (Agg backend, no display needed) rendered to base64 PNG data URIs.

Every function takes plain arrays or records and returns a ``data:image/png;base64,...`` string that an
``<img src=...>`` shows without any file or network access. Figures are small (about 100 dpi) so a report
with a few dozen of them stays a few MB.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: render off-screen on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DPI = 100
_COLOURS = plt.get_cmap("tab10").colors


def data_uri(fig: plt.Figure) -> str:
    """Render ``fig`` as PNG, close it, and return it as a base64 data URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return png_uri(buffer.getvalue())


def png_uri(png: bytes) -> str:
    """A data URI for PNG bytes (a figure rendered here or a PNG file another stage wrote)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _network_ticks(ax: plt.Axes, network_index: np.ndarray, names: Sequence[str]) -> None:
    """Label blocks of a network-sorted matrix with their network names and draw the block borders."""
    counts = np.bincount(network_index, minlength=len(names))
    edges = np.concatenate([[0], np.cumsum(counts)])
    for edge in edges[1:-1]:
        ax.axhline(edge - 0.5, color="k", lw=0.6)
        ax.axvline(edge - 0.5, color="k", lw=0.6)
    centres = (edges[:-1] + edges[1:]) / 2 - 0.5
    keep = counts > 0
    ax.set_xticks(centres[keep], np.asarray(names)[keep], rotation=90, fontsize=7)
    ax.set_yticks(centres[keep], np.asarray(names)[keep], fontsize=7)


def fc_matrix(fc: np.ndarray, network_index: np.ndarray, names: Sequence[str], title: str) -> str:
    """ROI x ROI connectivity, ROIs sorted by network.

    Parameters
    ----------
    fc : (N, N) Pearson correlations.
    network_index : (N,) int, each ROI's position in ``names``.
    names : network names.
    """
    order = np.argsort(network_index, kind="stable")
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    image = ax.imshow(fc[np.ix_(order, order)], cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    _network_ticks(ax, network_index[order], names)
    fig.colorbar(image, ax=ax, shrink=0.8, label="Pearson r")
    ax.set_title(title, fontsize=9)
    return data_uri(fig)


def network_pairs(z: np.ndarray, names: Sequence[str], title: str) -> str:
    """Network x network matrix of z-scores (NaN cells are left blank), each cell annotated.

    Parameters
    ----------
    z : (K, K) symmetric z-scores of the network-pair connectivity against the reference cohort.
    names : the K network names.
    """
    limit = max(2.0, float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 2.0)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    image = ax.imshow(np.ma.masked_invalid(z), cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), value in np.ndenumerate(z):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(image, ax=ax, shrink=0.8, label="z vs reference")
    ax.set_title(title, fontsize=9)
    return data_uri(fig)


def gradient_scatter(gradients: np.ndarray, network_index: np.ndarray, names: Sequence[str], title: str) -> str:
    """ROIs in the plane of the first two connectivity gradients, coloured by network.

    Parameters
    ----------
    gradients : (N, k) gradient coordinates, k >= 2.
    network_index : (N,) int, each ROI's position in ``names``.
    """
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    for i, name in enumerate(names):
        mask = network_index == i
        ax.scatter(gradients[mask, 0], gradients[mask, 1], s=14, color=_COLOURS[i % 10], label=name)
    ax.set_xlabel("gradient 1")
    ax.set_ylabel("gradient 2")
    ax.legend(fontsize=7, frameon=False, loc="best")
    ax.set_title(title, fontsize=9)
    return data_uri(fig)


def reconstruction(true: np.ndarray, recon: np.ndarray, patch_size: int, title: str) -> str:
    """One ROI's time series and the tokenizer's reconstruction, with the patch borders.

    Parameters
    ----------
    true, recon : (T,) the standardized signal and ``decode(encode(x))`` of it.
    """
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    ax.plot(true, lw=1.2, label="true")
    ax.plot(recon, lw=1.2, label="reconstructed")
    for edge in range(patch_size, len(true), patch_size):
        ax.axvline(edge - 0.5, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("time point (TR 2 s)")
    ax.set_ylabel("signal (robust z)")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=9)
    return data_uri(fig)


def codebook_usage(counts: np.ndarray, title: str) -> str:
    """Code frequencies sorted from the most used code down (unused codes at the right, at zero).

    Parameters
    ----------
    counts : (V,) occurrences of each code.
    """
    ranked = np.sort(np.asarray(counts))[::-1]
    fig, ax = plt.subplots(figsize=(6.0, 2.8))
    ax.bar(np.arange(len(ranked)), ranked / max(ranked.sum(), 1), width=1.0, color=_COLOURS[0])
    ax.set_xlabel("code rank")
    ax.set_ylabel("fraction of tokens")
    ax.set_title(title, fontsize=9)
    return data_uri(fig)


def training_curves(steps: Mapping[str, tuple[list, list]], epochs: Mapping[str, tuple[list, list]], title: str) -> str:
    """Losses per logged step (left) and per-epoch evaluation metrics (right, when there are any).

    Parameters
    ----------
    steps : {name: (steps, values)} of the step-level records.
    epochs : {name: (epochs, values)} of the epoch-level evaluation records (may be empty).
    """
    fig, axes = plt.subplots(1, 2 if epochs else 1, figsize=(9.5 if epochs else 5.5, 3.0), squeeze=False)
    for name, (x, y) in steps.items():
        axes[0, 0].plot(x, y, lw=1.2, marker="." if len(x) < 30 else None, label=name)
    axes[0, 0].set_xlabel("optimizer step")
    axes[0, 0].set_ylabel("loss")
    axes[0, 0].legend(fontsize=7, frameon=False)
    for name, (x, y) in epochs.items():
        axes[0, 1].plot(x, y, marker="o", lw=1.2, label=name)
    if epochs:
        axes[0, 1].set_xlabel("epoch")
        axes[0, 1].legend(fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    return data_uri(fig)


def few_shot(curves: Mapping[str, tuple[list, list, list]], full: Mapping[str, float], metric: str, title: str) -> str:
    """A metric against the number of labelled examples per class, one line per method.

    Parameters
    ----------
    curves : {method: (shots, means, stds)}.
    full : {method: mean with every training subject}, drawn as a dashed level.
    """
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for i, (method, (k, mean, std)) in enumerate(curves.items()):
        colour = _COLOURS[i % 10]
        ax.errorbar(k, mean, yerr=np.nan_to_num(std), marker="o", capsize=3, color=colour, label=method)
        if method in full:
            ax.axhline(full[method], color=colour, ls="--", lw=0.8)
    ax.set_xscale("symlog", base=2, linthresh=1)  # 0-shot (no fine-tuning) stays on the axis
    ax.set_xlabel("labelled examples (shots); dashed: all training subjects")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return data_uri(fig)


def roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], title: str) -> str:
    """ROC curves, one per method, with the chance diagonal.

    Parameters
    ----------
    curves : {method: (false positive rates, true positive rates, AUC)}.
    """
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    ax.plot([0, 1], [0, 1], color="0.7", ls="--", lw=0.8)
    for method, (fpr, tpr, area) in curves.items():
        ax.plot(fpr, tpr, lw=1.4, label=f"{method} (AUC {area:.3f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    ax.set_title(title, fontsize=9)
    return data_uri(fig)
