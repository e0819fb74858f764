"""Stage 3 training data: each cohort's targets on a subject-level split, paraphrase pools, sampled examples.

* :func:`check_tasks` validates the requested tasks; :func:`question_task` is the task a single or multi
  question asks: the task itself, or for a regression task the registry's ordinal-bin task of the same
  column (age -> age_group, fluid_intelligence -> fluid_intelligence_level). Open descriptions state the
  regression value itself ("a 63-year-old woman").
* :func:`cohort_targets` splits one cohort by subject with the protocol (:func:`make_splits` with the run's
  seed, stratified on the first classification task; scans without that target are in no part), fits the
  cut tasks' cuts on the training subjects only and keeps the training scans that have at least one target.
* :func:`paraphrase_pools` splits every paraphrase list into training and held-out parts (fixed seed, so
  every run and every few-shot run holds out the same ones); only the training parts reach
  :class:`InstructDataset`.
* :class:`InstructDataset` item i is one training scan with a freshly sampled paradigm, task subset and
  training paraphrase: ``features`` (W, N, h), ``text_ids`` / ``text_labels`` (L,), loss on the answer only.
  The draws use the global torch RNG, which the shared Trainer seeds per item by (seed, epoch, index), so a
  resumed run samples exactly what an uninterrupted one does, whichever process or worker loads the item.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import (
    TASKS, Split, TaskSpec, check_split, continuous_values, get_task, make_splits, ordinal_cuts, targets,
)
from fmrilm.instruct.paradigms import encode_example, multi_example, open_example, single_example, target_value
from fmrilm.instruct.prompts import PARADIGMS, multi_frames, open_frames, paraphrases, resolve, split_paraphrases

PARAPHRASE_SEED = 0  # one held-out paraphrase set for every run, seed and few-shot run
FRAMES = "frames"  # key of the multi / open frame lists in the paraphrase pools


# ------------------------------------------------------------------------------------------------ tasks
def question_task(task: str | TaskSpec) -> TaskSpec:
    """The task a single or multi question asks: ``task``, or for regression its ordinal-bin task."""
    spec = get_task(task)
    if spec.kind != "regression":
        return spec
    bins = [t for t in TASKS.values() if t.column == spec.column and t.cuts]
    if not bins:
        raise FmrilmError(f"regression task {spec.name} has no ordinal-bin task on column {spec.column!r} to ask "
                          "as classes; add one to fmrilm.evaluate.protocol.TASKS")
    return bins[0]


def check_tasks(tasks: Sequence[str | TaskSpec]) -> list[TaskSpec]:
    """Registry tasks with instruction templates, each phenotype column asked once."""
    if isinstance(tasks, str) or not tasks:
        raise FmrilmError(f"tasks must be a non-empty list of task names, got {tasks!r}; e.g. ['sex', 'age']")
    specs = []
    for task in tasks:
        if isinstance(task, str) and task not in TASKS:
            raise FmrilmError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
        specs.append(resolve(task)[0])
        resolve(question_task(specs[-1]))
    columns = [s.column for s in specs]
    for i, spec in enumerate(specs):
        if spec.column in columns[:i]:
            raise FmrilmError(f"tasks {specs[columns.index(spec.column)].name} and {spec.name} both predict "
                              f"column {spec.column!r}; train them in separate runs")
    return specs


def check_paradigms(paradigms: Sequence[str]) -> list[str]:
    chosen = list(dict.fromkeys(paradigms))
    bad = [p for p in chosen if p not in PARADIGMS]
    if bad or not chosen:
        raise FmrilmError(f"unknown paradigm(s) {bad or chosen}; choose from {', '.join(PARADIGMS)}")
    return chosen


# ---------------------------------------------------------------------------------------------- cohorts
@dataclass
class CohortTargets:
    """One cohort's part of a run: split, fitted cuts, per-scan example rows and the training scans."""

    path: Path
    name: str  # the cohort's most common ``dataset`` (a record; each prompt names its scan's own dataset)
    split: Split
    cuts: dict[str, list[float]]  # cut task name -> cut points in the column's units, fitted on split.train
    rows: list[dict]  # per scan: phenotype values, cut tasks' class codes under the task name, dataset
    available: list[list[str]]  # per scan: the run's tasks whose target it has
    subject_ids: list[str]
    train: np.ndarray  # (n,) training scans: split.train (or train_indices) with at least one target

    def to_dict(self) -> dict:
        return {"path": str(self.path.resolve()), "name": self.name, "split": self.split.to_dict(),
                "cuts": self.cuts, "n_train_scans": int(len(self.train)), "train_scans": self.train.tolist()}


def cohort_targets(cohort: str | Path, specs: Sequence[TaskSpec], seed: int,
                   train_indices: Sequence[int] | None = None, split: Split | None = None) -> CohortTargets:
    """Split ``cohort`` by subject and build its example rows (see the module docstring).

    Parameters
    ----------
    cohort : a prepared cohort directory.
    specs : the run's tasks (:func:`check_tasks`).
    seed : protocol seed of the split.
    train_indices : optional scan indices to train on (few-shot); they must lie in the split's training part.
    split : use this split of the cohort instead of making one (e.g. the one a source model trained on).
    """
    from fmrilm.data.cohort import load_cohort

    with load_cohort(cohort) as opened:
        table = opened.scan_phenotypes()
    for spec in specs:
        if spec.column not in table.columns:
            raise FmrilmError(f"cohort {cohort} has no phenotype column {spec.column!r} needed by task {spec.name}; "
                              "add it to the phenotypes or drop the task")
    if split is None:
        first = next((s for s in specs if s.is_classification), specs[0])
        split = make_splits(table, first, [seed])[0]
    check_split(split, len(table))
    _require_labels(table, specs, split, cohort)
    cuts, table = _cut_classes(table, specs, split)
    rows = table.astype(object).where(table.notna(), None).to_dict("records")
    available = [[s.name for s in specs if _has_target(row, s)] for row in rows]
    train = _training_scans(split, train_indices, available, cohort)
    if len(train) == 0:
        raise FmrilmError(f"cohort {cohort}: no training subject with a label among train_indices "
                          f"{list(train_indices or [])}; pick labelled scans of split.train")
    name = str(table["dataset"].mode().iloc[0]) if "dataset" in table.columns and table["dataset"].notna().any() else ""
    return CohortTargets(Path(cohort), name, split, cuts, rows, available,
                         table["subject_id"].astype(str).tolist(), train)


def _require_labels(table: pd.DataFrame, specs: Sequence[TaskSpec], split: Split, cohort: str | Path) -> None:
    train = list(split.train)
    for spec in specs:
        question = question_task(spec)
        mask = continuous_values(table, question)[1] if question.cuts else targets(table, question)[1]
        if not mask[train].any():
            raise FmrilmError(f"cohort {cohort}: no training subject with a label for task {spec.name} (column "
                              f"{spec.column!r}); fill in that column or drop the task")


def _cut_classes(table: pd.DataFrame, specs: Sequence[TaskSpec], split: Split) -> tuple[dict, pd.DataFrame]:
    """Cuts of every cut task asked (from the training subjects) and the class codes under the task names."""
    cuts, table = {}, table.copy()
    ids = table["subject_id"].astype(str).to_numpy()
    for spec in {question_task(s).name: question_task(s) for s in specs}.values():
        if not spec.cuts:
            continue
        values, mask = continuous_values(table, spec)
        fitted = ordinal_cuts(values, split.train, spec, ids)
        cuts[spec.name] = [float(c) for c in fitted]
        table[spec.name] = np.where(mask, np.searchsorted(fitted, values, side="right"), -1)
    return cuts, table


def _has_target(row: Mapping, spec: TaskSpec) -> bool:
    return target_value(row, question_task(spec)) is not None and target_value(row, spec) is not None


def _training_scans(split: Split, train_indices: Sequence[int] | None, available: list[list[str]],
                    cohort: str | Path) -> np.ndarray:
    train = np.asarray(split.train, dtype=np.int64)
    if train_indices is not None:
        chosen = np.unique(np.asarray(train_indices, dtype=np.int64))
        outside = np.setdiff1d(chosen, train)
        if len(outside):
            raise FmrilmError(f"train_indices for {cohort} include scan {int(outside[0])}, which is not in the "
                              f"training split (seed {split.seed}); pick scans from split.train")
        train = chosen
    return train[[bool(available[i]) for i in train]] if len(train) else train


# ------------------------------------------------------------------------------------------- paraphrases
def paraphrase_pools(specs: Sequence[TaskSpec], paradigms: Sequence[str],
                     held_out_fraction: float = 0.2) -> tuple[dict, dict]:
    """(train, held_out) pools, both ``{paradigm: {question task name or "frames": [str, ...]}}``.

    single: questions per question task; multi: items per question task and ``"frames"``
    (:func:`multi_frames`); open: ``"frames"`` (:func:`open_frames`).
    """
    train: dict[str, dict] = {}
    held: dict[str, dict] = {}
    for paradigm in paradigms:
        lists = {question_task(s).name: paraphrases(question_task(s), paradigm)
                 for s in specs} if paradigm != "open" else {}
        if paradigm != "single":
            lists[FRAMES] = multi_frames() if paradigm == "multi" else open_frames()
        parts = {key: split_paraphrases(items, held_out_fraction, PARAPHRASE_SEED) for key, items in lists.items()}
        train[paradigm] = {key: part[0] for key, part in parts.items()}
        held[paradigm] = {key: part[1] for key, part in parts.items()}
    return train, held


# ----------------------------------------------------------------------------------------------- examples
def sample_example(row: Mapping, tasks: Sequence[TaskSpec], paradigm: str, rng: random.Random, pools: Mapping,
                   semantic: bool = False) -> tuple[str, str]:
    """One (prompt, answer) of ``paradigm`` about ``tasks`` (all available in ``row``), from training pools.

    multi asks a random 2-3 of the tasks (all when fewer), open describes all of them.
    """
    pool = pools[paradigm]
    if paradigm == "single":
        spec = question_task(tasks[rng.randrange(len(tasks))])
        return single_example(row, spec, rng, pool[spec.name], with_semantic=semantic)
    if paradigm == "multi":
        k = rng.randint(min(2, len(tasks)), min(3, len(tasks)))
        asked = [question_task(s) for s in rng.sample(list(tasks), k)]
        items = {s.name: pool[s.name] for s in asked}
        return multi_example(row, asked, rng, items, frames=pool[FRAMES], with_semantic=semantic)
    return open_example(row, list(tasks), rng, pool[FRAMES], with_semantic=semantic)


class InstructDataset(Dataset):
    """Item i: training scan ``items[i]`` = (cohort, scan) with a sampled instruction example.

    Parameters
    ----------
    cohorts : the run's :class:`CohortTargets`.
    caches : one :class:`fmrilm.lm.pipeline.TokenCache` per cohort (features (S, W, N, h)).
    specs, paradigms, pools : the run's tasks, paradigms and TRAINING paraphrase pools.
    tokenizer : the LLM tokenizer; ``max_len`` caps prompt + answer tokens.
    """

    def __init__(self, cohorts: Sequence[CohortTargets], caches: Sequence, specs: Sequence[TaskSpec],
                 paradigms: Sequence[str], pools: Mapping, tokenizer, max_len: int, semantic: bool = False):
        self.cohorts, self.caches, self.specs = list(cohorts), list(caches), {s.name: s for s in specs}
        self.paradigms, self.pools, self.tokenizer = list(paradigms), pools, tokenizer
        self.max_len, self.semantic = max_len, semantic
        self.items = [(c, int(s)) for c, cohort in enumerate(self.cohorts) for s in cohort.train]

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int, rng: random.Random) -> tuple[str, str]:
        """The (prompt, answer) text of item ``i`` drawn with ``rng``."""
        c, scan = self.items[i]
        cohort = self.cohorts[c]
        row = cohort.rows[scan]
        tasks = [self.specs[name] for name in cohort.available[scan]]
        paradigm = self.paradigms[rng.randrange(len(self.paradigms))]
        return sample_example(row, tasks, paradigm, rng, self.pools, self.semantic)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        rng = random.Random(int(torch.randint(0, 2**62, ()).item()))  # seeded per item by the Trainer
        prompt, answer = self.example(i, rng)
        c, scan = self.items[i]
        features = torch.from_numpy(np.array(self.caches[c].features[scan]))
        return {"features": features, **encode_example(self.tokenizer, prompt, answer, self.max_len)}
