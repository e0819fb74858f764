"""The evaluation protocol: task targets, subject-level splits and few-shot sets shared by every method.

Every method - fMRI-LM and each baseline - is scored on the same scans: splits are made once per seed,
saved as JSON (:func:`save_splits`) and read back by each method (:func:`load_splits`). Indices in a
:class:`Split` are scan rows of the cohort (``cohort.timeseries[i]``, ``cohort.scans.iloc[i]``).

Targets
-------
``targets(cohort, task)`` turns a phenotype column into ``y`` (class codes 0..C-1 in the order of
``task.classes``, or floats for regression) and a mask of scans whose target is available. Tasks whose
classes are cuts of a continuous score (``fluid_intelligence_level`` and friends: lower / mean / higher at
z = -1.5 / +1.5, and ``age_group`` at training tertiles) place their cuts with **training-split statistics
only** (mean and SD, or quantiles, over the training subjects, one value per subject), so nothing about the
validation or test subjects leaks into the labels; they therefore need ``train=split.train``, and
:func:`make_splits` stratifies them on the continuous score.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.errors import FmrilmError

KINDS = ("binary", "multiclass", "ordinal", "regression")
LEVELS = ("lower", "mean", "higher")
Z_CUTS = (-1.5, 1.5)
_CONTROL = {"control": "control", "controls": "control", "td": "control", "tdc": "control", "hc": "control",
            "typically developing": "control", "typical": "control", "healthy": "control"}


@dataclass(frozen=True)
class TaskSpec:
    """A prediction target read from one phenotype column.

    Parameters
    ----------
    name
        Task name used in results tables.
    column
        Phenotype column the target comes from.
    kind
        ``binary``, ``multiclass``, ``ordinal`` or ``regression``.
    classes
        Class labels in code order (``y == i`` means ``classes[i]``); for ``binary`` the second is the
        positive class (AUC and F1). Empty for regression.
    aliases
        ``(raw value, class)`` pairs matched case-insensitively besides the class names themselves
        (``("TDC", "control")``); values matching nothing are unavailable (e.g. MCI for AD vs CN).
    cuts
        Cut points that turn a continuous column into ``classes`` (``len(classes) - 1`` of them), in units
        of ``cut_scale`` fitted on the training subjects: ``"z"`` (z-scores) or ``"quantile"`` (0-1).
        Class ``i`` holds values in ``[cut[i-1], cut[i])``.
    """

    name: str
    column: str
    kind: str
    classes: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    cuts: tuple[float, ...] = ()
    cut_scale: str = "z"
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FmrilmError(f"task {self.name}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "binary" and len(self.classes) != 2:
            raise FmrilmError(f"task {self.name}: a binary task needs 2 classes, got {list(self.classes)}")
        if self.kind in ("multiclass", "ordinal") and len(self.classes) < 2:
            raise FmrilmError(f"task {self.name}: a {self.kind} task needs at least 2 classes")
        if self.cuts and len(self.cuts) != len(self.classes) - 1:
            raise FmrilmError(f"task {self.name}: {len(self.cuts)} cuts for {len(self.classes)} classes")
        if self.cut_scale not in ("z", "quantile"):
            raise FmrilmError(f"task {self.name}: cut_scale must be 'z' or 'quantile', got {self.cut_scale!r}")

    @property
    def is_classification(self) -> bool:
        return self.kind != "regression"

    @property
    def needs_train(self) -> bool:
        """True when the labels depend on training-split statistics (cut tasks)."""
        return bool(self.cuts)


def _level(column: str, what: str) -> TaskSpec:
    return TaskSpec(f"{column}_level", column, "ordinal", LEVELS, cuts=Z_CUTS, cut_scale="z",
                    description=f"{what}: lower / mean / higher at z = -1.5 / +1.5 of the training subjects")


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("sex", "sex", "binary", ("M", "F"), description="sex, F positive"),
    TaskSpec("age", "age", "regression", description="age in years"),
    TaskSpec("age_group", "age", "ordinal", ("younger", "middle", "older"), cuts=(1 / 3, 2 / 3),
             cut_scale="quantile", description="age tertiles of the training subjects"),
    TaskSpec("fluid_intelligence", "fluid_intelligence", "regression", description="UKB fluid intelligence score"),
    _level("fluid_intelligence", "UKB fluid intelligence"),
    TaskSpec("fluid_composite", "fluid_composite", "regression", description="NIH toolbox fluid composite"),
    _level("fluid_composite", "NIH toolbox fluid composite"),
    TaskSpec("flanker", "flanker", "regression", description="NIH toolbox flanker"),
    _level("flanker", "NIH toolbox flanker"),
    TaskSpec("ad_vs_cn", "diagnosis", "binary", ("CN", "AD"), aliases=(("nc", "CN"), ("hc", "CN"), ("control", "CN"),
             ("dementia", "AD")), description="Alzheimer's disease vs cognitively normal (others left out)"),
    TaskSpec("adhd_vs_control", "diagnosis", "binary", ("control", "ADHD"),
             aliases=(*_CONTROL.items(), ("adhd-c", "ADHD"), ("adhd-i", "ADHD"), ("adhd-h", "ADHD")),
             description="ADHD vs typically developing control"),
    TaskSpec("asd_vs_control", "diagnosis", "binary", ("control", "ASD"),
             aliases=(*_CONTROL.items(), ("autism", "ASD"), ("asperger", "ASD")),
             description="autism spectrum disorder vs typically developing control"),
)}


def get_task(task: str | TaskSpec) -> TaskSpec:
    """A registry task by name (a :class:`TaskSpec` passes through)."""
    if isinstance(task, TaskSpec):
        return task
    if task not in TASKS:
        raise FmrilmError(f"unknown task {task!r}; use one of {', '.join(TASKS)} or build a TaskSpec")
    return TASKS[task]


def _table(data: object) -> pd.DataFrame:
    """One row per scan: a Cohort's scan phenotypes (a cohort directory is opened), or a table as is."""
    if isinstance(data, pd.DataFrame):
        return data.reset_index(drop=True)
    if isinstance(data, (str, Path)):
        from fmrilm.data.cohort import load_cohort

        with load_cohort(data) as cohort:
            return cohort.scan_phenotypes()
    if hasattr(data, "scan_phenotypes"):
        return data.scan_phenotypes()
    raise FmrilmError(f"expected a Cohort, a cohort directory or a per-scan DataFrame, got {type(data).__name__}")


def _column(table: pd.DataFrame, task: TaskSpec) -> pd.Series:
    if task.column not in table.columns:
        raise FmrilmError(f"task {task.name} needs phenotype column {task.column!r}; the table has "
                          f"{', '.join(map(str, table.columns))}")
    return table[task.column]


def _numeric(values: pd.Series) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def continuous_values(data: object, task: str | TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """The continuous score behind a regression or cut task: values (S,) float and mask (S,) bool."""
    task = get_task(task)
    values = _numeric(_column(_table(data), task))
    return values, np.isfinite(values)


def ordinal_cuts(values: np.ndarray, train: Sequence[int], task: TaskSpec,
                 subject_ids: Sequence[str] | None = None) -> np.ndarray:
    """Cut points of a cut task in the units of ``values``, from the training scans only.

    Parameters
    ----------
    values : (S,) float, the continuous score of every scan (NaN = missing).
    train : training scan indices; only these values are used.
    subject_ids : (S,) optional; each training subject counts once (its first scan).

    Returns
    -------
    (len(task.cuts),) float: ``mean + cut * sd`` (SD with ddof=1) or the training quantiles.
    """
    train = np.asarray(train, dtype=np.int64)
    if subject_ids is not None:
        _, first = np.unique(np.asarray(subject_ids, dtype=str)[train], return_index=True)
        train = train[first]
    fit = values[train][np.isfinite(values[train])]
    if len(fit) < 2:
        raise FmrilmError(f"task {task.name}: {len(fit)} training subjects with {task.column}; need at least 2")
    if task.cut_scale == "quantile":
        return np.quantile(fit, task.cuts)
    return fit.mean() + np.asarray(task.cuts) * fit.std(ddof=1)


def _class_codes(values: pd.Series, task: TaskSpec) -> np.ndarray:
    lookup = {c.lower(): i for i, c in enumerate(task.classes)}
    lookup.update({raw.lower(): task.classes.index(c) for raw, c in task.aliases})
    text = values.astype("string").str.strip().str.lower()
    return text.map(lookup).fillna(-1).to_numpy(dtype=np.int64)


def targets(data: object, task: str | TaskSpec, train: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The target of every scan.

    Parameters
    ----------
    data : a Cohort (or its directory), or a DataFrame with one row per scan (``cohort.scan_phenotypes()``).
    task : a registry name or a :class:`TaskSpec`.
    train : training scan indices; required by cut tasks, whose cuts use training statistics only.

    Returns
    -------
    y : (S,) int64 class codes (-1 where unavailable) or float64 values (NaN where unavailable).
    mask : (S,) bool, True where the target is available.
    """
    task, table = get_task(task), _table(data)
    if task.kind == "regression":
        return continuous_values(table, task)
    if not task.cuts:
        y = _class_codes(_column(table, task), task)
        return y, y >= 0
    if train is None:
        raise FmrilmError(f"task {task.name} cuts {task.column} at training-split statistics; pass train=split.train")
    values, mask = continuous_values(table, task)
    ids = table["subject_id"].astype(str).to_numpy() if "subject_id" in table.columns else None
    cuts = ordinal_cuts(values, train, task, ids)
    y = np.where(mask, np.searchsorted(cuts, values, side="right"), -1).astype(np.int64)
    return y, mask


# ------------------------------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """One train / validation / test partition of a cohort's scans (subject-level), for one seed.

    Attributes
    ----------
    seed : int
    train, val, test : tuple of int, sorted scan indices; no subject appears in two of them.
    task : name of the task it was stratified for (informational).
    n_scans : number of scans of the cohort it indexes, checked when used.
    """

    seed: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]
    task: str | None = None
    n_scans: int | None = None

    def to_dict(self) -> dict:
        return asdict(self) | {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, record: dict) -> "Split":
        parts = {k: tuple(int(i) for i in record[k]) for k in ("train", "val", "test")}
        return cls(seed=int(record["seed"]), task=record.get("task"), n_scans=record.get("n_scans"), **parts)


def _strata(values: np.ndarray, n_bins: int) -> np.ndarray:
    """Class labels as they are; a continuous target (float with many values) as quantile bins."""
    if values.dtype.kind != "f" or len(np.unique(values)) <= n_bins:
        return np.unique(values.astype(str), return_inverse=True)[1]
    bins = max(1, min(n_bins, len(values) // 5))  # >= 5 subjects per bin keeps each bin splittable
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, values, side="right")


def _systematic(n: int, fraction: float, offset: float) -> np.ndarray:
    """Boolean (n,): every 1/fraction-th position from a random offset, so round(n * fraction) +- 1 chosen
    and, over positions ordered by stratum, each stratum gets its share within one."""
    position = np.arange(n + 1) * fraction + offset
    return np.diff(np.floor(position)) > 0


def _seeds(seeds: int | Iterable[int]) -> list[int]:
    return list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]


def subject_splits(subject_ids: Sequence[str], y: Sequence, seeds: int | Iterable[int], test_fraction: float = 0.2,
                   val_fraction: float = 0.1, *, mask: Sequence[bool] | None = None, n_bins: int = 5,
                   task: str | None = None) -> list[Split]:
    """Subject-level stratified splits, one per seed, deterministic given the seed.

    Parameters
    ----------
    subject_ids : (S,) subject of each scan; all scans of a subject land in the same part.
    y : (S,) target per scan: class labels (stratified by class) or floats (stratified by quantile bins).
        A subject's stratum is the target of its first scan.
    seeds : seeds, or an int n for seeds 0..n-1.
    test_fraction, val_fraction : shares of subjects in test and validation.
    mask : (S,) scans to use (e.g. target available); the others are in no part.

    Returns
    -------
    list of :class:`Split`, one per seed, with scan indices into the S scans.
    """
    ids, y = np.asarray(subject_ids).astype(str), np.asarray(y)
    mask = np.ones(len(ids), bool) if mask is None else np.asarray(mask, bool)
    if y.dtype.kind == "f":
        mask = mask & np.isfinite(y)
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise FmrilmError(f"test_fraction {test_fraction} and val_fraction {val_fraction} must be in (0, 1) "
                          "with a sum below 1")
    used = np.flatnonzero(mask)
    subjects, first, inverse = np.unique(ids[used], return_index=True, return_inverse=True)
    if len(subjects) < 3:
        raise FmrilmError(f"{len(subjects)} subjects with a target; a train/test split needs at least 3")
    strata = _strata(y[used][first], n_bins)
    splits = []
    for seed in _seeds(seeds):
        rng = np.random.default_rng(seed)
        order = np.lexsort((rng.random(len(subjects)), strata))  # by stratum, random within
        part = np.zeros(len(subjects), np.int8)  # 0 train, 1 val, 2 test
        test = _systematic(len(order), test_fraction, rng.random())
        part[order[test]] = 2
        rest = order[~test]
        part[rest[_systematic(len(rest), val_fraction / (1 - test_fraction), rng.random())]] = 1
        scans = [tuple(int(i) for i in used[part[inverse] == p]) for p in (0, 1, 2)]
        splits.append(Split(int(seed), *scans, task=task, n_scans=len(ids)))
    return splits


def make_splits(data: object, task: str | TaskSpec, seeds: int | Iterable[int], test_fraction: float = 0.2,
                val_fraction: float = 0.1) -> list[Split]:
    """Subject-level splits of a cohort's scans with the task's target, stratified on it (cut tasks on their
    continuous score, since their cuts are only known once the training part is)."""
    task, table = get_task(task), _table(data)
    if task.kind == "regression" or task.cuts:
        y, mask = continuous_values(table, task)
    else:
        y, mask = targets(table, task)
    if "subject_id" not in table.columns:
        raise FmrilmError("the scan table has no subject_id column; splits are made per subject")
    return subject_splits(table["subject_id"], y, seeds, test_fraction, val_fraction, mask=mask, task=task.name)


def few_shot_indices(train_idx: Sequence[int], y: Sequence, k: int, seed: int) -> np.ndarray:
    """``k`` training scans balanced over the classes, nested in ``k`` for a fixed seed.

    Parameters
    ----------
    train_idx : training scan indices (e.g. ``split.train``).
    y : (S,) targets of every scan, indexed by scan index; classification labels get ``k // C`` each, the
        ``k % C`` remaining shots go to classes in a seeded order; float targets are sampled at random.
    k : total number of shots (not per class).
    seed : the same seed gives nested sets: the k-shot set is contained in the k'-shot set for k < k'.

    Returns
    -------
    (k,) int64 sorted scan indices.
    """
    train_idx, y = np.asarray(train_idx, dtype=np.int64), np.asarray(y)
    rng = np.random.default_rng(seed)
    if y.dtype.kind == "f":
        if k > len(train_idx):
            raise FmrilmError(f"{k} shots requested but only {len(train_idx)} training scans")
        return np.sort(rng.permutation(train_idx)[:k])
    classes = np.unique(y[train_idx])
    if k < len(classes):
        raise FmrilmError(f"{k} shots cannot cover {len(classes)} classes; use k >= {len(classes)}")
    rank = rng.permutation(len(classes))  # drawn before anything that depends on k: keeps the sets nested
    chosen = []
    for c, label in enumerate(classes.tolist()):  # tolist: plain Python labels in messages
        members = rng.permutation(train_idx[y[train_idx] == label])
        quota = k // len(classes) + int(rank[c] < k % len(classes))
        if len(members) < quota:
            raise FmrilmError(f"class {label!r} has {len(members)} training scans; {k} shots need {quota} "
                              "of each class")
        chosen.append(members[:quota])
    return np.sort(np.concatenate(chosen))


def save_splits(path: str | Path, splits: Sequence[Split]) -> Path:
    """Write splits as JSON (``{"splits": [...]}``) so every method reads the identical partition."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"splits": [s.to_dict() for s in splits]}, indent=1) + "\n")
    return path


def load_splits(path: str | Path) -> list[Split]:
    """Read splits written by :func:`save_splits`."""
    path = Path(path)
    if not path.is_file():
        raise FmrilmError(f"splits file {path} does not exist; write it with save_splits (or fmrilm benchmark)")
    try:
        return [Split.from_dict(record) for record in json.loads(path.read_text())["splits"]]
    except (ValueError, KeyError, TypeError) as error:
        raise FmrilmError(f"{path} is not a splits file ({error}); write it with save_splits") from None


def check_split(split: Split, n_scans: int) -> None:
    """Refuse a split made for another cohort (different scan count or out-of-range indices)."""
    if split.n_scans is not None and split.n_scans != n_scans:
        raise FmrilmError(f"split (seed {split.seed}) indexes {split.n_scans} scans but the cohort has {n_scans}; "
                          "make the splits for this cohort")
    top = max((*split.train, *split.val, *split.test), default=-1)
    if top >= n_scans:
        raise FmrilmError(f"split (seed {split.seed}) has scan index {top} beyond the cohort's {n_scans} scans")
