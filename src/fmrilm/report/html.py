"""``fmrilm report DIR``: one self-contained HTML page showing every stage of a run.

The page has inline CSS, figures as base64 PNG data URIs and no script, so it opens offline in any browser and
can be mailed as one file. Sections (in order): cohorts, functional connectivity, gradients, descriptor text of
an example scan, tokenizer reconstruction and codebook use, training curves, generated vs true descriptions,
results against the baselines, few-shot curves, ROC curves. A section whose stage did not run says so
("stage not run: ...") and the rest of the report is still written; a section whose inputs exist but cannot
be drawn shows the error and raises an :class:`~fmrilm.errors.FmrilmWarning` instead of losing the report.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from pathlib import Path
from typing import Callable

from fmrilm import __version__
from fmrilm.errors import FmrilmError, FmrilmWarning
from fmrilm.io import atomic_file
from fmrilm.report import sections_data, sections_models, sections_results
from fmrilm.report.common import RunDir, StageNotRun, esc, note, read_json

REPORT_FILE = "report.html"
SECTIONS: tuple[tuple[str, str, Callable[[RunDir], str]], ...] = (
    ("cohorts", "Cohorts", sections_data.cohort_summary),
    ("connectivity", "Functional connectivity", sections_data.connectivity),
    ("gradients", "Connectivity gradients", sections_data.gradients),
    ("descriptors", "Descriptor text of an example scan", sections_data.descriptor_text),
    ("tokenizer", "Tokenizer: reconstruction and codebook use", sections_models.tokenizer),
    ("training", "Training curves", sections_models.training_curves),
    ("generations", "Generated and true descriptions", sections_models.generations),
    ("results", "Results against baselines", sections_results.results_tables),
    ("few-shot", "Few-shot curves", sections_results.few_shot_curves),
    ("roc", "ROC curves", sections_results.roc_curves),
)
STATUS_TEXT = {"ok": "", "missing": "stage not run", "failed": "could not be drawn"}

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 1.2em 3em; color: #1d1d1f; }
h1 { margin-bottom: 0.1em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav ol { columns: 2; } nav .missing, nav .failed { color: #888; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } caption { font-weight: 600; text-align: left; }
figure { margin: 0.6em 1em 0.6em 0; display: inline-block; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figcaption { font-size: 12px; color: #555; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.4em 0.8em; }
.small, .meta { font-size: 12px; color: #555; }
blockquote { background: #f7f7f9; border-left: 4px solid #8aa; margin: 0.6em 0; padding: 0.5em 1em; }
pre { background: #f7f7f9; padding: 0.6em; overflow-x: auto; font-size: 12px; }
"""


def render_section(run: RunDir, key: str, title: str, build: Callable[[RunDir], str]) -> tuple[str, str]:
    """(status, HTML) of one section: status "ok", "missing" (stage not run) or "failed" (drawing raised)."""
    try:
        body, status = build(run), "ok"
    except StageNotRun as exc:
        body, status = note(str(exc)), "missing"
    except Exception as exc:  # a damaged input must not cost the rest of the report
        warnings.warn(f"report section '{title}' could not be drawn: {type(exc).__name__}: {exc}", FmrilmWarning)
        body, status = note(f"could not be drawn: {type(exc).__name__}: {exc}"), "failed"
    return status, f'<section id="{key}" data-status="{status}"><h2>{esc(title)}</h2>{body}</section>'


def _configuration(run: RunDir) -> str:
    """The run's resolved configuration (``config.resolved.json`` of ``fmrilm run``) when there is one."""
    try:
        config = read_json(run.path / "config.resolved.json")
    except StageNotRun:
        return ""
    return ('<section id="configuration" data-status="ok"><h2>Configuration</h2><details><summary>'
            f"config.resolved.json</summary><pre>{esc(json.dumps(config, indent=2))}</pre></details></section>")


def render_page(run: RunDir) -> tuple[str, dict[str, str]]:
    """(the report's HTML, {section key: status})."""
    rendered = {key: render_section(run, key, title, build) for key, title, build in SECTIONS}
    toc = "".join(f'<li class="{status}"><a href="#{key}">{esc(title)}</a>'
                  + (f" <span class='small'>({STATUS_TEXT[status]})</span>" if STATUS_TEXT[status] else "") + "</li>"
                  for (key, title, _), (status, _) in zip(SECTIONS, rendered.values()))
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(section for _, section in rendered.values()) + _configuration(run)
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>fmrilm report: {esc(run.path.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>fmrilm report</h1><p class='meta'>run <code>{esc(run.path.resolve())}</code> · fmrilm {esc(__version__)} · "
        f"written {created}</p><nav><ol>{toc}</ol></nav>{body}</body></html>\n"
    )
    return page, {key: status for key, (status, _) in rendered.items()}


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def build_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the HTML report of a run directory and return its path.

    Parameters
    ----------
    run_dir : the directory ``fmrilm run`` / ``fmrilm demo`` wrote (any subset of its stages).
    out : the HTML file to write; default ``run_dir/report.html``. Written through a temporary file and a rename.

    Returns
    -------
    Path of the written report.
    """
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise FmrilmError(f"run directory {run.path} does not exist; pass the --out of 'fmrilm run' or 'fmrilm demo'")
    target = Path(out) if out is not None else run.path / REPORT_FILE
    if not target.parent.is_dir():
        raise FmrilmError(f"cannot write {target}: folder {target.parent} does not exist; create it or choose another path")
    page, _ = render_page(run)
    _write_text_atomic(target, page)
    return target
