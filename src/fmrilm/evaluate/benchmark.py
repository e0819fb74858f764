"""``fmrilm benchmark``: every method on the same subject splits of every cohort and task, as tables and plots.

For each cohort (simulated and prepared in ``B/cohorts``, or an existing one), each task and each seed, the
protocol's subject split (:func:`fmrilm.evaluate.protocol.make_splits`, saved in ``B/splits``) is shared by
all methods. Each baseline is trained on the full training part and on the k-shot subsets
(:func:`~fmrilm.evaluate.protocol.few_shot_indices`, identical for every method) and scored on the test part.
fMRI-LM rows come from ``fmrilm evaluate``: an existing results file or models evaluated here
(:mod:`fmrilm.evaluate.benchmark_fmrilm`). Cohorts are built by :mod:`fmrilm.evaluate.benchmark_cohorts`, the
configuration is :class:`fmrilm.evaluate.benchmark_config.BenchmarkConfig`, plots :mod:`fmrilm.evaluate.plots`.

Typical use::

    from fmrilm.evaluate.benchmark import run_benchmark
    from fmrilm.evaluate.benchmark_config import resolve_config

    rows = run_benchmark(resolve_config("quick", methods=["fc_logreg", "bnt"], seeds=2), "B", progress=print)

Outputs::

    B/config.json     the resolved BenchmarkConfig
    B/results.json    rows in the schema of fmrilm evaluate (fmrilm.evaluate.results)
    B/results.md      tables like the paper's Tables 3/4 (best bold, second underlined)
    B/plots/          bars_<cohort>_<task>.png, fewshot_<cohort>_<task>.png, roc_<cohort>_<task>.png
    B/splits/         <cohort>_<task>.json, the shared splits
    B/cache/          one JSON per (method, cohort, task, seed, shots) with its metrics and per-scan predictions
    B/run.json        cells computed and reused, wall time, notes (fMRI-LM test subjects that differ)
    B/cohorts/, B/raw/, B/descriptors/   simulated cohorts and descriptors (benchmark_cohorts)
    B/fmrilm/         fmrilm evaluate outputs per (cohort, task) when models are evaluated here

A cell's cache file is named by a hash of everything its result depends on (method and resolved
hyper-parameters, the split's scan indices, shots, the task definition and a fingerprint of the cohort and
of its descriptors), so a rerun after an interruption, or with one more method, computes only what is new.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from fmrilm.data.cohort import Cohort, load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.baselines import BASELINES, FeatureCache, get_baseline, predict_baseline, prediction_metrics
from fmrilm.evaluate.benchmark_cohorts import CACHE_VERSION, BuiltCohort, Progress, build_cohort, cohort_tasks, digest
from fmrilm.evaluate.benchmark_config import BenchmarkConfig, resolve_config
from fmrilm.evaluate.benchmark_fmrilm import fmrilm_rows
from fmrilm.evaluate.protocol import TASKS, Split, get_task, make_splits, save_splits
from fmrilm.evaluate.results import JSON_FILE, MARKDOWN_FILE, ResultRow, markdown_tables, rows_from_seeds, write_results
from fmrilm.io import atomic_file, plain_mode, write_json_atomic

CONFIG_FILE, RUN_FILE = "config.json", "run.json"
ConfigLike = BenchmarkConfig | dict | str | os.PathLike  # a config, its dict, or a preset name or JSON file


# ------------------------------------------------------------------------------------------- output dir
def open_benchmark_dir(out: str | os.PathLike, config: BenchmarkConfig, overwrite: bool) -> Path:
    """Create ``out`` or reuse it: a benchmark directory (one with ``cache/``) is resumed unless it holds
    another config (``config.json``, written once the cohorts and tasks are checked); another config, or a
    directory that is not a benchmark, needs ``overwrite``. Cached cells are reused either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FmrilmError(f"output {out} exists and is not a directory; remove it or choose another --out")
    saved = out / CONFIG_FILE
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not (out / "cache").is_dir():
            raise FmrilmError(f"output {out} already exists and is not a benchmark directory; choose another --out "
                              "or pass --overwrite")
        if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(config.to_dict())):
            raise FmrilmError(f"{out} holds a benchmark with another configuration; pass --overwrite to rerun it "
                              "there (cached cells are reused) or choose another --out")
    (out / "cache").mkdir(parents=True, exist_ok=True)
    return out


# ------------------------------------------------------------------------------------------------ cells
@dataclass(frozen=True)
class Cell:
    """One (method, cohort, task, seed, shots) result: metrics and per-scan test predictions."""

    method: str
    cohort: str
    task: str
    seed: int
    shots: int | None
    record: dict  # metrics, test, y_true, y_pred, proba (classification) and seconds


def _estimator_params(method: str, task: str, params: dict) -> dict:
    """The user's hyper-parameters the task's estimator accepts (classifier-only ones leave regressors)."""
    known = get_baseline(method)(task).get_params()
    return {k: v for k, v in params.get(method, {}).items() if k in known}


def cell_key(method: str, built: BuiltCohort, task: str, split: Split, shots: int | None, params: dict) -> dict:
    """Everything a baseline cell's result depends on (its hash names the cache file)."""
    estimator = get_baseline(method)(task, **params)
    resolved = {k: v for k, v in estimator.get_params().items() if k != "seed"}  # the split's seed is used
    return {"version": CACHE_VERSION, "method": method, "params": resolved, "cohort": built.fingerprint,
            "descriptors": built.descriptors_fingerprint if BASELINES[method].needs_descriptors else None,
            "task": asdict(get_task(task)), "split": split.to_dict(), "shots": shots}


def _cell_path(out: Path, built: BuiltCohort, task: str, method: str, split: Split, shots: int | None,
               key: dict) -> Path:
    setting = "full" if shots is None else f"k{shots}"
    return out / "cache" / "cells" / built.spec.name / task / method / f"seed{split.seed}_{setting}_{digest(key)}.json"


def _prediction_record(prediction: dict, seconds: float) -> dict:
    proba = prediction["proba"]
    return {"metrics": prediction_metrics(prediction), "test": prediction["test"].tolist(),
            "y_true": prediction["y_true"].tolist(), "y_pred": np.asarray(prediction["y_pred"]).tolist(),
            "proba": None if proba is None else proba.tolist(), "seconds": round(seconds, 3)}


def run_cell(method: str, built: BuiltCohort, cohort: Cohort, features: FeatureCache, task: str, split: Split,
             shots: int | None, config: BenchmarkConfig, out: Path) -> tuple[dict, bool]:
    """The cell's record from the cache, or computed and cached: (record, computed)."""
    params = _estimator_params(method, task, config.params)
    key = cell_key(method, built, task, split, shots, params)
    path = _cell_path(out, built, task, method, split, shots, key)
    if path.is_file():
        return json.loads(path.read_text()), False
    start = time.perf_counter()
    prediction = predict_baseline(method, cohort, task, split, built.descriptors, shots=shots, params=params,
                                  cache=features)
    record = _prediction_record(prediction, time.perf_counter() - start) | {"key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return record, True


def _save_splits(out: Path, cohort_name: str, task: str, splits: list[Split]) -> None:
    path = out / "splits" / f"{cohort_name}_{task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_splits(tmp, splits)


def cohort_cells(built: BuiltCohort, tasks: tuple[str, ...], config: BenchmarkConfig, out: Path, stats: dict,
                 log: Progress) -> list[Cell]:
    """Every baseline on every seed's split of each task of one cohort, full data and k-shot (inputs such as
    FC computed once for all of them)."""
    cells = []
    with load_cohort(built.path) as cohort:
        features = FeatureCache(cohort, built.descriptors)
        for task in tasks:
            splits = make_splits(cohort, task, config.seeds, config.test_fraction, config.val_fraction)
            _save_splits(out, built.spec.name, task, splits)
            for method, split, shots in itertools.product(config.baselines, splits, (None, *config.shots)):
                record, computed = run_cell(method, built, cohort, features, task, split, shots, config, out)
                stats["computed" if computed else "cached"] += 1
                cells.append(Cell(method, built.spec.name, task, split.seed, shots, record))
                log(_cell_line(cells[-1], computed))
    return cells


def _cell_line(cell: Cell, computed: bool) -> str:
    shown = ", ".join(f"{k} {v:.3f}" for k, v in cell.record["metrics"].items())
    setting = "all" if cell.shots is None else f"{cell.shots}-shot"
    how = f"{cell.record['seconds']:.1f} s" if computed else "cached"
    return f"{cell.cohort}/{cell.task} {cell.method} seed {cell.seed} {setting}: {shown} ({how})"


# ------------------------------------------------------------------------------------------------- rows
def cell_rows(cells: list[Cell], config: BenchmarkConfig) -> list[ResultRow]:
    """Aggregate cells over seeds into result rows, ordered cohort > setting > task > method so that each
    results.md table lists the methods in the config's order."""
    groups: dict[tuple, list[dict]] = {}
    for cell in cells:
        groups.setdefault((cell.cohort, cell.shots, cell.task, cell.method), []).append(cell.record["metrics"])
    orders = ([c.name for c in config.cohorts], [None, *config.shots], list(dict.fromkeys(c.task for c in cells)),
              list(config.methods))
    rows = []
    for cohort, shots, task, method in sorted(groups, key=lambda key: [o.index(p) for o, p in zip(orders, key)]):
        rows += rows_from_seeds(groups[(cohort, shots, task, method)], method=method, cohort=cohort, task=task,
                                setting="full" if shots is None else "few-shot", shots=shots)
    return rows


def table_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """Rows for the comparison tables and plots: a method scored in another paradigm (fMRI-LM's "single",
    "multi") is shown beside the supervised baselines as ``method (paradigm)``."""
    return [r if r.paradigm == "supervised" else replace(r, method=f"{r.method} ({r.paradigm})", paradigm="supervised")
            for r in rows]


# ---------------------------------------------------------------------------------------------- outputs
def roc_inputs(cells: list[Cell]) -> dict[tuple[str, str], dict[str, list[tuple[np.ndarray, np.ndarray]]]]:
    """Per (cohort, task) of a binary task, per method: the full-data (y_true, positive-class score) of each
    seed - what the ROC curves are drawn from."""
    curves: dict = {}
    for cell in cells:
        proba = cell.record.get("proba")
        if cell.shots is None and proba is not None and len(proba[0]) == 2:
            pair = (np.asarray(cell.record["y_true"]), np.asarray(proba)[:, 1])
            curves.setdefault((cell.cohort, cell.task), {}).setdefault(cell.method, []).append(pair)
    return curves


def write_outputs(out: Path, rows: list[ResultRow], roc: dict) -> None:
    """results.json (the rows as they are), results.md (comparison tables) and plots/ (ROC curves from ``roc``,
    as :func:`roc_inputs` returns), each replaced whole."""
    from fmrilm.evaluate.plots import write_plots

    shown = table_rows(rows)
    tmp = Path(tempfile.mkdtemp(prefix=".outputs.tmp-", dir=out))
    plain_mode(tmp, directory=True)  # plots/ is renamed into place as it is
    try:
        write_results(tmp, rows)
        (tmp / MARKDOWN_FILE).write_text(markdown_tables(shown))
        write_plots(shown, roc, tmp / "plots")
        for name in (JSON_FILE, MARKDOWN_FILE):
            os.replace(tmp / name, out / name)
        old = out / f".plots.old-{os.getpid()}"
        if (out / "plots").exists():
            os.replace(out / "plots", old)
        os.replace(tmp / "plots", out / "plots")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(out / f".plots.old-{os.getpid()}", ignore_errors=True)


# ------------------------------------------------------------------------------------------------- main
def _as_config(config: ConfigLike) -> BenchmarkConfig:
    if isinstance(config, BenchmarkConfig):
        return config
    if isinstance(config, dict):
        return BenchmarkConfig.from_dict(config)
    return resolve_config(config)


def _plan(config: BenchmarkConfig, out: Path, log: Progress) -> list[tuple[BuiltCohort, tuple[str, ...]]]:
    """Every cohort built, with the tasks run on it; refuses a task that is in no cohort and shots too few
    for a task's classes - before any baseline runs."""
    plan = []
    for spec in config.cohorts:
        built = build_cohort(spec, config, out, log)
        with load_cohort(built.path) as cohort:
            plan.append((built, cohort_tasks(spec, cohort.scan_phenotypes(), config.tasks)))
    found = {task for _, tasks in plan for task in tasks}
    for task in config.tasks:
        if task not in found:
            have = "; ".join(f"{b.spec.name}: {', '.join(t) or 'none'}" for b, t in plan)
            raise FmrilmError(f"task {task} is in none of the cohorts ({have}); drop it from --tasks")
    for task in found:
        classes = len(TASKS[task].classes)
        if config.shots and min(config.shots) < classes:
            raise FmrilmError(f"{min(config.shots)} shots cannot cover the {classes} classes of task {task}; "
                              f"use --shots of at least {classes}")
    return plan


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_benchmark(config: ConfigLike, out: str | os.PathLike, *, overwrite: bool = False,
                  progress: Progress | None = None, threads: int | None = 1) -> list[ResultRow]:
    """Run every method of ``config`` on every cohort and task, and write ``out`` (see the module docstring).

    Parameters
    ----------
    config : a :class:`BenchmarkConfig`, its dict (``B/config.json``), or a preset name or JSON file.
    out : the benchmark directory; an existing one with the same config is resumed (only missing cells run).
    overwrite : rerun into an existing directory holding another config or no benchmark.
    progress : called with one line per step (``print`` shows them); silent by default.
    threads : torch threads while the baselines train, restored afterwards (1: the small models gain nothing
        from more, and on a busy machine OpenMP threads wait on each other); None keeps torch's setting.

    Returns
    -------
    The result rows written to ``out/results.json`` (baselines, then fMRI-LM's).
    """
    config, start = _as_config(config), time.perf_counter()
    log = (lambda line: progress(f"[{time.perf_counter() - start:7.1f} s] {line}")) if progress else (lambda line: None)
    out = open_benchmark_dir(out, config, overwrite)
    plan = _plan(config, out, log)
    write_json_atomic(out / CONFIG_FILE, config.to_dict())
    fmrilm = fmrilm_rows(config, plan, out, log)
    stats, cells = {"computed": 0, "cached": 0}, []
    with _torch_threads(threads):
        for built, tasks in plan:
            cells += cohort_cells(built, tasks, config, out, stats, log)
    rows = cell_rows(cells, config) + fmrilm.rows
    for note in fmrilm.notes:
        log(note)
    roc = roc_inputs(cells)
    for key, curves in fmrilm.roc.items():
        roc.setdefault(key, {}).update(curves)
    write_outputs(out, rows, roc)
    write_json_atomic(out / RUN_FILE, stats | {"seconds": round(time.perf_counter() - start, 1), "rows": len(rows),
                                               "notes": fmrilm.notes})
    log(f"wrote {out}: results.json, results.md, plots/ ({stats['computed']} cells computed, {stats['cached']} cached)")
    return rows
