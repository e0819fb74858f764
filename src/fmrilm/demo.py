"""``fmrilm demo``: the whole pipeline on simulated cohorts and the real HCP sample.

The demo is ``fmrilm run`` with a demo preset (``fmrilm/presets/run/quick.json`` or ``standard.json``): the same
outputs, the same skipping of up-to-date stages when run again, and ``DIR/report.html`` at the end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fmrilm.errors import FmrilmError

DEMO_PRESETS = ("quick", "standard")


def run_demo(out: str | os.PathLike = "fmrilm-demo", preset: str = "quick", overwrite: bool = False,
             sets: list[str] = ()) -> dict[str, str]:
    """Run the demo preset into ``out`` and print where its results are.

    Parameters
    ----------
    out
        Run folder; a second call with the same preset skips every finished stage.
    preset
        ``quick`` (under 15 minutes on a 2-core CPU) or ``standard`` (under 60).
    overwrite
        Allow ``out`` to hold a run made with other settings (the stages they change are rerun).
    sets
        ``key=value`` overrides as for ``fmrilm run --set``.

    Returns
    -------
    dict
        ``{unit name: "ran" | "skipped"}`` (:func:`fmrilm.run.run_pipeline`).
    """
    from fmrilm.run import load_config, run_pipeline

    if preset not in DEMO_PRESETS:
        raise FmrilmError(f"unknown demo preset {preset!r}; choose one of {', '.join(DEMO_PRESETS)}")
    status = run_pipeline(load_config(preset, list(sets)), out, overwrite=overwrite)
    _print_example(Path(out))
    return status


def _print_example(out: Path) -> None:
    """The descriptor text of one real scan, and where the report is."""
    texts = sorted(out.glob("descriptors/*/texts.jsonl"), key=lambda p: p.parent.name != "hcp")
    if texts:
        record = json.loads(texts[0].read_text().splitlines()[0])
        print(f"example description ({texts[0].parent.name}, scan {record.get('scan_id')}):\n"
              f"{record.get('text', '')[:600]} ...")
    report = out / "report.html"
    print(f"report: {report}" if report.is_file() else f"outputs in {out} (no report.html yet)")
