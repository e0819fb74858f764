"""The shared results schema and its tables.

``results.json``::

    {"rows": [{"method", "cohort", "task", "paradigm", "setting", "shots", "metric", "mean", "std", "n_seeds"}]}

one row per (method, cohort, task, paradigm, setting, shots, metric), aggregated over seeds
(:func:`fmrilm.evaluate.metrics.aggregate`: sample SD, ddof = 1). ``shots`` is null for the full training set.

``results.md`` lays the rows out like the paper's Tables 3/4: one table per (cohort, paradigm, setting,
shots), rows = methods, columns = task x metric, cells ``mean ± std`` with three decimals. In each column
the best value is **bold** and the second best <u>underlined</u> (higher is better except MAE-like metrics);
ranks use the values as displayed, so equal cells share a mark. Few-shot curves follow: for each (cohort, paradigm,
setting) scored at two or more k (0, 2, 4, 10 shots...), one line per (method, task, metric), one column per k.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.metrics import LOWER_IS_BETTER, aggregate

JSON_FILE, MARKDOWN_FILE = "results.json", "results.md"
LABELS = {"accuracy": "ACC", "balanced_accuracy": "BACC", "auc": "AUC", "f1": "F1", "mae": "MAE", "pearson_r": "r"}
DECIMALS = 3


@dataclass(frozen=True)
class ResultRow:
    """One aggregated number of a results table (see the module docstring)."""

    method: str
    cohort: str
    task: str
    paradigm: str
    setting: str
    shots: int | None
    metric: str
    mean: float
    std: float
    n_seeds: int

    @classmethod
    def from_dict(cls, record: Mapping) -> "ResultRow":
        missing = [f.name for f in fields(cls) if f.name not in record]
        if missing:
            raise FmrilmError(f"result row {dict(record)} lacks {', '.join(missing)}")
        return cls(**{f.name: record[f.name] for f in fields(cls)})


def rows_from_seeds(per_seed: Iterable[Mapping[str, float]], *, method: str, cohort: str, task: str,
                    paradigm: str = "supervised", setting: str = "full", shots: int | None = None) -> list[ResultRow]:
    """Aggregate per-seed metric dicts (one per split) into one :class:`ResultRow` per metric."""
    return [ResultRow(method, cohort, task, paradigm, setting, shots, metric, s["mean"], s["std"], s["n_seeds"])
            for metric, s in aggregate(per_seed).items()]


def _json_number(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)  # JSON has no NaN


def write_results(path_dir: str | Path, rows: Iterable[ResultRow]) -> Path:
    """Write ``results.json`` and ``results.md`` into ``path_dir`` (created if needed) and return it."""
    rows = list(rows)
    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = [asdict(r) | {"mean": _json_number(r.mean), "std": _json_number(r.std)} for r in rows]
    (out / JSON_FILE).write_text(json.dumps({"rows": records}, indent=1) + "\n")
    (out / MARKDOWN_FILE).write_text(markdown_tables(rows))
    return out


def read_results(path: str | Path) -> list[ResultRow]:
    """Rows of a ``results.json`` (or of the directory holding one)."""
    path = Path(path)
    path = path / JSON_FILE if path.is_dir() else path
    if not path.is_file():
        raise FmrilmError(f"{path} does not exist; write it with write_results")
    rows = [ResultRow.from_dict(r) for r in json.loads(path.read_text())["rows"]]
    return [r if r.mean is not None else _nan_row(r) for r in rows]


def _nan_row(row: ResultRow) -> ResultRow:
    return ResultRow(**(asdict(row) | {"mean": float("nan"), "std": float("nan") if row.std is None else row.std}))


def _title(cohort: str, paradigm: str, setting: str, shots: int | None) -> str:
    return f"{cohort} · {paradigm} · {setting} · " + ("all training subjects" if shots is None else f"{shots}-shot")


def _cell(row: ResultRow | None) -> str:
    if row is None or not math.isfinite(row.mean):
        return "–"
    return f"{row.mean:.{DECIMALS}f} ± {row.std:.{DECIMALS}f}"


def _marks(values: Sequence[float], metric: str) -> list[str]:
    """'best', 'second' or '' per value: dense ranking of the displayed values in the metric's direction."""
    shown = [round(v, DECIMALS) if math.isfinite(v) else None for v in values]
    ranked = sorted({v for v in shown if v is not None}, reverse=metric not in LOWER_IS_BETTER)
    return ["best" if ranked and v == ranked[0] else "second" if len(ranked) > 1 and v == ranked[1] else ""
            for v in shown]


def _table(rows: list[ResultRow]) -> list[str]:
    """Markdown lines of one table: methods x (task, metric)."""
    methods = list(dict.fromkeys(r.method for r in rows))
    columns = list(dict.fromkeys((r.task, r.metric) for r in rows))
    cell = {(r.method, r.task, r.metric): r for r in rows}
    header = ["Method"] + [f"{t} {LABELS.get(m, m)} {'↓' if m in LOWER_IS_BETTER else '↑'}" for t, m in columns]
    body = [[m] for m in methods]
    for task, metric in columns:
        found = [cell.get((m, task, metric)) for m in methods]
        marks = _marks([r.mean if r else float("nan") for r in found], metric)
        for line, row, mark in zip(body, found, marks):
            text = _cell(row)
            line.append(f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(line) + " |" for line in body]


def _curves(rows: list[ResultRow]) -> list[str]:
    """Markdown lines of the few-shot curves: per (cohort, paradigm, setting) with two or more k-shot values,
    one line per (method, task, metric) and one column per k."""
    groups: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        if row.shots is not None:
            groups.setdefault((row.cohort, row.paradigm, row.setting), []).append(row)
    lines = []
    for (cohort, paradigm, setting), group in groups.items():
        shots = sorted({r.shots for r in group})
        if len(shots) < 2:
            continue
        cell = {(r.method, r.task, r.metric, r.shots): r for r in group}
        header = ["Method", "Task", "Metric", *(f"{k}-shot" for k in shots)]
        lines += [f"## {cohort} · {paradigm} · {setting} · few-shot curve", "", "| " + " | ".join(header) + " |",
                  "|" + "---|" * len(header)]
        for method, task, metric in dict.fromkeys((r.method, r.task, r.metric) for r in group):
            cells = [_cell(cell.get((method, task, metric, k))) for k in shots]
            lines.append("| " + " | ".join([method, task, LABELS.get(metric, metric), *cells]) + " |")
        lines.append("")
    return lines


def markdown_tables(rows: Iterable[ResultRow]) -> str:
    """The text of ``results.md``: one table per (cohort, paradigm, setting, shots), in order of appearance, then
    the few-shot curves (metrics over k) of every (cohort, paradigm, setting) scored at two or more k."""
    rows = list(rows)
    groups: dict[tuple, list[ResultRow]] = {}
    for row in rows:
        groups.setdefault((row.cohort, row.paradigm, row.setting, row.shots), []).append(row)
    lines = ["# Results", "", "Mean ± SD over seeds (sample SD). **Best**, <u>second best</u> per column; "
             "↑ higher is better, ↓ lower is better.", ""]
    for key, group in groups.items():
        seeds = sorted({r.n_seeds for r in group})
        lines += [f"## {_title(*key)}", "", *_table(group), "", f"Seeds per cell: {', '.join(map(str, seeds))}.", ""]
    return "\n".join(lines + _curves(rows))
