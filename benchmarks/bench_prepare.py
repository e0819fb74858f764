"""Benchmark ``fmrilm prepare``: throughput (scans/s) and peak memory at two cohort sizes.

Usage::

    .venv/bin/python benchmarks/bench_prepare.py --sizes 500 2000 [--atlas schaefer400_tian_s3] [--workdir DIR]

Each size is simulated once (``fmrilm simulate --preset ukb``, 450 ROIs at native TRs 0.72-3 s), then prepared
in a fresh process whose peak resident memory (ru_maxrss) is reported, so the sizes do not share a heap.
Memory must stay flat: scans are streamed one at a time into the chunked HDF5 store.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(raw: str, out: str, atlas: str) -> None:
    from fmrilm.cli import main

    start = time.perf_counter()
    code = main(["prepare", "--timeseries", f"{raw}/timeseries", "--phenotypes", f"{raw}/participants.tsv",
                 "--atlas", atlas, "--out", out, "--overwrite"])
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"code": code, "seconds": seconds, "peak_rss_mib": peak_mib}))


def run(size: int, atlas: str, workdir: Path) -> dict:
    from fmrilm.data.simulate import simulate_cohort

    raw = workdir / f"raw_{size}"
    start = time.perf_counter()
    if not (raw / "participants.tsv").exists():
        simulate_cohort("ukb", size, 0, raw, atlas=atlas, overwrite=True)
    simulate_seconds = time.perf_counter() - start
    result = subprocess.run([sys.executable, __file__, "--child", str(raw), str(workdir / f"cohort_{size}"), atlas],
                            capture_output=True, text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"scans": size, "atlas": atlas, "simulate_s": round(simulate_seconds, 1), "prepare_s": round(measured["seconds"], 1),
            "scans_per_s": round(size / measured["seconds"], 1), "peak_rss_mib": round(measured["peak_rss_mib"])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--atlas", default="schaefer400_tian_s3")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmrilm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print("| scans | atlas | prepare time (s) | scans/s | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        row = run(size, args.atlas, workdir)
        print(f"| {row['scans']} | {row['atlas']} | {row['prepare_s']} | {row['scans_per_s']} | {row['peak_rss_mib']} |", flush=True)


if __name__ == "__main__":
    main()
