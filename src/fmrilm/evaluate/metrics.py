"""Metrics of the paper's tables, each equal to scikit-learn / scipy on the same inputs (tests check it).

Written out in numpy so undefined cases give NaN instead of an exception or a warning (a test set with one
class has no AUC), which :func:`aggregate` then leaves out. Class labels are codes 0..C-1 (the order of
``TaskSpec.classes``); for a binary task code 1 is the positive class.

=================  ==========================================================================================
accuracy           fraction correct (``accuracy_score``)
balanced_accuracy  mean recall over the classes present in ``y_true`` (``balanced_accuracy_score``)
auc                binary: ROC AUC of the positive-class probability; multiclass: one-vs-rest AUC averaged
                   over the classes present in ``y_true`` (``roc_auc_score(multi_class="ovr",
                   average="macro")`` when every class is present)
f1                 binary: F1 of the positive class; multiclass: macro F1 over the labels present in
                   ``y_true`` or ``y_pred`` (``f1_score`` defaults); 0 when undefined, as scikit-learn
mae                mean absolute error (``mean_absolute_error``)
pearson_r          Pearson correlation (``scipy.stats.pearsonr``); NaN when either side is constant
=================  ==========================================================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1")
REGRESSION_METRICS = ("mae", "pearson_r")
LOWER_IS_BETTER = frozenset({"mae", "mse", "rmse"})


def accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Fraction of ``y_pred`` (n,) equal to ``y_true`` (n,)."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def balanced_accuracy(y_true: Sequence, y_pred: Sequence) -> float:
    """Mean over the classes of ``y_true`` (n,) of the recall of ``y_pred`` (n,)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]))


def binary_auc(positive: Sequence[bool], score: Sequence[float]) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count one half); NaN with a single class.

    Parameters
    ----------
    positive : (n,) bool, the positive examples.
    score : (n,) float, higher = more positive.
    """
    positive, score = np.asarray(positive, bool), np.asarray(score, np.float64)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # average ranks: a tie between a positive and a negative counts 1/2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc(y_true: Sequence[int], proba: np.ndarray) -> float:
    """AUC of class probabilities ``proba`` (n, C) for codes ``y_true`` (n,): binary uses column 1,
    multiclass averages one-vs-rest AUCs over the classes present in ``y_true``."""
    y_true, proba = np.asarray(y_true), np.asarray(proba, np.float64)
    if proba.shape[1] == 2:
        return binary_auc(y_true == 1, proba[:, 1])
    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    return float(np.mean([binary_auc(y_true == c, proba[:, c]) for c in present]))


def _f1_of(y_true: np.ndarray, y_pred: np.ndarray, label: object) -> float:
    tp = np.sum((y_true == label) & (y_pred == label))
    wrong = np.sum((y_pred == label) != (y_true == label))  # false positives + false negatives
    return float(2 * tp / (2 * tp + wrong)) if tp + wrong > 0 else 0.0


def f1(y_true: Sequence, y_pred: Sequence, binary: bool = True) -> float:
    """F1 of class 1 (``binary``) or the macro F1 over the labels in ``y_true`` or ``y_pred`` (n,)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if binary:
        return _f1_of(y_true, y_pred, 1)
    return float(np.mean([_f1_of(y_true, y_pred, c) for c in np.union1d(y_true, y_pred)]))


def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Mean absolute error of (n,) predictions."""
    return float(np.mean(np.abs(np.asarray(y_true, np.float64) - np.asarray(y_pred, np.float64))))


def pearson_r(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Pearson correlation of two (n,) arrays; NaN when either is constant or n < 2."""
    a, b = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt(np.sum(a * a) * np.sum(b * b))
    if len(a) < 2 or denominator == 0:
        return float("nan")
    return float(np.clip(np.sum(a * b) / denominator, -1.0, 1.0))


def _codes(values: Sequence, classes: Sequence | None) -> np.ndarray:
    """Class labels -> codes 0..C-1 by their position in ``classes`` (integer codes pass through)."""
    values = np.asarray(values)
    if classes is None or values.dtype.kind in "iub":
        return values.astype(np.int64)
    lookup = {c: i for i, c in enumerate(classes)}
    return np.array([lookup[v] for v in values], dtype=np.int64)


def classification_metrics(y_true: Sequence, y_pred: Sequence, proba: np.ndarray,
                           classes: Sequence | None = None) -> dict[str, float]:
    """Accuracy, balanced accuracy, AUC and F1 of one test set.

    Parameters
    ----------
    y_true, y_pred : (n,) class codes 0..C-1, or labels from ``classes``.
    proba : (n, C) class probabilities, columns in the order of ``classes``.
    classes : the C class labels (C == 2 is binary: the second is positive); default ``range(proba.shape[1])``.
    """
    proba = np.asarray(proba, np.float64)
    n_classes = len(classes) if classes is not None else proba.shape[1]
    if proba.ndim != 2 or proba.shape[1] != n_classes:
        raise ValueError(f"proba has shape {proba.shape}; expected (n, {n_classes})")
    y_true, y_pred = _codes(y_true, classes), _codes(y_pred, classes)
    return {"accuracy": accuracy(y_true, y_pred), "balanced_accuracy": balanced_accuracy(y_true, y_pred),
            "auc": auc(y_true, proba), "f1": f1(y_true, y_pred, binary=n_classes == 2)}


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """MAE and Pearson r of one test set of (n,) values."""
    return {"mae": mae(y_true, y_pred), "pearson_r": pearson_r(y_true, y_pred)}


def aggregate(rows: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and spread of each metric over seeds.

    Parameters
    ----------
    rows : one ``{metric: value}`` dict per seed.

    Returns
    -------
    ``{metric: {"mean", "std", "n_seeds"}}``; ``std`` is the sample standard deviation (ddof = 1) over the
    seeds, 0.0 for a single seed; NaN values (undefined on that seed) are left out and not counted.
    """
    rows = list(rows)
    names = list(dict.fromkeys(name for row in rows for name in row))
    out = {}
    for name in names:
        values = np.array([row[name] for row in rows if name in row], dtype=np.float64)
        values = values[np.isfinite(values)]
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        out[name] = {"mean": float(values.mean()) if len(values) else float("nan"), "std": std,
                     "n_seeds": int(len(values))}
    return out
