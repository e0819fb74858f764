"""``fmrilm evaluate``: Stage 3 models answering questions about held-out subjects, scored as the paper's tables.

Outputs in ``R`` (written atomically)::

    results.json, results.md   one row per (method, cohort, task, paradigm, setting, shots, metric) with mean,
                               std and n_seeds (fmrilm.evaluate.results), tables laid out like Tables 3 / 4
    predictions.jsonl          one record per (run, task, scan): truth, prediction, class probabilities, prompt
                               and generated answer, so ROC curves and error analyses can be drawn later; a
                               constrained answer's ``proba`` are the probabilities it was decided on (calibrated
                               when ``calibrated``), ``proba_uncalibrated`` the raw ones
    evaluate.json              the settings and, per run, the model, seed, test subjects and calibration used

Runs and seeds. A model trained on the cohort (its ``instruct.json`` records the cohort and its split) is tested
on its own recorded test subjects, never on a training subject; several models (one per training seed) give one
value per seed. On a cohort the model never saw, subject-level splits are made with ``seeds`` (stratified on the
first task) and every model is tested on every split. Only the training part of a split is used to fit: cut
points of ordinal bins (recorded ones when the model trained on the cohort) and the linear probe. Rows aggregate over runs: ``n_seeds`` is the number of runs
whose metric was defined (one model, one seed: ``n_seeds = 1``, std 0).

Setting and shots. A task whose phenotype column the model was trained on, on a cohort it was trained on, is
``setting="full"`` with ``shots=None``; otherwise the model answers zero-shot (``shots=0``) in one of the paper's
transfer settings ``new-task``, ``new-cohort`` or ``new-task-new-cohort``. With ``shots=(0, 2, 4, 10)`` each model
is also fine-tuned, per task and run, on k labelled training scans balanced by label (the run's seed picks them;
on a cohort the model trained on, each of ``seeds`` picks its own k scans within the recorded split,
:func:`fmrilm.instruct.pipeline.few_shot_finetune`, a fixed budget of optimizer steps) and tested on the same test
subjects; its rows keep the base model's setting with ``shots=k``: one curve per setting over k.

Paradigms (prompts are HELD-OUT paraphrases only, one drawn per scan with a seeded generator):

* ``single``: classes by constrained scoring over the task's answers (class probabilities: accuracy, balanced
  accuracy, AUC, F1). A regression task is answered two ways: as its ordinal-bin task (``age`` -> ``age_group``,
  ``flanker`` -> ``flanker_level``; cuts from the training split) and by a :class:`LinearProbe` on the hidden
  state of the last prompt token (after its bins question), fitted on the scans the model was trained on (the
  training part; k-shot: the k shots) (MAE, Pearson r).
  Calibration (:mod:`fmrilm.instruct.calibration`): the LLM's a-priori preference for some answer strings is
  removed by a per-class bias fitted on TRAINING scans only - the model's ``calibration.json`` (written by
  ``fmrilm instruct`` from the scans it trained on; a k-shot model's from its k shots), else, for a model trained
  on this cohort before calibration existed, fitted now on its recorded training scans (a warning says so); a
  model with neither (an align output, a cohort it never saw) answers uncalibrated. ``calibration=False``
  decides on the raw probabilities. A calibrated task also gets rows of the method ``"<method> (uncalibrated)"``
  with the raw decision's metrics, so the effect is visible (the binary AUC is the same by construction).
* ``multi``: all tasks in one prompt (a regression task asked as its bins, as trained), greedy generation (KV
  cache) parsed by :func:`parse_multi` in any order; accuracy, balanced accuracy and F1 per task (an unparsed
  answer is wrong; no AUC without probabilities) and ``parse_rate``; accuracy compares with ``single``'s.
* ``open``: a free description, read by :func:`extract_fields` and scored by :func:`score_open`: ``accuracy``
  per task and for ``overall`` (all fields right); ``similarity`` to the reference description when an offline
  sentence encoder is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pandas as pd

from fmrilm.data.cohort import load_cohort
from fmrilm.errors import FmrilmError, FmrilmWarning
from fmrilm.evaluate.protocol import TASKS, Split, TaskSpec, check_split, get_task, make_splits
from fmrilm.evaluate.results import ResultRow, rows_from_seeds, write_results
from fmrilm.instruct.data import check_tasks, question_task
from fmrilm.instruct.calibration import CALIBRATION_FILE, MAX_SCANS, Calibration, check_method, merge
from fmrilm.instruct.paradigm_eval import UNCALIBRATED, Run, evaluate_generated, evaluate_single, fit_calibration
from fmrilm.instruct.pipeline import INFO_FILE, InstructedModel, _check_grid
from fmrilm.instruct.prompts import PARADIGMS
from fmrilm.io import atomic_output_dir, check_output_dir, write_json_atomic

PREDICTIONS_FILE, SETTINGS_FILE = "predictions.jsonl", "evaluate.json"
RAW_SUFFIX = " (uncalibrated)"  # method of the result rows of raw (uncalibrated) constrained answers


# ------------------------------------------------------------------------------------------------ models
def load_model(directory: str | os.PathLike):
    """A Stage 3 model (:class:`InstructedModel`) or any ``fmrilm align`` output, with ``.model``, ``.tokenizer``,
    ``.preprocess``, ``.directory`` and ``.info`` (``instruct.json``; ``{}`` for an align output: trained on no
    cohort and no task)."""
    from fmrilm.lm.pipeline import AlignedModel

    if (Path(directory) / INFO_FILE).is_file():
        return InstructedModel(directory)
    loaded = AlignedModel(directory)
    loaded.info = {}
    return loaded


def _trained_entry(info: dict, cohort: Path) -> dict | None:
    """The ``instruct.json`` record of this cohort, when the model was trained on it."""
    for entry in info.get("cohorts", []):
        if Path(entry.get("path", "")).resolve() == cohort.resolve():
            return entry
    return None


# ------------------------------------------------------------------------------------------------ checks
def _check_tasks(tasks: Sequence[str], paradigm: str) -> list[TaskSpec]:
    if paradigm not in PARADIGMS:
        raise FmrilmError(f"unknown paradigm {paradigm!r}; choose one of {', '.join(PARADIGMS)}")
    return check_tasks(tasks)


def _check_phenotypes(table: pd.DataFrame, specs: list[TaskSpec], cohort: Path) -> None:
    for spec in specs:
        if spec.column not in table.columns or table[spec.column].isna().all():
            have = [c for c in table.columns if c in {t.column for t in TASKS.values()}]
            raise FmrilmError(f"task {spec.name} needs phenotype column {spec.column!r}, which cohort {cohort} "
                              f"lacks (it has {', '.join(have) or 'no task columns'}); choose other --tasks")


# ------------------------------------------------------------------------------------------------ runs
def _runs(models: list, cohort: Path, table: pd.DataFrame, specs: list[TaskSpec], seeds) -> list[Run]:
    """Recorded splits of the models trained on ``cohort``, protocol splits (``seeds``) for the others."""
    runs = []
    for loaded in models:
        entry = _trained_entry(loaded.info, cohort)
        columns = frozenset(get_task(t).column for t in loaded.info.get("tasks", []) if t in TASKS)
        if entry is None:
            runs += [Run(loaded, split, False, base_columns=columns) for split in make_splits(table, specs[0], seeds)]
            continue
        split = Split.from_dict({"seed": loaded.info.get("seed", 0), **entry["split"]})
        check_split(split, len(table))
        scans = entry.get("train_scans")
        runs.append(Run(loaded, split, True, dict(entry.get("cuts", {})), None if scans is None else tuple(scans),
                        base_cohort=True, base_columns=columns))
    return runs


def _setting(run: Run, names: Sequence[str]) -> tuple[str, int | None]:
    """(setting, shots) of tasks for a run (module docstring); several tasks ("overall"): the least seen."""
    known = all(TASKS[n].column in run.base_columns for n in names)
    if run.base_cohort and known:
        return "full", run.shots
    return ("new-task" if run.base_cohort else "new-cohort" if known else "new-task-new-cohort"), run.shots or 0


def _few_shot_run(base: Run, cohort: Path, table: pd.DataFrame, spec: TaskSpec, k: int, paradigm: str,
                  budget_steps: int, work: str) -> Run:
    """The base run's model fine-tuned on k labelled training scans of ``spec`` (seed: the run's), as a Run
    tested on its recorded split and labelled with the base model's setting."""
    from fmrilm.instruct.pipeline import few_shot_finetune

    out = Path(work) / "model"
    few_shot_finetune(base.model.directory, cohort, spec.name, k, base.seed, out, budget_steps, paradigms=(paradigm,))
    run = _runs([load_model(out)], cohort, table, [spec], [base.seed])[0]
    return replace(run, split=replace(run.split, seed=base.seed), base_cohort=base.base_cohort,
                   base_columns=base.base_columns, shots=k)


def _evaluate(run: Run, opened, table: pd.DataFrame, specs: list[TaskSpec], paradigm: str, batch_size: int,
              calibration: Calibration | None):
    if paradigm == "single":
        return evaluate_single(run, opened, table, specs, batch_size, calibration)
    return evaluate_generated(run, opened, table, specs, batch_size, paradigm)


def _calibration(run: Run, opened, table: pd.DataFrame, specs: list[TaskSpec], paradigm: str, batch_size: int,
                 enabled: bool) -> tuple[Calibration | None, dict]:
    """The calibration a run decides with (module docstring) and how it was obtained, for ``evaluate.json``."""
    if paradigm != "single":
        return None, {"source": "not applicable (generated answers)"}
    if not enabled:
        return None, {"source": "off"}
    stored = Calibration.load(run.model.directory)
    if stored is not None:
        return stored, {"source": "stored", **stored.to_dict()}
    if run.trained:
        warnings.warn(f"{run.model.directory} has no {CALIBRATION_FILE} (trained before calibration existed): "
                      "fitting it now on its recorded training scans", FmrilmWarning, stacklevel=3)
        fitted = fit_calibration(run, opened, table, specs, batch_size)
        return fitted, {"source": "fitted at evaluation on the recorded training scans", **fitted.to_dict()}
    warnings.warn(f"{run.model.directory} has no {CALIBRATION_FILE} and was not trained on {opened.path}: its "
                  "answers are uncalibrated", FmrilmWarning, stacklevel=3)
    return None, {"source": "absent"}


# ------------------------------------------------------------------------------------------------ calibration
def calibrate_model(directory: str | os.PathLike, info: dict, method: str = "bias", batch_size: int = 8,
                    max_scans: int = MAX_SCANS) -> Calibration:
    """Fit a freshly trained Stage 3 model's class-prior calibration and write ``directory/calibration.json``.

    Parameters
    ----------
    directory : the model's files (``fmrilm instruct`` writes them before calling this; ``instruct.json`` may
        still be missing).
    info : its ``instruct.json`` record; every cohort in it calibrates the tasks it has labels for, on at most
        ``max_scans`` of its recorded training scans (never a test scan); the first cohort wins a task.
    method : "bias" or "mean" (:mod:`fmrilm.instruct.calibration`).
    batch_size : scans per forward pass.

    Returns
    -------
    Calibration, as saved.
    """
    from fmrilm.lm.pipeline import AlignedModel

    check_method(method)
    loaded = AlignedModel(directory)
    loaded.info = info
    fitted = []
    for entry in info["cohorts"]:
        with load_cohort(entry["path"]) as opened:
            table = opened.scan_phenotypes()
            specs = [s for s in check_tasks(info["tasks"]) if s.column in table.columns]
            run = _runs([loaded], opened.path, table, specs, [0])[0]
            fitted.append(fit_calibration(run, opened, table, specs, batch_size, method, max_scans))
    calibration = merge(fitted)
    calibration.save(directory)
    return calibration


# ------------------------------------------------------------------------------------------------ entry point
def run_evaluate(models: str | os.PathLike | Sequence[str | os.PathLike], cohort: str | os.PathLike,
                 out: str | os.PathLike, *, tasks: Sequence[str], paradigm: str = "single",
                 seeds: int | Sequence[int] = (0,), shots: Sequence[int] = (0,), budget_steps: int = 20,
                 method_name: str = "fmrilm", batch_size: int = 8, calibration: bool = True,
                 overwrite: bool = False) -> list[ResultRow]:
    """Evaluate Stage 3 models on a cohort and write ``out`` (see the module docstring).

    Parameters
    ----------
    models : one model directory, or several (e.g. one per training seed).
    cohort : a prepared cohort with the tasks' phenotype columns, on the models' atlas and length.
    out : results directory; an existing one is refused unless ``overwrite``.
    tasks : registry task names (``fmrilm.evaluate.protocol.TASKS``).
    paradigm : "single", "multi" or "open".
    seeds : split seeds for a cohort a model was not trained on (an int n means 0..n-1).
    shots : 0 evaluates the models as they are; k > 0 first fine-tunes each model on k labelled training scans
        of each task, balanced by label, for ``budget_steps`` optimizer steps (the run's seed picks them).
    method_name : the ``method`` of the result rows.
    batch_size : scans per forward pass.
    calibration : decide single answers on class-prior calibrated probabilities (the model's stored
        ``calibration.json``, fitted now on the recorded training scans when a model trained on the cohort has
        none); False: on the raw probabilities. Calibrated tasks also get ``"<method> (uncalibrated)"`` rows.

    Returns
    -------
    list of ResultRow, as written to ``out/results.json``.
    """
    specs = _check_tasks(tasks, paradigm)
    specs = [question_task(s) for s in specs] if paradigm == "multi" else specs  # as trained: bins for regression
    shots = _check_shots(shots)
    out = check_output_dir(out, overwrite)
    loaded = [load_model(m) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    if not loaded:
        raise FmrilmError("no model given; pass at least one Stage 3 model directory")
    with load_cohort(cohort) as opened, tempfile.TemporaryDirectory(prefix="fmrilm-fewshot-") as work:
        table = opened.scan_phenotypes()
        for model in loaded:
            _check_grid(opened.path, model.directory, model.preprocess)
        _check_phenotypes(table, specs, opened.path)
        base = _runs(loaded, opened.path, table, specs, seeds)
        runs, outcomes = [], []
        for k, run, asked in _jobs(base, specs, shots, seeds):
            if k > 0:  # one fine-tuned model at a time, released after use
                run, asked = _few_shot_run(run, opened.path, table, asked, k, paradigm, budget_steps, work), [asked]
            calibrated, how = _calibration(run, opened, table, asked, paradigm, batch_size, calibration)
            outcomes.append(_evaluate(run, opened, table, asked, paradigm, batch_size, calibrated))
            runs.append((replace(run, model=None), {**_run_record(run, table), "calibration": how}))
            shutil.rmtree(Path(work) / "model", ignore_errors=True)
        name = _cohort_name(opened)
    rows = _result_rows([r for r, _ in runs], [o[0] for o in outcomes], name, paradigm, method_name)
    settings = {"models": [str(m.directory) for m in loaded], "cohort": str(Path(cohort).resolve()),
                "tasks": [s.name for s in specs], "paradigm": paradigm, "method": method_name, "shots": shots,
                "budget_steps": budget_steps, "calibration": calibration, "runs": [record for _, record in runs]}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_results(tmp, rows)
        with open(tmp / PREDICTIONS_FILE, "w") as handle:
            for record in (rec for _, recs in outcomes for rec in recs):
                handle.write(json.dumps(record) + "\n")
        write_json_atomic(tmp / SETTINGS_FILE, settings)
    return rows


def _jobs(base: list[Run], specs: list[TaskSpec], shots: list[int], seeds) -> list[tuple[int, Run, object]]:
    """(k, run, tasks asked) to evaluate. k > 0 fine-tunes per task; on a cohort the model trained on (one
    recorded split) each of ``seeds`` draws its own k examples, so the few-shot cells still have several seeds."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    jobs = []
    for k, run in ((k, r) for k in shots for r in base):
        if k == 0:
            jobs.append((k, run, specs))
            continue
        runs = [replace(run, split=replace(run.split, seed=s)) for s in seed_list] if run.trained else [run]
        jobs += [(k, r, spec) for spec in specs for r in runs]
    return jobs


def _check_shots(shots: Sequence[int]) -> list[int]:
    chosen = sorted({int(k) for k in ([shots] if isinstance(shots, int) else shots)})
    if not chosen or chosen[0] < 0:
        raise FmrilmError(f"shots must be numbers of labelled scans >= 0 (0: no fine-tuning), got {shots!r}")
    return chosen


def _run_record(run: Run, table: pd.DataFrame) -> dict:
    subjects = table["subject_id"].astype(str)
    return {"model": run.model_label, "seed": run.seed, "trained_on_cohort": run.trained,
            "shots": run.shots, "test_subjects": sorted(set(subjects.iloc[list(run.split.test)])),
            "shot_scans": list(run.train_scans) if run.shots else None}


def _cohort_name(opened) -> str:
    """The most common dataset name of the scans (as in prompts), else the directory name."""
    names = opened.scans["dataset"].dropna().astype(str) if "dataset" in opened.scans else pd.Series([], dtype=str)
    return str(names.mode().iloc[0]) if len(names) else opened.path.name


def _result_rows(runs: list[Run], results: list[dict], cohort: str, paradigm: str, method: str) -> list[ResultRow]:
    """Per-run metric dicts grouped by (method, task, setting, shots) and aggregated over runs; the raw metrics
    of a calibrated task (``"uncalibrated"``) are rows of the method ``"<method> (uncalibrated)"``."""
    groups: dict[tuple, list[dict]] = {}
    for run, per_task in zip(runs, results):
        for task, metrics in per_task.items():
            names = [task] if task in TASKS else [t for t in per_task if t in TASKS]  # "overall": every field
            key = (task, *_setting(run, names))
            groups.setdefault((method, *key), []).append({k: v for k, v in metrics.items() if k != UNCALIBRATED})
            if UNCALIBRATED in metrics:
                groups.setdefault((method + RAW_SUFFIX, *key), []).append(metrics[UNCALIBRATED])
    return [row for (name, task, setting, shots), per_seed in groups.items()
            for row in rows_from_seeds(per_seed, method=name, cohort=cohort, task=task, paradigm=paradigm,
                                       setting=setting, shots=shots)]
