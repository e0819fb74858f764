"""``fmrilm evaluate``: score Stage 3 models on a cohort (:func:`fmrilm.instruct.evaluate.run_evaluate`)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fmrilm evaluate`` to the ``fmrilm`` parser."""
    p = sub.add_parser("evaluate", help="Stage 3: answer questions about held-out subjects and score them like the "
                       "paper's tables (results.json, results.md, predictions.jsonl)")
    p.add_argument("--model", required=True, nargs="+", metavar="INST",
                   help="output(s) of 'fmrilm instruct' (one per training seed) or of 'fmrilm align'")
    p.add_argument("--cohort", required=True, metavar="COHORT", help="prepared cohort, on the models' atlas and length")
    p.add_argument("--tasks", required=True, nargs="+", metavar="TASK", help="task names, e.g. sex age")
    p.add_argument("--paradigm", default="single", help="single (default), multi or open")
    p.add_argument("--out", required=True, metavar="R", help="results directory to write")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                   help="split seeds on a cohort the models were not trained on (default: 0)")
    p.add_argument("--shots", type=int, nargs="+", default=[0], metavar="K",
                   help="0: the models as they are; K > 0: fine-tune each on K labelled training scans first "
                        "(e.g. --shots 0 2 4 10 for few-shot curves)")
    p.add_argument("--budget-steps", type=int, default=20, help="optimizer steps of each K-shot fine-tuning")
    p.add_argument("--method", default="fmrilm", help="method name in the result tables")
    p.add_argument("--batch-size", type=int, default=8, help="scans per forward pass")
    p.add_argument("--no-calibration", dest="calibration", action="store_false",
                   help="decide single answers on the raw class probabilities, not on those corrected by the "
                        "model's class-prior calibration (fitted on training scans; default: calibrated, with "
                        "'(uncalibrated)' rows beside)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (once the new one is complete)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from fmrilm.instruct.evaluate import run_evaluate

    rows = run_evaluate(args.model, args.cohort, args.out, tasks=args.tasks, paradigm=args.paradigm,
                        seeds=args.seeds, shots=args.shots, budget_steps=args.budget_steps, method_name=args.method,
                        batch_size=args.batch_size, calibration=args.calibration, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(rows)} result rows (results.json, results.md, predictions.jsonl)")
    for row in rows:
        shots = "all" if row.shots is None else f"{row.shots}-shot"
        raw = " uncalibrated" if row.method != args.method else ""
        print(f"  {row.task:<18} {row.metric:<18} {row.mean:.3f} ± {row.std:.3f}  "
              f"({row.setting}, {shots}, n_seeds={row.n_seeds}{raw})")
