"""``fmrilm instruct``: Stage 3 instruction tuning (:func:`fmrilm.instruct.pipeline.run_instruct`)."""

from __future__ import annotations

import argparse

from fmrilm.instruct.prompts import PARADIGMS


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fmrilm instruct`` to the ``fmrilm`` parser."""
    from fmrilm.cli import _add_train_options

    p = sub.add_parser("instruct", help="Stage 3: instruction-tune an aligned fMRI-LM on several tasks and paradigms")
    p.add_argument("cohort", nargs="+", metavar="COHORT", help="prepared cohort(s), on the model's atlas and length")
    p.add_argument("--model", required=True, metavar="LM", help="output of 'fmrilm align' (or of 'fmrilm instruct')")
    p.add_argument("--tasks", required=True, nargs="+", metavar="TASK", help="task names, e.g. sex age")
    p.add_argument("--paradigms", nargs="+", choices=PARADIGMS, default=list(PARADIGMS))
    p.add_argument("--semantic", action="store_true",
                   help="add semantic descriptions (never stating a target) to cognition and diagnosis prompts")
    p.add_argument("--max-text-tokens", type=int, default=None, metavar="N",
                   help="token budget of prompt + answer (default 192)")
    p.add_argument("--calibration", choices=("bias", "mean", "none"), default="bias",
                   help="class-prior calibration of the constrained answers, fitted on training scans at the end "
                        "(bias: per-class bias by maximum likelihood, default; mean: label-free; none)")
    p.add_argument("--out", required=True, metavar="INST")
    _add_train_options(p, epochs=None)  # --seed: the split seed, and the training seed
    p.set_defaults(func=cmd_instruct)


def cmd_instruct(args: argparse.Namespace) -> None:
    from fmrilm.cli import train_overrides
    from fmrilm.instruct.pipeline import run_instruct

    info = run_instruct(args.cohort, args.model, args.out, tasks=args.tasks, paradigms=args.paradigms,
                        seed=args.seed or 0, semantic=args.semantic, train=train_overrides(args),
                        **({} if args.max_text_tokens is None else {"max_text_tokens": args.max_text_tokens}),
                        resume=args.resume, overwrite=args.overwrite,
                        calibration=None if args.calibration == "none" else args.calibration)
    if not info.get("finished", True):
        print(f"stopped {args.out} after {info['steps_done']} of {info['total_steps']} steps; continue with --resume")
        return
    loss = info["train_metrics"].get("train_loss")
    shown = f", last train loss {loss:.3f}" if isinstance(loss, float) else ""
    print(f"wrote {args.out}: {info['steps']} steps on {sum(c['n_train_scans'] for c in info['cohorts'])} "
          f"training scans{shown}")
