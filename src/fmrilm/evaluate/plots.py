"""Benchmark figures drawn with matplotlib's Agg backend (no display needed).

* ``bars_<cohort>_<task>.png``: one panel per metric, a bar per method (mean over seeds, SD error bars),
  full training data.
* ``fewshot_<cohort>_<task>.png``: the task's headline metric against the number of training shots (0 for
  zero-shot rows), one line per method (SD error bars), each method's full-data value as a dotted line of the
  same colour.
* ``roc_<cohort>_<task>.png`` (binary tasks): each method's ROC curve averaged over seeds (true-positive
  rate interpolated on a common false-positive grid), its mean AUC in the legend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from fmrilm.evaluate.metrics import LOWER_IS_BETTER, binary_auc
from fmrilm.evaluate.results import LABELS, ResultRow

HEADLINE = ("balanced_accuracy", "pearson_r")  # the metric of a few-shot curve: the first the rows have
FPR_GRID = np.linspace(0.0, 1.0, 101)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(n: int) -> list[str]:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def _label(metric: str) -> str:
    return f"{LABELS.get(metric, metric)} {'(lower is better)' if metric in LOWER_IS_BETTER else ''}".strip()


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    _pyplot().close(fig)
    return path


def plot_bars(rows: Sequence[ResultRow], title: str, path: Path) -> Path:
    """Bars of mean ± SD per method, one panel per metric, for the rows of one (cohort, task, setting)."""
    plt = _pyplot()
    metrics, methods = list(dict.fromkeys(r.metric for r in rows)), list(dict.fromkeys(r.method for r in rows))
    cell = {(r.method, r.metric): r for r in rows}
    width = 2.2 + 1.6 * len(metrics) + 0.25 * len(methods)
    fig, axes = plt.subplots(1, len(metrics), figsize=(width, 3.4), layout="constrained", squeeze=False)
    colours = _colours(len(methods))
    for ax, metric in zip(axes[0], metrics):
        found = [cell.get((m, metric)) for m in methods]
        means = [r.mean if r and math.isfinite(r.mean) else np.nan for r in found]
        stds = [r.std if r and math.isfinite(r.std) else 0.0 for r in found]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color=colours)
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=8)
        ax.set_title(_label(metric), fontsize=9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def headline_metric(rows: Iterable[ResultRow]) -> str | None:
    """The metric a few-shot curve shows: balanced accuracy for classification, Pearson r for regression."""
    present = {r.metric for r in rows}
    return next((m for m in HEADLINE if m in present), None)


def plot_few_shot(rows: Sequence[ResultRow], metric: str, title: str, path: Path) -> Path:
    """``metric`` against shots (evenly spaced: 0, 2, 4, 10...), a line per method; full-data rows (shots None)
    as dotted horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
    ticks = sorted({r.shots for r in rows if r.shots is not None})
    methods = list(dict.fromkeys(r.method for r in rows))
    for method, colour in zip(methods, _colours(len(methods))):
        mine = [r for r in rows if r.method == method and r.metric == metric and math.isfinite(r.mean)]
        shots = sorted((r for r in mine if r.shots is not None), key=lambda r: r.shots)
        if shots:
            ax.errorbar([ticks.index(r.shots) for r in shots], [r.mean for r in shots], yerr=[r.std for r in shots],
                        marker="o", capsize=3, color=colour, label=method)
        for r in mine:
            if r.shots is None:
                ax.axhline(r.mean, color=colour, linestyle=":", linewidth=1.2, label=None if shots else method)
    ax.set_xticks(range(len(ticks)), [str(k) for k in ticks])
    ax.set_xlabel("training shots (dotted: all training subjects)")
    ax.set_ylabel(_label(metric))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates (n_thresholds + 1,) of ``score`` (n,) for the positives (n,) bool,
    thresholds at every distinct score from the highest down (ties step diagonally)."""
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    order = np.argsort(-score, kind="stable")
    positive, score = positive[order], score[order]
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]  # last index of each distinct score
    tp, fp = np.cumsum(positive)[last], np.cumsum(~positive)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def mean_roc(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Vertical average of the ROC curves of several seeds: (FPR grid, mean TPR, AUC per seed)."""
    tprs, aucs = [], []
    for y_true, score in pairs:
        positive = np.asarray(y_true) == 1
        if positive.all() or not positive.any():
            continue
        fpr, tpr = roc_curve(positive, score)
        tprs.append(np.interp(FPR_GRID, fpr, tpr))
        aucs.append(binary_auc(positive, score))
    if not tprs:
        return FPR_GRID, np.full_like(FPR_GRID, np.nan), aucs
    mean = np.mean(tprs, axis=0)
    mean[0] = 0.0  # every curve starts at (0, 0)
    return FPR_GRID, mean, aucs


def plot_roc(curves: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], title: str, path: Path) -> Path:
    """Mean ROC curve per method from per-seed (y_true (n,) codes, positive-class score (n,)) pairs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.4, 4.2), layout="constrained")
    for method, pairs in curves.items():
        fpr, tpr, aucs = mean_roc(pairs)
        if aucs:
            spread = np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0
            ax.plot(fpr, tpr, label=f"{method} (AUC {np.mean(aucs):.3f} ± {spread:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def write_plots(rows: Sequence[ResultRow], roc: Mapping[tuple[str, str], Mapping], out: str | Path) -> list[Path]:
    """Every figure of a benchmark into ``out``: bars and few-shot curves per (cohort, task), ROC curves per
    binary (cohort, task) in ``roc`` (``{(cohort, task): {method: [(y_true, score), ...]}}``)."""
    out, written = Path(out), []
    out.mkdir(parents=True, exist_ok=True)
    for cohort, task in dict.fromkeys((r.cohort, r.task) for r in rows):
        mine = [r for r in rows if r.cohort == cohort and r.task == task]
        full = [r for r in mine if r.shots is None]
        name, metric = f"{cohort}_{task}.png", headline_metric(mine)
        if full:
            written.append(plot_bars(full, f"{cohort} · {task} · all training subjects", out / f"bars_{name}"))
        if metric and any(r.shots is not None for r in mine):
            written.append(plot_few_shot(mine, metric, f"{cohort} · {task} · few-shot", out / f"fewshot_{name}"))
        if (cohort, task) in roc:
            written.append(plot_roc(roc[(cohort, task)], f"{cohort} · {task} · ROC (all training subjects)",
                                    out / f"roc_{name}"))
    return written
