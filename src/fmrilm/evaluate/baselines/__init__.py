"""Baselines scored on the same subjects and splits as fMRI-LM.

=================  =========================================================  ==================================
name               model                                                      inputs
=================  =========================================================  ==================================
``fc_logreg``      L2 logistic regression / ridge, C or alpha by inner CV    FC upper triangle (Fisher z)
``fc_svm``         SVC (Platt probabilities) / SVR, linear by default         FC upper triangle (Fisher z)
``brainnetcnn``    BrainNetCNN (Kawahara et al. 2017)                         FC matrix (N, N)
``bnt``            Brain Network Transformer with OCRead (Kan et al. 2022)    FC matrix (N, N)
``descriptor_mlp`` MLP                                                        descriptors_z.parquet columns
``text_clf``       TF-IDF + logistic regression / ridge                       descriptor texts (texts.jsonl)
=================  =========================================================  ==================================

Every estimator has ``fit(X, y, groups=None, X_val=None, y_val=None)``, ``predict(X)`` and, for
classification, ``predict_proba(X)`` (columns = ``classes_``). :func:`run_baseline` trains one on a split's
training scans, gives the torch models the split's validation scans for early stopping (the linear and text
models tune by inner CV on the training scans instead) and scores the test scans with
:mod:`fmrilm.evaluate.metrics`. With ``shots=k`` only the k-shot subset of the training scans is used and no
validation labels at all (the torch models then train their fixed epoch budget). Every model is seeded with
the split's seed. Ordinal tasks are scored as multiclass; classifiers weight classes inversely to their
frequency by default (``class_weight="balanced"``), since balanced accuracy and F1 are reported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.data.cohort import Cohort, load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.baselines.bnt import BNTClassifier, BNTRegressor
from fmrilm.evaluate.baselines.brainnetcnn import BrainNetCNNClassifier, BrainNetCNNRegressor
from fmrilm.evaluate.baselines.descriptor_mlp import DescriptorMLPClassifier, DescriptorMLPRegressor, descriptor_matrix
from fmrilm.evaluate.baselines.linear import FCLogisticRegression, FCRidge, FCSVC, FCSVR, fc_matrix, upper_triangle
from fmrilm.evaluate.baselines.text_classifier import TextClassifier, TextRegressor, load_texts, text_inputs
from fmrilm.evaluate.metrics import classification_metrics, regression_metrics
from fmrilm.evaluate.protocol import Split, TaskSpec, check_split, few_shot_indices, get_task, targets
from fmrilm.evaluate.results import ResultRow, rows_from_seeds

INPUTS = ("fc_matrix", "fc_vector", "descriptors", "text")


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: call it with a task (or ``"classification"``/``"regression"``) to build one."""

    name: str
    inputs: str
    classifier: type
    regressor: type
    description: str

    def __call__(self, task: str | TaskSpec = "classification", **params: object):
        regression = task == "regression" or (isinstance(task, TaskSpec) and task.kind == "regression")
        return (self.regressor if regression else self.classifier)(**params)

    @property
    def needs_descriptors(self) -> bool:
        return self.inputs in ("descriptors", "text")


BASELINES: dict[str, Baseline] = {b.name: b for b in (
    Baseline("fc_logreg", "fc_vector", FCLogisticRegression, FCRidge, "FC + logistic regression / ridge"),
    Baseline("fc_svm", "fc_vector", FCSVC, FCSVR, "FC + SVM (SVC / SVR)"),
    Baseline("brainnetcnn", "fc_matrix", BrainNetCNNClassifier, BrainNetCNNRegressor, "BrainNetCNN on FC"),
    Baseline("bnt", "fc_matrix", BNTClassifier, BNTRegressor, "Brain Network Transformer on FC"),
    Baseline("descriptor_mlp", "descriptors", DescriptorMLPClassifier, DescriptorMLPRegressor,
             "MLP on descriptor z-scores"),
    Baseline("text_clf", "text", TextClassifier, TextRegressor, "TF-IDF text classifier on descriptor texts"),
)}


def get_baseline(name: str) -> Baseline:
    """A registered baseline by name."""
    if name not in BASELINES:
        raise FmrilmError(f"unknown baseline {name!r}; use one of {', '.join(BASELINES)}")
    return BASELINES[name]


class FeatureCache:
    """Inputs of one cohort computed once per scan and reused across baselines and seeds.

    Parameters
    ----------
    cohort : an open Cohort.
    descriptors : a describe output directory (DESC), or a table: descriptors (scan_id + descriptor columns)
        and/or texts (scan_id + ``text``).
    """

    def __init__(self, cohort: Cohort, descriptors: str | Path | pd.DataFrame | None = None):
        self.cohort, self.descriptors = cohort, descriptors
        self._fc: dict[int, np.ndarray] = {}
        self._tables: dict[str, pd.DataFrame] = {}

    def _table(self, kind: str) -> pd.DataFrame:
        if kind not in self._tables:
            if isinstance(self.descriptors, pd.DataFrame):
                self._tables[kind] = self.descriptors
            elif kind == "text":
                self._tables[kind] = load_texts(self.descriptors)
            else:
                from fmrilm.descriptors.pipeline import load_descriptors

                self._tables[kind] = load_descriptors(self.descriptors)
        return self._tables[kind]

    def get(self, kind: str, indices: Sequence[int]) -> np.ndarray:
        """Inputs of the scans ``indices``: FC (n, N, N) or (n, E), descriptors (n, D) or texts (n,) object."""
        if kind in ("fc_matrix", "fc_vector"):
            for i in indices:
                if int(i) not in self._fc:
                    self._fc[int(i)] = fc_matrix(self.cohort.scan(int(i)))
            matrices = np.stack([self._fc[int(i)] for i in indices])
            return matrices if kind == "fc_matrix" else upper_triangle(matrices)
        scan_ids = self.cohort.scans["scan_id"].astype(str).to_numpy()[np.asarray(indices, np.int64)]
        if kind == "descriptors":
            return descriptor_matrix(self._table(kind), scan_ids)
        table = self._table(kind)
        if "text" not in table.columns:
            raise FmrilmError("the descriptor table has no 'text' column; pass the describe output directory")
        return np.asarray(text_inputs(table, scan_ids), dtype=object)


@contextlib.contextmanager
def _opened(cohort: Cohort | str | Path) -> Iterator[Cohort]:
    """The cohort itself, or one opened from a path and closed afterwards."""
    if isinstance(cohort, Cohort):
        yield cohort
        return
    opened = load_cohort(cohort)
    try:
        yield opened
    finally:
        opened.close()


def _parts(split: Split, mask: np.ndarray, y: np.ndarray, task: TaskSpec, shots: int | None):
    """Train / val / test scan indices with an available target (few-shot: k shots and no validation)."""
    train, val, test = (np.array([i for i in part if mask[i]], dtype=np.int64)
                        for part in (split.train, split.val, split.test))
    if shots is not None:
        train, val = few_shot_indices(train, y, shots, split.seed), np.array([], np.int64)
    if len(test) == 0 or len(train) < 2:
        raise FmrilmError(f"split seed {split.seed}: {len(train)} training and {len(test)} test scans with a "
                          f"{task.name} target; need at least 2 and 1")
    if task.is_classification and len(np.unique(y[train])) < 2:
        raise FmrilmError(f"split seed {split.seed}: the training scans hold a single {task.name} class")
    return train, val, test


def predict_baseline(name: str, cohort: Cohort | str | Path, task: str | TaskSpec, split: Split,
                     descriptors: str | Path | pd.DataFrame | None = None, *, shots: int | None = None,
                     params: Mapping | None = None, cache: FeatureCache | None = None) -> dict:
    """Train a baseline on a split and predict its test scans.

    Returns
    -------
    dict with ``test`` (n,) scan indices, ``y_true`` (n,), ``y_pred`` (n,), ``proba`` (n, C) or None, and
    ``task`` (the TaskSpec). Class targets are codes 0..C-1 of ``task.classes``.
    """
    baseline, task = get_baseline(name), get_task(task)
    if baseline.needs_descriptors and descriptors is None and (cache is None or cache.descriptors is None):
        raise FmrilmError(f"baseline {name} needs descriptors: pass descriptors=DESC from 'fmrilm describe'")
    with _opened(cohort) as opened:
        check_split(split, len(opened))
        cache = cache or FeatureCache(opened, descriptors)
        y, mask = targets(opened.scan_phenotypes(), task, train=split.train)
        train, val, test = _parts(split, mask, y, task, shots)
        X = cache.get(baseline.inputs, np.concatenate([train, val, test]))
        subjects = opened.scans["subject_id"].astype(str).to_numpy()
    n_train, n_val = len(train), len(val)
    defaults = {"seed": split.seed}
    if shots is not None and "val_fraction" in baseline(task).get_params():
        defaults["val_fraction"] = 0.0  # k shots are too few to hold some out: train the fixed epoch budget
    model = baseline(task, **{**defaults, **(params or {})})
    model.fit(X[:n_train], y[train], groups=subjects[train], X_val=X[n_train:n_train + n_val] if n_val else None,
              y_val=y[val] if n_val else None)
    X_test, proba = X[n_train + n_val:], None
    if task.is_classification:
        proba = np.zeros((len(test), len(task.classes)))
        proba[:, np.asarray(model.classes_, np.int64)] = model.predict_proba(X_test)  # unseen classes get 0
    return {"test": test, "y_true": y[test], "y_pred": model.predict(X_test), "proba": proba, "task": task}


def run_baseline(name: str, cohort: Cohort | str | Path, task: str | TaskSpec, split: Split,
                 descriptors: str | Path | pd.DataFrame | None = None, *, shots: int | None = None,
                 params: Mapping | None = None, cache: FeatureCache | None = None) -> dict[str, float]:
    """Metrics of a baseline on the split's test scans.

    Parameters
    ----------
    name : a key of :data:`BASELINES`.
    cohort : a Cohort or a prepared cohort directory.
    task : a registry task name or a :class:`TaskSpec`.
    split : the shared :class:`Split` (its seed also seeds the model).
    descriptors : the describe output directory (DESC) - needed by ``descriptor_mlp`` and ``text_clf``.
    shots : train on ``few_shot_indices(split.train, y, shots, split.seed)`` only.
    params : estimator hyper-parameters overriding the defaults.
    cache : reuse inputs across calls (:class:`FeatureCache` of the same cohort).

    Returns
    -------
    ``{"accuracy", "balanced_accuracy", "auc", "f1"}`` or ``{"mae", "pearson_r"}``.
    """
    return prediction_metrics(predict_baseline(name, cohort, task, split, descriptors, shots=shots, params=params,
                                               cache=cache))


def prediction_metrics(prediction: Mapping) -> dict[str, float]:
    """Metrics of a :func:`predict_baseline` output: classification (accuracy, balanced accuracy, AUC, F1)
    or regression (MAE, Pearson r) as its task is."""
    task = prediction["task"]
    if task.is_classification:
        return classification_metrics(prediction["y_true"], prediction["y_pred"], prediction["proba"], task.classes)
    return regression_metrics(prediction["y_true"], prediction["y_pred"])


def baseline_rows(names: Iterable[str], cohort: Cohort | str | Path, task: str | TaskSpec, splits: Sequence[Split],
                  descriptors: str | Path | pd.DataFrame | None = None, *, cohort_name: str | None = None,
                  paradigm: str = "supervised", setting: str = "full", shots: int | None = None,
                  params: Mapping[str, Mapping] | None = None) -> list[ResultRow]:
    """Run baselines over every split and aggregate them into results rows (mean ± SD over seeds).

    ``params`` maps a baseline name to its hyper-parameters; inputs are computed once for all of them.
    """
    task, rows = get_task(task), []
    with _opened(cohort) as opened:
        cache = FeatureCache(opened, descriptors)
        label = cohort_name or opened.path.name
        for name in names:
            per_seed = [run_baseline(name, opened, task, split, descriptors, shots=shots,
                                     params=(params or {}).get(name), cache=cache) for split in splits]
            rows += rows_from_seeds(per_seed, method=name, cohort=label, task=task.name, paradigm=paradigm,
                                    setting=setting, shots=shots)
    return rows


__all__ = ["BASELINES", "Baseline", "FeatureCache", "baseline_rows", "get_baseline", "predict_baseline",
           "prediction_metrics", "run_baseline"]
