"""Stage 3 quality on this CPU, end to end through the command line: the figures of issue #6's closing note.

Usage::

    .venv/bin/python benchmarks/bench_stage3.py --out /tmp/stage3 [--subjects 120] [--tokenizer random|quick]
        [--instruct-epochs 2] [--fewshot-seeds 2] [--budget-steps 5] [--threads 1]

Steps (each a ``fmrilm`` subcommand run in this process, timed): simulate a ``ukb`` cohort at 116 ROIs
(``schaefer100_tian_s1``), prepare, describe, Stage 1 (``--tokenizer quick``: ``train-tokenizer --preset quick
--llm smollm2-135m``; ``random``: an untrained tokenizer whose codebook is k-means initialised, P = 80), Stage 2
``align`` (SmolLM2-135M + LoRA, the stage's quick settings), Stage 3 ``instruct`` on sex and fluid-intelligence
level (single + multi paradigms), then ``evaluate``:

* single vs multi: held-out sex accuracy with held-out paraphrases, on the instruct run's test subjects; single
  answers are decided on class-prior calibrated probabilities (fitted on training scans at the end of instruct),
  the raw decision's accuracy / balanced accuracy / AUC are reported beside (``*_raw_vs_calibrated``); multi
  answers are generated, so they are not calibrated;
* the same test subjects for FC + logistic regression (``fc_logreg`` baseline) and the simulation's oracle;
* few-shot, same task new cohort: sex on a simulated ``adni`` cohort with 0, 2, 4, 10 shots (k-shot fine-tuning
  of ``--budget-steps`` steps; ``--fewshot-seeds`` choices of the k examples);
* few-shot, new task same cohort: ``age_group`` (3 classes, so k >= 3) with 0, 3, 6, 10 shots.

Prints one JSON summary (and writes it to ``OUT/summary.json``). Uses bf16 where the CPU has it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ATLAS = "schaefer100_tian_s1"


def _run(argv: list[str], times: dict, name: str) -> None:
    from fmrilm.cli import main

    start = time.perf_counter()
    code = main(argv)
    times[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] exit {code} in {times[name]} s", flush=True)
    if code != 0:
        raise SystemExit(f"step {name} failed: fmrilm {' '.join(argv)}")


def _random_tokenizer(out: Path, cohort: Path) -> None:
    from fmrilm.data.cohort import load_cohort
    from fmrilm.tokenizer import FMRITokenizer, load_preset

    torch.manual_seed(0)
    config = load_preset("tiny", n_rois=116, length=160, patch_size=80, codebook_size=64, codebook_dim=8)
    tokenizer = FMRITokenizer(config).train()
    with load_cohort(cohort) as opened:
        tokenizer({"x": torch.from_numpy(opened.timeseries[:8])})  # k-means initialises the codebook
    tokenizer.eval().save_pretrained(out)


def _rows(path: Path) -> list[dict]:
    return json.loads((path / "results.json").read_text())["rows"]


def _pick(rows: list[dict], task: str, metric: str = "accuracy", method: str = "fmrilm") -> dict:
    return {f"{r['setting']}/{r['shots']}": round(r["mean"], 3) if r["mean"] is not None else None
            for r in rows if r["task"] == task and r["metric"] == metric and r["method"] == method}


def _raw_and_calibrated(rows: list[dict], task: str) -> dict:
    """Calibrated (the decision) and uncalibrated accuracy, balanced accuracy and AUC of a task."""
    return {f"{name}_{metric}": _pick(rows, task, metric, method)
            for name, method in (("calibrated", "fmrilm"), ("raw", "fmrilm (uncalibrated)"))
            for metric in ("accuracy", "balanced_accuracy", "auc")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--subjects", type=int, default=120)
    p.add_argument("--tokenizer", choices=("random", "quick"), default="random")
    p.add_argument("--instruct-epochs", type=int, default=2)
    p.add_argument("--fewshot-seeds", type=int, default=2)
    p.add_argument("--budget-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out, times = args.out, {}
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    train = ["--precision", "bf16"] if bf16 else []
    raw, cohort, desc, tok, lm, inst = (out / n for n in ("raw", "cohort", "desc", "tok", "lm", "inst"))
    _run(["simulate", "--preset", "ukb", "--subjects", str(args.subjects), "--atlas", ATLAS, "--out", str(raw),
          "--overwrite"], times, "simulate")
    _run(["prepare", "--timeseries", str(raw / "timeseries"), "--phenotypes", str(raw / "participants.tsv"),
          "--atlas", ATLAS, "--out", str(cohort), "--overwrite"], times, "prepare")
    _run(["describe", str(cohort), "--out", str(desc), "--jobs", "2", "--overwrite"], times, "describe")
    if args.tokenizer == "quick":
        _run(["train-tokenizer", str(cohort), "--descriptors", str(desc), "--out", str(tok), "--preset", "quick",
              "--llm", "smollm2-135m", "--overwrite", *train], times, "train-tokenizer")
    else:
        start = time.perf_counter()
        _random_tokenizer(tok, cohort)
        times["random-tokenizer"] = round(time.perf_counter() - start, 1)
    _run(["align", str(cohort), "--tokenizer", str(tok), "--descriptors", str(desc), "--llm", "smollm2-135m",
          "--out", str(lm), "--overwrite", *train], times, "align")
    _run(["instruct", str(cohort), "--model", str(lm), "--tasks", "sex", "fluid_intelligence_level",
          "--paradigms", "single", "multi", "--epochs", str(args.instruct_epochs), "--out", str(inst), "--overwrite",
          *train], times, "instruct")
    tasks = ["sex", "fluid_intelligence_level"]
    for paradigm in ("single", "multi"):
        _run(["evaluate", "--model", str(inst), "--cohort", str(cohort), "--tasks", *tasks, "--paradigm", paradigm,
              "--out", str(out / f"eval_{paradigm}"), "--overwrite"], times, f"evaluate-{paradigm}")
    adni_raw, adni = out / "raw_adni", out / "cohort_adni"
    _run(["simulate", "--preset", "adni", "--subjects", "80", "--atlas", ATLAS, "--out", str(adni_raw), "--overwrite"],
         times, "simulate-adni")
    _run(["prepare", "--timeseries", str(adni_raw / "timeseries"), "--phenotypes", str(adni_raw / "participants.tsv"),
          "--atlas", ATLAS, "--out", str(adni), "--overwrite"], times, "prepare-adni")
    seeds = ["--seeds", *map(str, range(args.fewshot_seeds)), "--budget-steps", str(args.budget_steps)]
    _run(["evaluate", "--model", str(inst), "--cohort", str(adni), "--tasks", "sex", "--shots", "0", "2", "4", "10",
          *seeds, "--out", str(out / "eval_fewshot_adni"), "--overwrite"], times, "evaluate-fewshot-new-cohort")
    _run(["evaluate", "--model", str(inst), "--cohort", str(cohort), "--tasks", "age_group", "--shots", "0", "3", "6",
          "10", *seeds, "--out", str(out / "eval_fewshot_newtask"), "--overwrite"], times, "evaluate-fewshot-new-task")
    print(json.dumps(summarize(out, times), indent=1))


def summarize(out: Path, times: dict) -> dict:
    """Sex accuracy of fMRI-LM (single, multi), FC + logistic regression and the oracle on the same subjects."""
    from fmrilm.evaluate.baselines import run_baseline
    from fmrilm.evaluate.protocol import Split

    info = json.loads((out / "inst" / "instruct.json").read_text())
    split = Split.from_dict(info["cohorts"][0]["split"])
    baseline = run_baseline("fc_logreg", out / "cohort", "sex", split)
    oracle = json.loads((out / "raw" / "simulation.json").read_text())["oracle"]
    summary = {
        "seconds": times, "n_test_subjects": len(split.test),
        "sex_accuracy": {"fmrilm_single": _pick(_rows(out / "eval_single"), "sex"),
                         "fmrilm_multi": _pick(_rows(out / "eval_multi"), "sex"),
                         "fc_logreg": round(baseline["accuracy"], 3), "oracle": oracle.get("sex")},
        "sex_single_raw_vs_calibrated": _raw_and_calibrated(_rows(out / "eval_single"), "sex"),
        "fewshot_new_cohort_sex_raw_vs_calibrated": _raw_and_calibrated(_rows(out / "eval_fewshot_adni"), "sex"),
        "fluid_intelligence_level_accuracy": {"single": _pick(_rows(out / "eval_single"), "fluid_intelligence_level"),
                                              "multi": _pick(_rows(out / "eval_multi"), "fluid_intelligence_level")},
        "fewshot_new_cohort_sex_balanced_accuracy": _pick(_rows(out / "eval_fewshot_adni"), "sex", "balanced_accuracy"),
        "fewshot_new_task_age_group_balanced_accuracy": _pick(_rows(out / "eval_fewshot_newtask"), "age_group",
                                                              "balanced_accuracy"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
