"""Benchmark streaming: peak memory of prepare, describe and tokenizer training at two cohort sizes.

Usage::

    nice -n 19 .venv/bin/python benchmarks/bench_stream.py --sizes 2000 20000 \\
        [--stages prepare describe tokenizer evaluate] [--jobs 2] [--workdir DIR] [--keep]

Scans are generated when prepare asks for them (seeded noise, 170 points at TR 2 s, 450 ROIs of the
Schaefer-400 + Tian-S3 ROI table so describe sees the real 8 networks, four sites), so no input files are
needed. Per size, every stage runs in a fresh process whose peak resident memory (``ru_maxrss``) is reported;
describe's worker processes (``--jobs``) are reported separately (the largest one). The stages chain in
``WORKDIR/<size>/``: prepare writes ``cohort`` ((S, 160, 450) float32 HDF5, 5.8 GB at 20,000 scans),
describe reads it and writes ``desc``, ``tokenizer`` trains on both for ``--max-steps`` steps with a tiny random
LLM for the descriptor-text features (``--llm tiny-llama``: the memory question is the data path, not the LLM)
and ``evaluate`` runs the held-out evaluation of that run's last checkpoint. Everything is deleted after the
last stage of a size unless ``--keep``; a later call with ``--workdir DIR`` and later ``--stages`` reuses kept
outputs. ``--texts-from SIZE`` lets the tokenizer stages of an undescribed size use the kept SIZE-scan describe
output's texts (cycled over the scans) and reference instead, said in the stage column. Streaming means the
peaks at the sizes are about equal. For throughput on real files see ``bench_prepare.py``; with
``--stages prepare`` alone the output is prepare's table as before.
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
STAGES = ("prepare", "describe", "tokenizer", "evaluate")
NEEDS = {"describe": "cohort", "tokenizer": "desc", "evaluate": "tok"}  # the output a stage reads


# ----------------------------------------------------------------------------------------------- stages (child)
def stage_prepare(size: int, work: Path, opts: dict) -> None:
    import numpy as np

    from fmrilm.data.atlas import Atlas, load_atlas
    from fmrilm.data.prepare import prepare_cohort
    from fmrilm.data.sources import ScanSource

    def scan(i: int):
        return lambda: 1000.0 + np.random.default_rng(i).standard_normal((N_TIME, N_ROIS))

    sources = [ScanSource(f"s{i:06d}", f"s{i:06d}", Path(f"s{i:06d}.npy"), scan(i), tr=2.0,
                          extra={"site": SITES[i % len(SITES)]}) for i in range(size)]
    rois = load_atlas("schaefer400_tian_s3", with_image=False).rois
    prepare_cohort(sources, Atlas("synthetic450", rois), work / "cohort").close()


def stage_describe(size: int, work: Path, opts: dict) -> None:
    from fmrilm.descriptors.pipeline import run_describe
    from fmrilm.descriptors.reference import DescribeConfig

    config = DescribeConfig(ica_components=opts["ica_components"])
    run_describe(work / "cohort", work / "desc", config=config, jobs=opts["jobs"])


def stage_tokenizer(size: int, work: Path, opts: dict) -> None:
    import torch

    from fmrilm.tokenizer.pipeline import run_train_tokenizer

    torch.set_num_threads(1)
    train = {"epochs": 1, "batch_size": opts["batch_size"], "max_steps": opts["max_steps"], "device": "cpu"}
    run_train_tokenizer(work / "cohort", work / "desc", work / "tok", preset="tiny", llm=opts["llm"], train=train)


def stage_evaluate(size: int, work: Path, opts: dict) -> None:
    """Held-out evaluation (what the tokenizer stage runs after its last epoch) of the newest checkpoint."""
    import torch
    from safetensors.torch import load_file

    from fmrilm.tokenizer import pipeline as stage
    from fmrilm.tokenizer.config import TokenizerConfig
    from fmrilm.tokenizer.evaluate import evaluate_tokenizer
    from fmrilm.tokenizer.model import FMRITokenizerForTraining
    from fmrilm.train import latest_checkpoint

    torch.set_num_threads(1)
    run = json.loads((work / "tok" / stage.RUN_FILE).read_text())
    inputs = stage.load_inputs(work / "cohort", work / "desc", run.get("text_fields", ["text"]))
    held = stage.split_subjects(inputs, run["held_out_fraction"])["held_out"]
    texts = {field: stage.field_texts(inputs, field) for field in run.get("text_fields", ["text"])}
    text = stage.encode_text_side(run["llm"], texts, work / "tok" / stage.CACHE_DIR, run["text_pooling"],
                                  run.get("text_depth", 1.0))  # the training run's cached features
    config = TokenizerConfig.from_dict(run["tokenizer_config"])
    networks = inputs.networks if config.contrast_pooling == "network" else None
    tracker = stage.ProgressTracker(FMRITokenizerForTraining(config, inputs.gradients, networks))
    weights = latest_checkpoint(work / "tok" / stage.TRAIN_DIR) / "model.safetensors"
    tracker.load_state_dict(load_file(str(weights)), strict=False)
    metrics = evaluate_tokenizer(tracker.model, inputs.cohort, held, text.features[held], text.eval_tokens)
    print(json.dumps({"n_held_out": metrics["n_held_out"]}), file=sys.stderr)


def child(stage: str, size: int, work: Path, opts: dict) -> None:
    start = time.perf_counter()
    globals()[f"stage_{stage}"](size, work, opts)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest waited-for child
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "worker_peak_rss_mib": workers}))


# ----------------------------------------------------------------------------------------------- driver
def borrow_texts(work: Path, source: Path) -> None:
    """Make ``work/desc`` from another size's describe output ``source``: its texts.jsonl records cycled over this
    cohort's scans (scan and subject ids replaced) and its reference. For the tokenizer stages when describing
    every scan does not fit the time at hand: the texts have the length of real ones."""
    import pandas as pd

    scans = pd.read_parquet(work / "cohort" / "scans.parquet", columns=["scan_id", "subject_id"])
    records = [json.loads(line) for line in (source / "texts.jsonl").read_text().splitlines() if line.strip()]
    tmp = work / "desc.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source / "reference", tmp / "reference")
    with open(tmp / "texts.jsonl", "w") as handle:
        for i, (scan_id, subject_id) in enumerate(scans.itertuples(index=False)):
            handle.write(json.dumps({**records[i % len(records)], "scan_id": scan_id, "subject_id": subject_id}) + "\n")
    tmp.rename(work / "desc")


def run(stage: str, size: int, work: Path, opts: dict) -> dict:
    needed = NEEDS.get(stage)
    if needed and not (work / needed).is_dir():
        sys.exit(f"stage {stage} needs {work / needed}: run the earlier stages first (with --keep and --workdir)")
    command = [sys.executable, __file__, "--child", stage, str(size), str(work), json.dumps(opts)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"stage {stage} at {size} scans failed:\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return {"stage": stage, "scans": size, "seconds": round(measured["seconds"], 1),
            "scans_per_s": round(size / measured["seconds"], 1), "peak_rss_mib": round(measured["peak_rss_mib"]),
            "worker_peak_rss_mib": round(measured["worker_peak_rss_mib"])}


def print_row(row: dict, prepare_only: bool) -> None:
    if prepare_only:  # the table this benchmark printed before it measured the later stages
        print(f"| {row['scans']} | {row['seconds']} | {row['scans_per_s']} | {row['peak_rss_mib']} |", flush=True)
        return
    workers = row["worker_peak_rss_mib"] if row["stage"] == "describe" else "-"
    print(f"| {row['stage']} | {row['scans']} | {row['seconds']} | {row['peak_rss_mib']} | {workers} |", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=["prepare"])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep each size's outputs (for later --stages)")
    parser.add_argument("--jobs", type=int, default=2, help="describe worker processes")
    parser.add_argument("--ica-components", type=int, default=20, help="describe's group ICA components")
    parser.add_argument("--llm", default="tiny-llama", help="LLM of the tokenizer's text features")
    parser.add_argument("--max-steps", type=int, default=50, help="tokenizer training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="tokenizer training batch")
    parser.add_argument("--texts-from", type=int, metavar="SIZE", help="tokenizer stages of a size not described: "
                        "use the (kept) SIZE-scan describe output's texts, cycled over the scans")
    return parser.parse_args()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), json.loads(sys.argv[5]))
        return
    args = parse_args()
    opts = {"jobs": args.jobs, "ica_components": args.ica_components, "llm": args.llm,
            "max_steps": args.max_steps, "batch_size": args.batch_size}
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmrilm-bench-stream-"))
    prepare_only = args.stages == ["prepare"]
    if prepare_only:
        print("| synthetic 450-ROI scans | prepare time (s) | scans/s | peak RSS (MiB) |\n|---|---|---|---|")
    else:
        print("| stage | scans | time (s) | peak RSS (MiB) | largest worker (MiB) |\n|---|---|---|---|---|")
    for size in args.sizes:
        work = workdir / str(size)
        work.mkdir(parents=True, exist_ok=True)
        borrowed = False
        for stage in [s for s in STAGES if s in args.stages]:
            if stage == "tokenizer" and args.texts_from and not (work / "desc").is_dir():
                borrow_texts(work, workdir / str(args.texts_from) / "desc")
                borrowed = True
            row = run(stage, size, work, opts)
            if borrowed:
                row["stage"] += f" (texts of the {args.texts_from}-scan describe)"
            print_row(row, prepare_only)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
