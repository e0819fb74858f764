"""``fmrilm demo``: the main job. Today it runs the data stages and Stage 0 end to end; later stages join as
they land."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fmrilm.io import check_output_dir

# Subjects per simulated cohort and the atlas each preset uses (quick fits a 2-core CPU in minutes).
PRESETS = {
    "quick": {"subjects": 200, "atlas": "schaefer100_tian_s1", "cohorts": {"ukb": "sex", "adni": "diagnosis"}},
    "standard": {"subjects": 400, "atlas": "schaefer400_tian_s3",
                 "cohorts": {"ukb": "sex", "hcp_aging": "sex", "adni": "diagnosis", "abide2": "diagnosis"}},
}


def _step(message: str, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.1f} s] {message}", flush=True)


def run_demo(out: str | Path, preset: str = "quick", overwrite: bool = False) -> Path:
    """Simulate cohorts, prepare them and the real HCP sample, and print their summaries."""
    from fmrilm.data.cohort import describe_cohort
    from fmrilm.data.ingest import prepare_from_args, prepare_hcp_sample
    from fmrilm.data.simulate import simulate_cohort
    from fmrilm.descriptors.check import run_check
    from fmrilm.descriptors.pipeline import run_describe
    from fmrilm.descriptors.reference import DescribeConfig

    out = check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    settings, start = PRESETS[preset], time.perf_counter()
    for name, target in settings["cohorts"].items():
        raw, cohort_dir = out / "raw" / name, out / "cohorts" / name
        _step(f"simulating {settings['subjects']} {name} subjects", start)
        simulate_cohort(name, settings["subjects"], 0, raw, atlas=settings["atlas"], overwrite=True)
        _step(f"preparing {name}", start)
        args = _prepare_args(raw, cohort_dir, settings["atlas"])
        with prepare_from_args(args) as cohort:
            print(describe_cohort(cohort))
        _step(f"describing {name} (Stage 0)", start)
        run_describe(cohort_dir, out / "descriptors" / name, jobs=2, overwrite=True)
        table, missed = run_check(out / "descriptors" / name, cohort_dir, target, simulation=raw / "simulation.json")
        print(f"descriptor check, target {target} (planted domains that missed: {missed or 'none'})\n{table}")
    _step("preparing the real HCP sample", start)
    with prepare_hcp_sample(out / "cohorts" / "hcp", overwrite=True) as cohort:
        print(describe_cohort(cohort))
    _step("describing the real HCP sample (7 scans: 5 ICA components)", start)
    run_describe(out / "cohorts" / "hcp", out / "descriptors" / "hcp", config=DescribeConfig(ica_components=5), overwrite=True)
    print((out / "descriptors" / "hcp" / "texts.jsonl").read_text().splitlines()[0][:600] + " ...")
    _step(f"done: cohorts in {out / 'cohorts'}", start)
    return out


def _prepare_args(raw: Path, out: Path, atlas: str) -> argparse.Namespace:
    from fmrilm.cli import build_parser

    argv = ["prepare", "--timeseries", str(raw / "timeseries"), "--phenotypes", str(raw / "participants.tsv"),
            "--atlas", atlas, "--out", str(out), "--overwrite"]
    return build_parser().parse_args(argv)
