"""fMRI-LM rows in the benchmark, beside the baselines, from ``fmrilm evaluate``.

Two sources (``fmrilm`` in the benchmark config):

* ``results``: an existing ``R/results.json`` (``--fmrilm-results``), merged as it is;
* ``models``: Stage 3 (or align) model directories (``--fmrilm-models``), evaluated here per (cohort, task)
  with :func:`fmrilm.instruct.evaluate.run_evaluate` (``paradigm``, the benchmark's seeds, ``shots``; default
  zero-shot only) into ``B/fmrilm/<cohort>_<task>``, cached like the baseline cells.

``fmrilm evaluate`` labels a cohort by its scans' dataset name (``UKB``), so rows are matched to benchmark
cohorts by benchmark name, directory name or dataset name. ``evaluate.json`` lists the test subjects of each
run; they are compared with the benchmark's splits and every difference is reported (``B/run.json`` notes):
baselines and fMRI-LM are only comparable on the same test subjects. On a cohort a model was not trained on,
``fmrilm evaluate`` splits per task with the same protocol, so the test subjects agree; a model trained on the
cohort keeps the split it was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fmrilm.data.cohort import load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.benchmark_cohorts import CACHE_VERSION, BuiltCohort, digest, reusable
from fmrilm.evaluate.benchmark_config import FMRILM, BenchmarkConfig
from fmrilm.evaluate.protocol import make_splits
from fmrilm.evaluate.results import ResultRow, read_results
from fmrilm.io import write_json_atomic

Plan = list[tuple[BuiltCohort, tuple[str, ...]]]
SETTINGS_FILE, PREDICTIONS_FILE = "evaluate.json", "predictions.jsonl"  # written by fmrilm evaluate


def _aliases(built: BuiltCohort) -> set[str]:
    """Names a cohort's rows may carry in other results: its benchmark name, directory name and dataset name
    (``fmrilm evaluate`` labels rows with the scans' dataset), compared case-insensitively."""
    with load_cohort(built.path) as cohort:
        datasets = set(cohort.scans["dataset"].dropna().astype(str)) if "dataset" in cohort.scans else set()
    return {name.lower() for name in {built.spec.name, built.path.name, *datasets}}


def _named(rows: list[ResultRow], plan: Plan) -> list[ResultRow]:
    named = {alias: built.spec.name for built, _ in plan for alias in _aliases(built)}
    return [replace(r, cohort=named.get(r.cohort.lower(), r.cohort)) for r in rows]


def check_coverage(rows: list[ResultRow], plan: Plan, source: object) -> None:
    """Refuse rows of cohorts outside the benchmark, or missing a (cohort, task) of it (extra tasks, such as
    the ordinal bins fMRI-LM answers for a regression task, are allowed)."""
    have = {(r.cohort, r.task) for r in rows}
    want = {(built.spec.name, task) for built, tasks in plan for task in tasks}
    if want - have or {c for c, _ in have} - {c for c, _ in want}:
        show = lambda pairs: ", ".join(f"{c}/{t}" for c, t in sorted(pairs)) or "none"  # noqa: E731
        raise FmrilmError(f"fmrilm results {source} cover {show(have)} but the benchmark runs {show(want)}; evaluate "
                          "fMRI-LM on the same cohorts and tasks, or change --cohorts/--tasks")


@dataclass
class FmrilmRows:
    """What fMRI-LM adds to a benchmark: result rows, notes on its test subjects, ROC inputs of its binary tasks
    (``{(cohort, task): {label: [(y_true, score) per run]}}``)."""

    rows: list[ResultRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    roc: dict = field(default_factory=dict)

    def add(self, results: Path, config: BenchmarkConfig, plan: Plan) -> None:
        """Rows, notes and ROC inputs of one ``fmrilm evaluate`` output (its directory or results file)."""
        self.rows += _named(read_results(results), plan)
        directory = results if results.is_dir() else results.parent
        self.notes += split_notes(config, plan, directory / SETTINGS_FILE)
        for key, curves in roc_pairs(directory, plan).items():
            for label, pairs in curves.items():
                self.roc.setdefault(key, {}).setdefault(label, []).extend(pairs)


def fmrilm_rows(config: BenchmarkConfig, plan: Plan, out: Path,
                log: Callable[[str], None] = lambda line: None) -> FmrilmRows:
    """fMRI-LM's rows (cohorts named as in the benchmark), notes on their test subjects and ROC inputs (see
    the module docstring); nothing when fmrilm is not a method."""
    if FMRILM not in config.methods:
        return FmrilmRows()
    if config.fmrilm.get("results"):
        source, found = Path(config.fmrilm["results"]), FmrilmRows()
        found.add(source, config, plan)
        check_coverage(found.rows, plan, source)
        return found
    if config.fmrilm.get("models"):
        return evaluated_rows(config, plan, out, log)
    raise FmrilmError("method fmrilm needs --fmrilm-results R/results.json (rows written by 'fmrilm evaluate' on the "
                      "same cohorts and tasks) or --fmrilm-models INST [INST ...]; or drop fmrilm from --methods")


def _evaluated_cohort(record: dict, plan: Plan) -> BuiltCohort | None:
    """The benchmark cohort an ``evaluate.json`` record evaluated, if any."""
    return next((b for b, _ in plan if b.path.resolve() == Path(record.get("cohort", "")).resolve()), None)


def roc_pairs(directory: Path, plan: Plan) -> dict:
    """ROC inputs from ``predictions.jsonl`` of an ``fmrilm evaluate`` output: per binary (cohort, task) and
    ``fmrilm (paradigm)`` label, the (y_true (n,), positive-class probability (n,)) of each run of the base
    models (shots None or 0; fine-tuned few-shot runs are left out)."""
    settings, predictions = directory / SETTINGS_FILE, directory / PREDICTIONS_FILE
    if not (settings.is_file() and predictions.is_file()):
        return {}
    built = _evaluated_cohort(json.loads(settings.read_text()), plan)
    runs: dict = {}
    for line in predictions.read_text().splitlines():
        record = json.loads(line)
        if built is None or not record.get("shots") in (None, 0) or len(record.get("proba") or []) != 2:
            continue
        key = ((built.spec.name, record["task"]), f"fmrilm ({record['paradigm']})")
        run = runs.setdefault(key, {}).setdefault((record["model"], record["seed"]), ([], []))
        run[0].append(record["y_true"])
        run[1].append(record["proba"][1])
    out: dict = {}
    for (pair, label), by_run in runs.items():
        out.setdefault(pair, {})[label] = [(np.asarray(y), np.asarray(p)) for y, p in by_run.values()]
    return out


def split_notes(config: BenchmarkConfig, plan: Plan, settings: Path) -> list[str]:
    """Where fMRI-LM's test subjects (``evaluate.json`` of fmrilm evaluate) differ from the benchmark's splits,
    one line each; empty when they agree."""
    if not settings.is_file():
        return [f"fmrilm: no {settings}, so it is unknown whether fMRI-LM was tested on the benchmark's subjects"]
    record = json.loads(settings.read_text())
    cohort = _evaluated_cohort(record, plan)
    if cohort is None:
        return [f"fmrilm: {settings} evaluated {record.get('cohort')}, which is none of the benchmark's cohorts"]
    with load_cohort(cohort.path) as opened:
        table = opened.scan_phenotypes()
    subjects, notes = table["subject_id"].astype(str), []
    for task in record.get("tasks") or dict(plan)[cohort]:
        splits = {s.seed: s for s in make_splits(table, task, config.seeds, config.test_fraction, config.val_fraction)}
        for run in record.get("runs", []):
            split = splits.get(run.get("seed"))
            mine = set(subjects.iloc[list(split.test)]) if split else set()
            if set(run.get("test_subjects", [])) != mine:
                notes.append(f"fmrilm: {cohort.spec.name}/{task} run {run.get('model')} seed {run.get('seed')} was "
                             "tested on other subjects than the baselines' split of that seed")
    return notes


# -------------------------------------------------------------------------------------- evaluated here
def model_fingerprint(directory: str | os.PathLike) -> str:
    """A hash of a model directory's files (relative path, size, modification time)."""
    root = Path(directory)
    if not root.is_dir():
        raise FmrilmError(f"fmrilm model {root} does not exist; pass 'fmrilm instruct' (or align) output directories")
    return digest(sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
                          if p.is_file()))


def evaluated_rows(config: BenchmarkConfig, plan: Plan, out: Path, log: Callable[[str], None]) -> FmrilmRows:
    """Run fmrilm evaluate of ``config.fmrilm["models"]`` on every (cohort, task), one task at a time (so its
    splits are the benchmark's), reusing an evaluation whose inputs are unchanged."""
    from fmrilm.instruct.evaluate import run_evaluate

    models = [str(Path(m).absolute()) for m in config.fmrilm["models"]]
    paradigm, shots = config.fmrilm.get("paradigm", "single"), tuple(config.fmrilm.get("shots", (0,)))
    found = FmrilmRows()
    for built, tasks in plan:
        for task in tasks:
            name = f"{built.spec.name}_{task}"
            target, record = out / "fmrilm" / name, out / "cache" / "fmrilm" / f"{name}.json"
            key = {"version": CACHE_VERSION, "models": [model_fingerprint(m) for m in models], "task": task,
                   "cohort": built.fingerprint, "paradigm": paradigm, "shots": shots, "seeds": config.seeds}
            if not reusable(record, key, target):
                log(f"{built.spec.name}/{task} fmrilm: fmrilm evaluate of {len(models)} model(s), paradigm {paradigm}")
                run_evaluate(models, built.path, target, tasks=[task], paradigm=paradigm, seeds=config.seeds,
                             shots=shots, overwrite=True)
                record.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(record, key)
            found.add(target, config, plan)
    check_coverage(found.rows, plan, out / "fmrilm")
    return found
