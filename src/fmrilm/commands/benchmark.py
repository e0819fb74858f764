"""``fmrilm benchmark``: baselines (and fMRI-LM's evaluated rows) on the same subject splits, as tables and plots."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fmrilm benchmark`` to the ``fmrilm`` parser."""
    p = sub.add_parser("benchmark", help="every method on the same subject splits: results tables, bars, few-shot "
                                         "and ROC curves (flags override the preset)")
    p.add_argument("--preset", default="quick", help="benchmark preset: quick, paper or a JSON file")
    p.add_argument("--cohorts", nargs="+", metavar="COHORT",
                   help="cohorts of the preset, simulation presets (ukb, adni, ...) or prepared cohort directories")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="keep only these tasks of every cohort")
    p.add_argument("--methods", nargs="+", metavar="METHOD",
                   help="fc_logreg fc_svm brainnetcnn bnt descriptor_mlp text_clf fmrilm")
    p.add_argument("--seeds", type=int, metavar="N", help="splits per task (seeds 0..N-1)")
    p.add_argument("--shots", type=int, nargs="*", metavar="K", help="few-shot sizes; no value = full data only")
    p.add_argument("--fmrilm-results", metavar="R", help="results.json of 'fmrilm evaluate' (rows of method fmrilm)")
    p.add_argument("--fmrilm-models", nargs="+", metavar="INST",
                   help="Stage 3 model directories to evaluate here (method fmrilm; one per training seed)")
    p.add_argument("--out", required=True, metavar="B", help="benchmark directory (an existing one with the same "
                                                             "configuration is resumed)")
    p.add_argument("--overwrite", action="store_true",
                   help="rerun into an existing directory with another configuration (cached cells are reused)")
    p.set_defaults(func=cmd_benchmark)


def cmd_benchmark(args: argparse.Namespace) -> None:
    from fmrilm.evaluate.benchmark import run_benchmark
    from fmrilm.evaluate.benchmark_config import resolve_config

    config = resolve_config(args.preset, cohorts=args.cohorts, tasks=args.tasks, methods=args.methods,
                            seeds=args.seeds, shots=args.shots, fmrilm_results=args.fmrilm_results,
                            fmrilm_models=args.fmrilm_models)
    run_benchmark(config, args.out, overwrite=args.overwrite, progress=lambda line: print(line, flush=True))
    print(f"tables: {args.out}/results.md; plots: {args.out}/plots/")
