"""The documentation works as written: docs/cli.md is what the parser gives, the Python API examples of
docs/api.md run, the bring-your-own-data walkthrough of docs/byod.md runs end to end, and every module the
architecture page names exists.

Code blocks are run in order in an empty folder that has a ``.venv`` link to this checkout's environment.
``.venv/bin/fmrilm ARGS`` lines are run in this process through :func:`fmrilm.cli.main` (the console script's
own entry point; shell globs expanded as bash would) to spare an interpreter start per command; other shell
lines run in bash; ``python`` blocks are executed as scripts (those of api.md as one session, like a notebook). Blocks fenced as ``text`` are not run.
"""

from __future__ import annotations

import glob
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fmrilm.cli import main
from fmrilm.data.cohort import load_cohort
from fmrilm.report.cli_docs import cli_markdown

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, code) of every ``bash`` and ``python`` fenced block, in order."""
    return re.findall(r"^```(bash|python)\n(.*?)^```", path.read_text(), re.S | re.M)


def shell_commands(code: str) -> list[str]:
    """The commands of a bash block, backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def run_command(command: str, cwd: Path) -> None:
    words = shlex.split(command)
    if words[0] != ".venv/bin/fmrilm":
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=cwd, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}: {done.stderr}"
        return
    args = [a for w in words[1:] for a in (sorted(glob.glob(w, root_dir=cwd)) if glob.has_magic(w) else [w])]
    assert main(args) == 0, f"{command} failed"


def run_document(path: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch, session: bool = False) -> None:
    """Run every bash and python block of a document in order inside ``cwd``; with ``session`` the python blocks
    share one namespace (a notebook-like page), otherwise each runs as a script of its own."""
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    monkeypatch.chdir(cwd)
    shared = {"__name__": "__main__"}
    for i, (language, code) in enumerate(code_blocks(path)):
        if language == "python":
            exec(compile(code, f"{path.name} block {i}", "exec"), shared if session else {"__name__": "__main__"})
        else:
            for command in shell_commands(code):
                run_command(command, cwd)


# --------------------------------------------------------------------------------------------- cli.md
def test_cli_reference_is_up_to_date():
    assert (DOCS / "cli.md").read_text() == cli_markdown(), (
        "docs/cli.md differs from the parser: regenerate it with .venv/bin/python -m fmrilm.report.cli_docs")


def test_cli_reference_lists_every_subcommand_and_option():
    text = cli_markdown()
    for command in ("prepare", "describe", "train-tokenizer", "align", "demo", "report"):
        assert f"## fmrilm {command}\n" in text
    assert "| `--atlas` | `ATLAS` | `schaefer400_tian_s3` |" in text and "&lt;subject_id&gt;" in text


def test_shell_commands_join_continuations():
    assert shell_commands("# c\na --x \\\n    --y\n\nb\n") == ["a --x --y", "b"]


# ---------------------------------------------------------------------------------------- architecture
@pytest.mark.parametrize("page", ["architecture.md", "api.md"])
def test_docs_name_only_existing_modules_and_functions(page):
    named = set(re.findall(r"`(fmrilm(?:\.\w+)+)`", (DOCS / page).read_text()))
    assert len(named) > 10
    for module in named:
        parts = module.split(".")
        path = ROOT / "src" / Path(*parts)
        assert path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or _attribute(parts), module


def _attribute(parts: list[str]) -> bool:
    """True when ``a.b.c`` names an attribute c of the existing module a.b."""
    import importlib

    try:
        return hasattr(importlib.import_module(".".join(parts[:-1])), parts[-1])
    except ImportError:
        return False


# --------------------------------------------------------------------------------------------- api.md
@pytest.mark.slow
@pytest.mark.needs_atlas
def test_api_examples_run(tmp_path, monkeypatch):
    run_document(DOCS / "api.md", tmp_path, monkeypatch, session=True)
    page = (tmp_path / "api_run" / "report.html").read_text()
    statuses = dict(re.findall(r'<section id="([^"]+)" data-status="([^"]+)"', page))
    assert statuses.pop("few-shot") == "missing"  # the page runs no few-shot baselines
    assert set(statuses.values()) == {"ok"}, statuses


# -------------------------------------------------------------------------------------------- byod.md
@pytest.mark.slow
@pytest.mark.needs_atlas
def test_bring_your_own_data_walkthrough(tmp_path, monkeypatch):
    run_document(DOCS / "byod.md", tmp_path, monkeypatch)
    with load_cohort(tmp_path / "my_cohort") as cohort, load_cohort(tmp_path / "my_atlas_cohort") as own:
        assert cohort.timeseries.shape == (12, 160, 116)
        np.testing.assert_allclose(own.timeseries[:], cohort.timeseries[:], atol=1e-5)  # same series, own ROI table
        reference = {s: cohort.scan(i) for i, s in enumerate(cohort.scans["subject_id"])}
    for name, min_r in (("nifti_cohort", 0.95), ("bids_cohort", 0.8)):  # motion regression changes a little
        with load_cohort(tmp_path / name) as painted:
            assert len(painted) == 3
            for i, subject in enumerate(painted.scans["subject_id"]):
                x, y = painted.scan(i), reference[subject]
                r = [np.corrcoef(x[:, j], y[:, j])[0, 1] for j in range(x.shape[1]) if x[:, j].std() > 0]
                assert len(r) >= 100 and np.median(r) > min_r, (name, subject, np.median(r))
    assert len((tmp_path / "my_desc" / "texts.jsonl").read_text().splitlines()) == 12
