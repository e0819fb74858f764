"""What every report section shares: the run-directory layout and small HTML builders.

The run directory is the one ``fmrilm run`` / ``fmrilm demo`` writes::

    DIR/cohorts/<name>/        prepared cohorts (meta.json marks a complete one)
    DIR/raw/<name>/            the simulated inputs they came from
    DIR/descriptors/<name>/    Stage 0 output per cohort (texts.jsonl, descriptors_z.parquet, reference/)
    DIR/tokenizer/             Stage 1 (tokenizer_meta.json marks a finished run; eval.json; train/metrics.jsonl)
    DIR/lm/                    Stage 2 (align_meta.json marks a finished run; eval.json; train/metrics.jsonl)
    DIR/instruct/              Stage 3 (train/metrics.jsonl; eval.json when present)
    DIR/evaluate/<cohort>/     results.json, predictions.csv / predictions.jsonl
    DIR/benchmark/             results.json, predictions, plots/
    DIR/results.json           every results row merged
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

STAGE_MARKERS = {"tokenizer": "tokenizer_meta.json", "lm": "align_meta.json"}
TRAINED_STAGES = ("tokenizer", "lm", "instruct")


class StageNotRun(Exception):
    """A section's inputs are missing: the section says so instead of failing the report."""


class RunDir:
    """Locates the outputs of each stage inside a run directory (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def cohorts(self) -> list[tuple[str, Path]]:
        """(name, directory) of every complete cohort, by name."""
        root = self.path / "cohorts"
        return [(p.name, p) for p in sorted(root.iterdir()) if (p / "meta.json").is_file()] if root.is_dir() else []

    def descriptors(self) -> list[tuple[str, Path]]:
        """(cohort name, DESC directory) of every complete describe output, by name."""
        root = self.path / "descriptors"
        if not root.is_dir():
            return []
        return [(p.name, p) for p in sorted(root.iterdir()) if (p / "texts.jsonl").is_file() and (p / "meta.json").is_file()]

    def stage(self, name: str, what: str) -> Path:
        """The finished output of a trained stage, or :class:`StageNotRun` naming what is missing."""
        path = self.path / name
        marker = STAGE_MARKERS.get(name)
        if not path.is_dir() or (marker and not (path / marker).is_file()):
            raise StageNotRun(f"stage not run: no finished {what} in {path}")
        return path

    def cohort_path(self, recorded: str | None, name: str | None = None) -> Path:
        """A cohort a stage recorded by absolute path, or, when the run folder moved, the run's cohort named
        ``name`` (default: the recorded folder's name)."""
        if recorded and (Path(recorded) / "meta.json").is_file():
            return Path(recorded)
        name = name or (Path(recorded).name if recorded else None)
        for cohort_name, path in self.cohorts():
            if cohort_name == name:
                return path
        raise StageNotRun(f"the cohort {recorded} is gone and DIR/cohorts has no cohort named {name}")


def read_json(path: Path) -> dict:
    """A JSON file, or :class:`StageNotRun` naming it when it does not exist."""
    if not path.is_file():
        raise StageNotRun(f"stage not run: {path} does not exist")
    return json.loads(path.read_text())


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def esc(value: object) -> str:
    """HTML-escaped text of any value."""
    return html.escape(str(value))


def number(value: object, digits: int = 3) -> str:
    """A table cell for a number (fixed decimals) or any other value; None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return esc(value)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], caption: str | None = None) -> str:
    """An HTML table; ``header`` is escaped here, cells must already be HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metrics_table(metrics: dict, keys: Sequence[str] | None = None) -> str:
    """A two-column table of the numeric entries of a metrics dict."""
    keys = keys or [k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return table(["metric", "value"], [[esc(k), number(metrics.get(k))] for k in keys if k in metrics])


def figure(uri: str, alt: str, caption: str = "") -> str:
    """An embedded figure with alt text and an optional caption."""
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="{uri}" alt="{esc(alt)}">{cap}</figure>'


def note(text: str) -> str:
    """A plain notice (used for missing stages)."""
    return f'<p class="note">{esc(text)}</p>'
