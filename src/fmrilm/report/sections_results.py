"""Report sections on the evaluation: results tables against the baselines, few-shot curves, ROC curves.

Results come from ``DIR/results.json`` (every row merged) or, when it is absent, from every
``DIR/evaluate/<cohort>/results.json`` and ``DIR/benchmark/results.json`` (schema: :mod:`fmrilm.evaluate.results`).

Per-scan predictions for the ROC curves are CSV or JSON-lines files named ``predictions*.csv`` /
``predictions*.jsonl`` in ``DIR/evaluate/<cohort>/`` or ``DIR/benchmark/`` (or a ``predictions/`` folder in
either), one row per test scan with ``y_true`` (binary class code: 1 = the positive class) and the positive-class
probability in ``score``, ``proba_1`` or ``proba`` (a list of class probabilities, as ``fmrilm evaluate``
writes); optional ``method`` (default: the ``method`` of ``evaluate.json`` beside the file, else "fmrilm"),
``task``, ``cohort`` (default: the folder name), ``shots`` (k-shot runs with k > 0 are left out; 0-shot curves are
labelled so) and ``seed`` (seeds are pooled into one curve). Rows without a probability (generated answers) are
skipped. When no such file exists, ``DIR/benchmark/plots/*roc*.png`` (written by ``fmrilm benchmark``) are shown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.evaluate.metrics import LOWER_IS_BETTER
from fmrilm.evaluate.results import LABELS, ResultRow, _cell, _marks, read_results
from fmrilm.report import figures
from fmrilm.report.common import RunDir, StageNotRun, esc, figure, table

FEW_SHOT_METRICS = ("accuracy", "auc", "balanced_accuracy", "f1", "mae", "pearson_r")
SCORE_COLUMNS = ("score", "proba_1", "proba")
MAX_FIGURES = 12


def result_files(run: RunDir) -> list[Path]:
    """``DIR/results.json`` when present, else every stage's results.json."""
    merged = run.path / "results.json"
    if merged.is_file():
        return [merged]
    files = sorted((run.path / "evaluate").glob("*/results.json"))
    return files + [p for p in [run.path / "benchmark" / "results.json"] if p.is_file()]


def result_rows(run: RunDir) -> list[ResultRow]:
    """Every results row of the run, or :class:`StageNotRun` when no stage wrote any."""
    files = result_files(run)
    rows = [row for path in files for row in read_results(path)]
    if not rows:
        raise StageNotRun("stage not run: no results.json in DIR, DIR/evaluate/<cohort>/ or DIR/benchmark/")
    return rows


def _html_table(rows: list[ResultRow]) -> str:
    """Methods x (task, metric) cells ``mean ± std``; best per column bold, second underlined."""
    methods = list(dict.fromkeys(r.method for r in rows))
    columns = list(dict.fromkeys((r.task, r.metric) for r in rows))
    cell = {(r.method, r.task, r.metric): r for r in rows}
    header = ["method"] + [f"{t} {LABELS.get(m, m)} {'↓' if m in LOWER_IS_BETTER else '↑'}" for t, m in columns]
    body = [[esc(m)] for m in methods]
    for task, metric in columns:
        found = [cell.get((m, task, metric)) for m in methods]
        marks = _marks([r.mean if r else float("nan") for r in found], metric)
        for line, row, mark in zip(body, found, marks):
            text = esc(_cell(row))
            line.append(f"<strong>{text}</strong>" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text)
    return table(header, body)


def _labelled(rows: Iterable[ResultRow]) -> list[ResultRow]:
    """Rows whose method names their paradigm when it is not plain supervised training, so fMRI-LM's rows
    ("fmrilm (single)") and the baselines' ("fc_logreg") share one table per cohort, setting and shots."""
    return [row if row.paradigm == "supervised" else replace(row, method=f"{row.method} ({row.paradigm})")
            for row in rows]


def _title(cohort: str, setting: str, shots: int | None) -> str:
    return f"{cohort} · {setting} · " + ("all training subjects" if shots is None else f"{shots}-shot")


def results_tables(run: RunDir) -> str:
    """One table per (cohort, setting, shots) with every method and paradigm, like the paper's Tables 3/4."""
    groups: dict[tuple, list[ResultRow]] = {}
    for row in _labelled(result_rows(run)):
        groups.setdefault((row.cohort, row.setting, row.shots), []).append(row)
    sources = ", ".join(esc(p.relative_to(run.path)) for p in result_files(run))
    parts = [f"<p>From {sources}. Mean ± SD over seeds (sample SD); <strong>best</strong> and <u>second best</u> "
             "per column; ↑ higher is better, ↓ lower is better. A method's paradigm follows its name unless it "
             "is plain supervised training.</p>"]
    for key, group in groups.items():
        seeds = ", ".join(str(s) for s in sorted({r.n_seeds for r in group}))
        parts.append(f"<h3>{esc(_title(*key))}</h3>" + _html_table(group) + f"<p class='small'>seeds per cell: {seeds}</p>")
    return "".join(parts)


def _pick_metric(rows: Iterable[ResultRow]) -> str | None:
    present = {r.metric for r in rows}
    return next((m for m in FEW_SHOT_METRICS if m in present), None)


def _few_shot_figure(cohort: str, task: str, group: list[ResultRow]) -> str | None:
    """Metric against shots for one (cohort, task), a line per method, or None without few-shot rows."""
    metric = _pick_metric(r for r in group if r.shots is not None)
    if metric is None:
        return None
    curves: dict[str, tuple[list, list, list]] = {}
    for r in sorted((r for r in group if r.metric == metric and r.shots is not None), key=lambda r: r.shots):
        k, mean, std = curves.setdefault(r.method, ([], [], []))
        k.append(r.shots), mean.append(r.mean), std.append(r.std)
    full = {r.method: r.mean for r in group if r.metric == metric and r.shots is None and math.isfinite(r.mean)}
    title = f"{cohort} · {task}"
    return figure(figures.few_shot(curves, full, LABELS.get(metric, metric), title), f"few-shot {title}")


def few_shot_curves(run: RunDir) -> str:
    """Metric against shots per method (dashed: the same method on all training subjects), per cohort and task."""
    groups: dict[tuple, list[ResultRow]] = {}
    for row in _labelled(result_rows(run)):
        groups.setdefault((row.cohort, row.task), []).append(row)
    parts = [f for key, group in groups.items() if (f := _few_shot_figure(*key, group)) is not None][:MAX_FIGURES]
    if not parts:
        raise StageNotRun("stage not run: no few-shot rows (shots set) in the results")
    return '<div class="row">' + "".join(parts) + "</div>"


def _read_predictions(path: Path) -> pd.DataFrame:
    table_ = pd.read_json(path, lines=True) if path.suffix == ".jsonl" else pd.read_csv(path)
    folder = path.parent.parent if path.parent.name == "predictions" else path.parent
    settings = folder / "evaluate.json"  # fmrilm evaluate's settings name the method its rows carry
    method = json.loads(settings.read_text()).get("method", "fmrilm") if settings.is_file() else "fmrilm"
    defaults = {"source": folder.name, "method": method, "task": "", "shots": np.nan}
    return table_.assign(**{k: v for k, v in defaults.items() if k not in table_.columns or k == "source"})


def _prediction_files(run: RunDir) -> list[Path]:
    bases = [*sorted((run.path / "evaluate").glob("*")), run.path / "benchmark"]
    found = []
    for base in bases:
        for folder, pattern in ((base, "predictions*"), (base / "predictions", "*")):
            found += sorted(folder.glob(f"{pattern}.csv")) + sorted(folder.glob(f"{pattern}.jsonl"))
    return list(dict.fromkeys(found))


def _positive_score(table_: pd.DataFrame) -> pd.Series | None:
    for column in SCORE_COLUMNS:
        if column in table_.columns:
            values = table_[column]
            if column == "proba":
                return values.map(lambda p: float(p[1]) if isinstance(p, (list, tuple)) and len(p) == 2 else np.nan)
            return pd.to_numeric(values, errors="coerce")
    return None


def _roc_points(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    return fpr, tpr, float(roc_auc_score(y, score))


def _curve_label(method: object, shots: object) -> str:
    return str(method) if pd.isna(shots) else f"{method} ({int(shots)}-shot)"


def _roc_figures(predictions: pd.DataFrame) -> list[str]:
    predictions = predictions.assign(score_=_positive_score(predictions))
    predictions = predictions[predictions["shots"].isna() | (predictions["shots"] == 0)]  # no k-shot fine-tunes
    cohort = predictions["cohort"] if "cohort" in predictions.columns else predictions["source"]
    parts = []
    for (name, task), group in predictions.groupby([cohort, "task"], sort=False):
        group = group.dropna(subset=["y_true", "score_"])
        curves = {}
        for (method, shots), rows in group.groupby(["method", "shots"], sort=False, dropna=False):
            y = rows["y_true"].to_numpy()
            if set(np.unique(y)) == {0, 1}:  # binary with both classes: otherwise no ROC exists
                curves[_curve_label(method, shots)] = _roc_points(y.astype(int), rows["score_"].to_numpy(float))
        if curves and len(parts) < MAX_FIGURES:
            parts.append(figure(figures.roc(curves, f"{name} · {task}"), f"ROC {name} {task}"))
    return parts


def roc_curves(run: RunDir) -> str:
    """ROC curves of binary tasks from saved per-scan predictions (or the benchmark's own ROC plots)."""
    files = _prediction_files(run)
    usable = [t for t in (_read_predictions(p) for p in files) if "y_true" in t.columns and _positive_score(t) is not None]
    parts = _roc_figures(pd.concat(usable, ignore_index=True)) if usable else []
    if parts:
        names = ", ".join(esc(p.relative_to(run.path)) for p in files)
        return f"<p>From {names}; seeds pooled; full training set and 0-shot runs.</p><div class='row'>" + "".join(parts) + "</div>"
    plots = sorted((run.path / "benchmark" / "plots").glob("*roc*.png"))
    if plots:
        return "<div class='row'>" + "".join(
            figure(figures.png_uri(p.read_bytes()), p.stem, str(p.relative_to(run.path))) for p in plots[:MAX_FIGURES]) + "</div>"
    raise StageNotRun("stage not run: no per-scan predictions of a binary task (predictions*.csv/jsonl) "
                      "in DIR/evaluate/<cohort>/ or DIR/benchmark/, and no benchmark/plots/*roc*.png")
