"""``fmrilm ask``: answer one question about one scan with an instruction-tuned model (see fmrilm.instruct.ask)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fmrilm ask`` to the ``fmrilm`` parser."""
    p = sub.add_parser("ask", help="answer a question about the person behind one scan, with its probability")
    p.add_argument("question", help='the question, e.g. "Is this subject male or female?"')
    p.add_argument("--model", required=True, metavar="INST", help="output of 'fmrilm instruct' (or 'fmrilm align')")
    p.add_argument("--scan", required=True, metavar="FILE", help="ROI time-series file or 4D NIfTI, any format "
                   "prepare accepts")
    p.add_argument("--task", metavar="NAME", help="registry task to answer (default: matched from the question)")
    p.add_argument("--tr", type=float, metavar="SECONDS", help="native repetition time of the scan")
    p.add_argument("--site", help="acquisition site (for the cohort's site statistics; default: none)")
    p.add_argument("--mat-key", metavar="NAME")
    p.add_argument("--transpose", action="store_true", help="the file is ROIs x time")
    p.add_argument("--cohort", metavar="NAME", help="cohort named in the prompt (default: the model's first)")
    p.add_argument("--generate", action="store_true", help="answer a question matching no task by free generation")
    p.add_argument("--json", action="store_true", help="print the whole answer (every class probability) as JSON")
    p.add_argument("--no-calibration", dest="calibrate", action="store_false",
                   help="raw class probabilities, without the model's class-prior calibration")
    p.set_defaults(func=cmd_ask)


def cmd_ask(args: argparse.Namespace) -> None:
    from fmrilm.instruct.ask import ask

    answer = ask(args.model, args.scan, args.question, task=args.task, tr=args.tr, site=args.site,
                 mat_key=args.mat_key, transpose=args.transpose, dataset=args.cohort, generate=args.generate,
                 calibrate=args.calibrate)
    print(json.dumps(answer.to_dict(), indent=2) if args.json else str(answer))
