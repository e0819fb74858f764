"""Benchmark streaming in ``prepare``: peak memory at two cohort sizes of synthetic 450-ROI scans.

Usage::

    nice -n 19 .venv/bin/python benchmarks/bench_stream.py --sizes 2000 20000 [--workdir DIR]

Scans are generated when prepare asks for them (seeded noise, 170 points at TR 2 s, 450 ROIs, four sites), so
no input files are needed and the figure is prepare's own memory: reading, standardizing, the site-variance
pass and the (S, 160, 450) float32 HDF5 store (5.8 GB at 20,000 scans, deleted afterwards). Each size runs in a
fresh process whose peak resident memory (ru_maxrss) is reported. Streaming means the two peaks are about equal.
For throughput on real files see ``bench_prepare.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_ROIS, N_TIME, SITES = 450, 170, ("A", "B", "C", "D")


def child(size: int, out: str) -> None:
    import numpy as np

    from fmrilm.data.atlas import Atlas, roi_table
    from fmrilm.data.prepare import prepare_cohort
    from fmrilm.data.sources import ScanSource

    def scan(i: int):
        return lambda: 1000.0 + np.random.default_rng(i).standard_normal((N_TIME, N_ROIS))

    sources = [ScanSource(f"s{i:06d}", f"s{i:06d}", Path(f"s{i:06d}.npy"), scan(i), tr=2.0,
                          extra={"site": SITES[i % len(SITES)]}) for i in range(size)]
    atlas = Atlas("synthetic450", roi_table([f"roi{j}" for j in range(N_ROIS)]))
    start = time.perf_counter()
    prepare_cohort(sources, atlas, out).close()
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak_mib}))


def run(size: int, workdir: Path) -> dict:
    out = workdir / f"cohort_{size}"
    result = subprocess.run([sys.executable, __file__, "--child", str(size), str(out)], capture_output=True, text=True,
                            check=True)
    shutil.rmtree(out, ignore_errors=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"scans": size, "prepare_s": round(measured["seconds"], 1), "scans_per_s": round(size / measured["seconds"], 1),
            "peak_rss_mib": round(measured["peak_rss_mib"])}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmrilm-bench-stream-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print("| synthetic 450-ROI scans | prepare time (s) | scans/s | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for size in args.sizes:
        row = run(size, workdir)
        print(f"| {row['scans']} | {row['prepare_s']} | {row['scans_per_s']} | {row['peak_rss_mib']} |", flush=True)


if __name__ == "__main__":
    main()
