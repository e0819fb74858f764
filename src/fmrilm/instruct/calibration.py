"""Class-prior calibration of constrained answers, fitted on training scans and stored with the model.

Why. Constrained decoding (:func:`fmrilm.instruct.answer.class_scores`) compares the log-probabilities of whole
answer strings, and the LLM prefers some strings a priori ("male" over "female" whatever the scan). The ranking
of scans can then carry signal (AUC above 0.5) while every scan gets the same answer (accuracy = the majority
share). A per-class bias ``b`` (C,) moves the decision threshold without touching the ranking::

    p_calibrated = softmax(log p - b)        log p: (n, C) log-probabilities over the allowed answers

For two classes this shifts the logit of the second class by ``b[0] - b[1]``: the binary AUC is unchanged.

Methods (:data:`METHODS`)
-------------------------
``bias`` (default)
    ``b`` maximises the likelihood of the labels of the calibration scans under ``softmax(log p - b)``, with a
    weak Gaussian prior on ``b`` (:data:`PRIOR`, a precision in nats^-2) that keeps ``b`` finite when a class is
    missing.
    The problem is convex (a multinomial logistic regression with the log-probabilities as a fixed offset
    and intercepts only); at the optimum the mean calibrated probability of each class equals its share among the
    calibration scans, so class imbalance is respected.
``mean``
    ``b`` = mean of ``log p`` over the calibration scans (label-free "contextual" calibration): afterwards every
    class is predicted about equally often, whatever the class shares.

``b`` is centred (it is defined up to a constant). Which scans calibrate: only the training side of a split,
never a test subject - ``fmrilm instruct`` fits ``b`` per question task on (at most :data:`MAX_SCANS` of) the scans
the model was trained on (a k-shot model: its k shots) and stores it as ``INST/calibration.json``; evaluate and
ask apply it unless told not to.

``calibration.json``::

    format   "fmrilm.calibration/1"
    method   "bias" | "mean"
    prompts  "training"      the paraphrase pool the calibration scans were asked with
    tasks    {question task: {"classes": [answer words], "bias": [C floats], "n_scans": int,
                              "class_counts": [C ints], "cohort": abs path, "scans": [scan indices]}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax

from fmrilm.errors import FmrilmError
from fmrilm.io import write_json_atomic

CALIBRATION_FILE = "calibration.json"
FORMAT = "fmrilm.calibration/1"
METHODS = ("bias", "mean")
PRIOR = 1e-2  # L2 weight on b (in total, not per scan): negligible with every class present, finite b without
MAX_SCANS = 48  # calibration scans per task at the end of instruct (a seeded subset of the training scans)


# ------------------------------------------------------------------------------------------------ the maths
def fit_bias(log_probs: np.ndarray, y: np.ndarray | None = None, method: str = "bias") -> np.ndarray:
    """Per-class bias of calibration scans (module docstring).

    Parameters
    ----------
    log_probs : (n, C) log-probabilities (or raw answer log-likelihoods) of the C allowed answers, n >= 1.
    y : (n,) class codes 0..C-1; needed by ``method="bias"``, ignored by ``"mean"``.
    method : "bias" (maximum likelihood on the labels) or "mean" (label-free).

    Returns
    -------
    (C,) float64 bias, centred; subtract it from the log-probabilities (:func:`apply_bias`).
    """
    scores = log_softmax(_scores(log_probs), axis=1)
    if method == "mean":
        bias = scores.mean(0)
    elif method == "bias":
        bias = _max_likelihood_bias(scores, _codes(y, scores))
    else:
        raise FmrilmError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return bias - bias.mean()


def _max_likelihood_bias(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    n, n_classes = scores.shape
    onehot = np.eye(n_classes)[y]  # (n, C)

    def loss(bias: np.ndarray) -> tuple[float, np.ndarray]:
        logp = log_softmax(scores - bias, axis=1)
        value = (0.5 * PRIOR * bias @ bias - (onehot * logp).sum()) / n  # scaled by 1/n for the optimizer
        return value, ((onehot - np.exp(logp)).sum(0) + PRIOR * bias) / n

    return minimize(loss, np.zeros(n_classes), jac=True, method="L-BFGS-B", options={"gtol": 1e-9}).x


def apply_bias(log_probs: np.ndarray, bias: Sequence[float] | np.ndarray | None) -> np.ndarray:
    """(n, C) calibrated probabilities ``softmax(log_probs - bias)``; ``bias=None``: the raw softmax."""
    scores = _scores(log_probs)
    return softmax(scores if bias is None else scores - np.asarray(bias, np.float64), axis=1)


def _scores(log_probs) -> np.ndarray:
    scores = np.asarray(log_probs, np.float64)
    if scores.ndim != 2 or scores.shape[0] == 0 or not np.isfinite(scores).all():
        raise FmrilmError(f"calibration needs finite (n >= 1, C) answer log-probabilities, got shape {scores.shape}")
    return scores


def _codes(y, scores: np.ndarray) -> np.ndarray:
    if y is None:
        raise FmrilmError("calibration method 'bias' needs the class codes y of the calibration scans; pass y or "
                          "use method='mean'")
    y = np.asarray(y)
    if y.shape != (scores.shape[0],) or not np.isin(y, np.arange(scores.shape[1])).all():
        raise FmrilmError(f"y must hold {scores.shape[0]} class codes in 0..{scores.shape[1] - 1}, got {y.tolist()}")
    return y.astype(np.int64)


# ------------------------------------------------------------------------------------------------ storage
@dataclass
class TaskCalibration:
    """The bias of one question task and what it was fitted on."""

    classes: list[str]  # answer words in class-code order
    bias: list[float]  # (C,) subtracted from the answers' log-probabilities
    n_scans: int  # calibration scans
    class_counts: list[int] = field(default_factory=list)  # labels of the calibration scans per class
    cohort: str | None = None  # cohort of the calibration scans
    scans: list[int] = field(default_factory=list)  # their scan indices in that cohort

    def apply(self, log_probs: np.ndarray) -> np.ndarray:
        """(n, C) calibrated probabilities of (n, C) log-probabilities over :attr:`classes`."""
        if np.shape(log_probs)[-1] != len(self.bias):
            raise FmrilmError(f"calibration of {self.classes} has {len(self.bias)} classes but the scores have "
                              f"{np.shape(log_probs)[-1]}; calibrate the model again")
        return apply_bias(log_probs, self.bias)


@dataclass
class Calibration:
    """Per-task calibrations of one model (``calibration.json``, schema in the module docstring)."""

    method: str = "bias"
    tasks: dict[str, TaskCalibration] = field(default_factory=dict)
    prompts: str = "training"

    def get(self, task: str) -> TaskCalibration | None:
        """The calibration of a question task, or None when it was not calibrated."""
        return self.tasks.get(task)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``directory/calibration.json`` atomically; returns its path."""
        path = Path(directory) / CALIBRATION_FILE
        write_json_atomic(path, {"format": FORMAT, "method": self.method, "prompts": self.prompts,
                                 "tasks": {name: asdict(t) for name, t in self.tasks.items()}})
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Calibration | None":
        """The calibration stored in a model directory, or None when it has none (a model from before)."""
        path = Path(directory) / CALIBRATION_FILE
        if not path.is_file():
            return None
        record = json.loads(path.read_text())
        if record.get("format") != FORMAT:
            raise FmrilmError(f"{path} has format {record.get('format')!r}, not {FORMAT!r}; delete it to evaluate "
                              "without calibration or calibrate the model again")
        tasks = {name: TaskCalibration(**entry) for name, entry in record["tasks"].items()}
        return cls(record["method"], tasks, record.get("prompts", "training"))

    def to_dict(self) -> dict:
        """A JSON-ready summary (method, prompts and per task its bias and scan count)."""
        return {"method": self.method, "prompts": self.prompts,
                "tasks": {n: {"bias": t.bias, "n_scans": t.n_scans, "class_counts": t.class_counts}
                          for n, t in self.tasks.items()}}


def task_calibration(classes: Sequence[str], log_probs: np.ndarray, y: np.ndarray, method: str = "bias", *,
                     cohort: str | None = None, scans: Sequence[int] = ()) -> TaskCalibration:
    """A :class:`TaskCalibration` fitted on (n, C) log-probabilities and (n,) class codes of calibration scans."""
    bias = fit_bias(log_probs, y, method)
    counts = np.bincount(np.asarray(y, np.int64), minlength=len(classes)).tolist() if y is not None else []
    return TaskCalibration(list(classes), [float(b) for b in bias], int(np.shape(log_probs)[0]), counts, cohort,
                           [int(i) for i in scans])


def check_method(method: str) -> str:
    """``method`` when it is one of :data:`METHODS`, else a one-line error."""
    if method not in METHODS:
        raise FmrilmError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def merge(calibrations: Sequence[Calibration]) -> Calibration:
    """One calibration from several (e.g. one per cohort): the first cohort that calibrated a task wins."""
    tasks: dict[str, TaskCalibration] = {}
    for calibration in calibrations:
        for name, entry in calibration.tasks.items():
            tasks.setdefault(name, entry)
    first = calibrations[0] if calibrations else Calibration()
    return Calibration(first.method, tasks, first.prompts)

