"""``fmrilm run`` (the configuration-driven pipeline) and ``fmrilm report`` (the HTML report of a run folder)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fmrilm run`` and ``fmrilm report`` to the ``fmrilm`` parser."""
    from fmrilm.run import STAGES

    p = sub.add_parser("run", help="run any subset of the stages from one YAML or JSON configuration; up-to-date "
                                   "outputs are skipped")
    p.add_argument("config", metavar="CONFIG", help="a YAML or JSON file, or a preset name (quick, standard, ...)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set describe.jobs=2 (the value is read as YAML); repeatable")
    p.add_argument("--stages", nargs="+", metavar="STAGE", help=f"stages to run (default: the configuration's): "
                                                                 f"{', '.join(STAGES)}")
    p.add_argument("--out", default="fmrilm-run", metavar="DIR", help="run folder (default: fmrilm-run)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a configuration that differs from the one DIR was made with (changed stages rerun)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("report", help="write DIR/report.html from the outputs of a run folder")
    p.add_argument("run_dir", metavar="DIR")
    p.set_defaults(func=cmd_report)


def cmd_run(args: argparse.Namespace) -> None:
    from fmrilm.run import load_config, run_pipeline

    run_pipeline(load_config(args.config, args.sets), args.out, stages=args.stages, overwrite=args.overwrite)


def cmd_report(args: argparse.Namespace) -> None:
    from fmrilm.errors import FmrilmError

    try:
        from fmrilm.report import build_report
    except ImportError:
        raise FmrilmError("fmrilm.report is not part of this fmrilm version; no report can be written") from None
    print(f"wrote {build_report(args.run_dir)}")
