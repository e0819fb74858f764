"""The units of ``fmrilm run``: one per stage output, each with its settings, its inputs and how to make it.

See :mod:`fmrilm.run` for the layout and the skipping rule; :func:`plan` turns a resolved configuration into
the units of the selected stages, in order, and :func:`run_unit` makes one unless it is up to date.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_output_dir, write_json_atomic

RECORD_FILE = "run_config.json"
_NOT_HASHED = ("jobs",)  # settings that change the speed, not the output
_FILE_OPTIONS = ("timeseries", "bids", "phenotypes", "scan_table", "atlas_dir", "atlas_labels", "atlas")


@dataclass
class Unit:
    """One stage output: where it goes, what it is made from, and how to make it into a given folder."""

    stage: str
    name: str  # e.g. "describe/ukb"
    out: Path | None  # None: rebuilt on every run (the report)
    settings: dict
    work: Callable[[Path], Any]  # writes the whole output into the (temporary) folder it is given
    inputs: list[Path] = field(default_factory=list)  # unit outputs it reads (their recorded hashes count)
    files: list[Path] = field(default_factory=list)  # user files or folders it reads (fingerprinted)
    in_place: bool = False  # written straight into ``out`` (a stage with its own resumable cache: the benchmark)


# ------------------------------------------------------------------------------------------ records and hashes
def config_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj`` (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_record(directory: Path) -> dict | None:
    """The ``run_config.json`` of a unit output, or None when there is none."""
    path = Path(directory) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def fingerprint(paths: list[Path]) -> list:
    """[path, [[name, size, mtime_ns], ...]] for every file under ``paths``: cheap, and changes when a file does."""
    rows = []
    for root in map(Path, paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        stats = [(p, p.stat()) for p in files if p.exists()]
        rows.append([str(root), [[str(p.relative_to(root)) if p != root else p.name, s.st_size, s.st_mtime_ns]
                                 for p, s in stats]])
    return rows


def unit_record(unit: Unit) -> dict:
    """What the unit records: its settings, the hashes of its inputs, its files' fingerprint, and their ``hash``."""
    inputs = {}
    for path in unit.inputs:
        record = read_record(path)
        if record is None:
            raise FmrilmError(f"stage {unit.stage} needs {path}, which no earlier stage wrote; run the stage that "
                              f"makes it first (--stages without {unit.stage} alone)")
        inputs[record["unit"]] = record["hash"]  # by name, so a moved run folder stays up to date
    settings = {k: v for k, v in unit.settings.items() if k not in _NOT_HASHED}
    body = {"settings": settings, "inputs": inputs, "files": fingerprint(unit.files)}
    return {"stage": unit.stage, "unit": unit.name, "hash": config_hash(body), **body}


def is_current(unit: Unit) -> bool:
    """Whether the unit's output exists with the hash it would be made with now."""
    old = None if unit.out is None else read_record(unit.out)
    return old is not None and old["hash"] == unit_record(unit)["hash"]


def run_unit(unit: Unit, config: dict) -> bool:
    """Make ``unit`` unless it is current; return whether it ran. The output replaces the old one when complete."""
    from fmrilm import __version__

    if unit.out is None:
        unit.work(None)
        return True
    if is_current(unit):
        return False
    record, start, cpu = unit_record(unit), time.perf_counter(), _cpu_seconds()
    if unit.in_place:  # the record goes first and comes back last: an interrupted run is never current
        unit.out.mkdir(parents=True, exist_ok=True)
        (unit.out / RECORD_FILE).unlink(missing_ok=True)
    with contextlib.nullcontext(unit.out) if unit.in_place else atomic_output_dir(unit.out, overwrite=True) as target:
        unit.work(target)
        write_json_atomic(target / RECORD_FILE, {**record, "fmrilm_version": __version__,
                                                 "seconds": round(time.perf_counter() - start, 1),
                                                 "cpu_seconds": round(_cpu_seconds() - cpu, 1), "config": config})
    return True


def _cpu_seconds() -> float:
    """CPU time of this process and its finished workers (every thread): a figure a busy machine inflates less
    than the wall time."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# ------------------------------------------------------------------------------------------ plan
def plan(config: dict, out: Path, stages: list[str]) -> list[Unit]:
    """The units of ``stages`` for a resolved configuration, in running order."""
    builders = {"prepare": _prepare_units, "describe": _describe_units, "tokenizer": _tokenizer_units,
                "align": _align_units, "instruct": _instruct_units, "evaluate": _evaluate_units,
                "benchmark": _benchmark_units, "report": _report_units}
    return [unit for stage in stages for unit in builders[stage](config, Path(out))]


def cohort_dir(config: dict, out: Path, name: str) -> Path:
    """Where cohort ``name`` is: the user's folder for ``path`` cohorts, else ``out/cohorts/<name>``."""
    spec = config["cohorts"][name]
    return Path(spec["path"]) if spec["path"] else out / "cohorts" / name


def _cohort_reads(config: dict, out: Path, name: str) -> dict:
    """The ``inputs``/``files`` entries of a unit reading cohort ``name``."""
    if config["cohorts"][name]["path"]:
        return {"inputs": [], "files": [cohort_dir(config, out, name)]}
    return {"inputs": [cohort_dir(config, out, name)], "files": []}


def _stage_cohort(config: dict, key: str, name: str | None) -> str:
    name = name or next(iter(config["cohorts"]), None)
    if name not in config["cohorts"]:
        raise FmrilmError(f"{key} {name!r} is not a cohort of this configuration; choose one of "
                          f"{', '.join(config['cohorts']) or '(none: add cohorts first)'}")
    return name


def prepare_options(config: dict, name: str) -> dict:
    """Every ``fmrilm prepare`` option for cohort ``name``: defaults, the prepare section, the cohort's own."""
    from fmrilm.run import prepare_defaults

    spec = config["cohorts"][name]
    options = {**prepare_defaults(), **config["prepare"], **spec["prepare"]}
    if spec["simulate"]:
        options["atlas"] = spec["simulate"]["atlas"]
    return options


def _prepare_units(config: dict, out: Path) -> list[Unit]:
    units = []
    for name, spec in config["cohorts"].items():
        if spec["path"]:
            continue
        options, raw = prepare_options(config, name), out / "raw" / name
        if spec["simulate"]:
            simulate = spec["simulate"]
            units.append(Unit("prepare", f"simulate/{name}", raw, simulate, partial(_simulate, simulate)))
        files = [Path(options[k]) for k in _FILE_OPTIONS if options.get(k) and Path(str(options[k])).exists()]
        files += [Path(p) for p in options.get("nifti") or []]
        settings = {"sample": spec["sample"], "simulated": bool(spec["simulate"]), **options}
        work = partial(_prepare, spec["sample"], options, raw if spec["simulate"] else None, out / "cohorts" / name)
        units.append(Unit("prepare", f"prepare/{name}", out / "cohorts" / name, settings, work,
                          [raw] if spec["simulate"] else [], [f for f in files if not spec["simulate"]]))
    return units


def _simulate(settings: dict, tmp: Path) -> None:
    from fmrilm.data.simulate import simulate_cohort

    simulate_cohort(settings["preset"], settings["subjects"], settings["seed"], tmp, atlas=settings["atlas"],
                    fmt=settings["fmt"], effect_scale=settings["effect_scale"], use_hcp_fc=settings["use_hcp_fc"],
                    overwrite=True)


def _prepare(sample: str | None, options: dict, raw: Path | None, final: Path, tmp: Path) -> None:
    from fmrilm.data.cohort import describe_cohort
    from fmrilm.data.ingest import prepare_from_args, prepare_hcp_sample, preprocess_config

    if raw is not None:
        options = {**options, "timeseries": str(raw / "timeseries"), "phenotypes": str(raw / "participants.tsv")}
    args = argparse.Namespace(**{**options, "out": tmp, "overwrite": True})
    cohort = (prepare_hcp_sample(tmp, overwrite=True, config=preprocess_config(args)) if sample == "hcp"
              else prepare_from_args(args))
    with cohort:
        print(describe_cohort(cohort).replace(str(tmp), str(final)), flush=True)


def _describe_units(config: dict, out: Path) -> list[Unit]:
    units = []
    for name, spec in config["cohorts"].items():
        settings = {**config["describe"], **spec["describe"], "check": spec["check"]}
        simulation = out / "raw" / name / "simulation.json" if spec["simulate"] else None
        reads = _cohort_reads(config, out, name)
        if spec["check"] and simulation is not None:
            reads["inputs"].append(out / "raw" / name)
        work = partial(_describe, cohort_dir(config, out, name), settings, simulation)
        units.append(Unit("describe", f"describe/{name}", out / "descriptors" / name, settings, work, **reads))
    return units


def _describe(cohort: Path, settings: dict, simulation: Path | None, tmp: Path) -> None:
    from fmrilm.descriptors.check import run_check
    from fmrilm.descriptors.pipeline import run_describe
    from fmrilm.descriptors.reference import DescribeConfig

    fields = {k: v for k, v in settings.items() if k not in ("jobs", "check")}
    run_describe(cohort, tmp, config=DescribeConfig(**fields), jobs=settings["jobs"], overwrite=True)
    if settings["check"]:
        table, missed = run_check(tmp, cohort, settings["check"], simulation=simulation)
        print(f"descriptor check, target {settings['check']} (planted domains that missed: {missed or 'none'})\n"
              f"{table}", flush=True)


def _tokenizer_units(config: dict, out: Path) -> list[Unit]:
    settings = dict(config["tokenizer"])
    name = settings["cohort"] = _stage_cohort(config, "tokenizer.cohort", settings["cohort"])
    reads = _cohort_reads(config, out, name)
    reads["inputs"].append(out / "descriptors" / name)
    work = partial(_train_tokenizer, cohort_dir(config, out, name), out / "descriptors" / name, settings)
    return [Unit("tokenizer", "tokenizer", out / "tokenizer", settings, work, **reads)]


def _train_tokenizer(cohort: Path, descriptors: Path, s: dict, tmp: Path) -> None:
    from fmrilm.tokenizer.pipeline import run_train_tokenizer

    metrics = run_train_tokenizer(cohort, descriptors, tmp, preset=s["preset"], llm=s["llm"], train=s["train"],
                                  overrides=s["overrides"], held_out_fraction=s["held_out_fraction"],
                                  text_pooling=s["text_pooling"], text_fields=s["text_fields"],
                                  text_depth=s["text_depth"], overwrite=True)
    _check_finished("tokenizer", metrics)


def _check_finished(stage: str, metrics: dict) -> None:
    if metrics.get("finished") is False:
        raise FmrilmError(f"{stage} stopped at {stage}.train.max_steps before its last step; a run needs whole "
                          f"stages: remove max_steps and lower {stage}.train.epochs instead")
    print(f"{stage}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)), flush=True)


def _align_units(config: dict, out: Path) -> list[Unit]:
    settings = dict(config["align"])
    name = _stage_cohort(config, "align.cohort", settings["cohort"] or config["tokenizer"]["cohort"])
    settings["cohort"] = name
    settings["llm"] = settings["llm"] or config["tokenizer"]["llm"]
    reads = _cohort_reads(config, out, name)
    reads["inputs"] += [out / "descriptors" / name, out / "tokenizer"]
    work = partial(_align, cohort_dir(config, out, name), out / "descriptors" / name, out / "tokenizer", settings)
    return [Unit("align", "align", out / "lm", settings, work, **reads)]


def _align(cohort: Path, descriptors: Path, tokenizer: Path, s: dict, tmp: Path) -> None:
    from fmrilm.lm.pipeline import run_align

    metrics = run_align(cohort, tokenizer, descriptors, tmp, llm=s["llm"], lora=s["lora"],
                        config_overrides=s["config_overrides"], train=s["train"],
                        held_out_fraction=s["held_out_fraction"], max_text_tokens=s["max_text_tokens"],
                        text_field=s["text_field"], n_generate=s["n_generate"], overwrite=True)
    _check_finished("align", metrics)


def _cohort_list(config: dict, stage: str, names: list | None) -> list[str]:
    names = list(names) if names else None
    for name in names or []:
        _stage_cohort(config, f"{stage}.cohorts", name)
    return names


def _instruct_cohorts(config: dict) -> list[str]:
    return _cohort_list(config, "instruct", config["instruct"]["cohorts"]) or [
        _stage_cohort(config, "align.cohort", config["align"]["cohort"] or config["tokenizer"]["cohort"])]


def _instruct_units(config: dict, out: Path) -> list[Unit]:
    settings = {**config["instruct"], "cohorts": _instruct_cohorts(config)}
    inputs, files = [out / "lm"], []
    for name in settings["cohorts"]:
        reads = _cohort_reads(config, out, name)
        inputs, files = inputs + reads["inputs"], files + reads["files"]
    work = partial(_instruct, [cohort_dir(config, out, n) for n in settings["cohorts"]], out / "lm", settings)
    return [Unit("instruct", "instruct", out / "instruct", settings, work, inputs, files)]


def _instruct(cohorts: list[Path], model: Path, s: dict, tmp: Path) -> None:
    from fmrilm.instruct.pipeline import run_instruct

    record = run_instruct(cohorts, model, tmp, tasks=s["tasks"], paradigms=s["paradigms"], seed=s["seed"],
                          train=s["train"], semantic=s["semantic"], max_text_tokens=s["max_text_tokens"],
                          held_out_fraction=s["held_out_fraction"], overwrite=True)
    _check_finished("instruct", record if record.get("finished") is False else record.get("train_metrics") or {})


def _evaluate_plan(config: dict) -> dict[str, list[str]]:
    """Cohort -> tasks evaluated (default: the instruct cohorts and tasks)."""
    s = config["evaluate"]
    return {n: list(s["tasks"] or config["instruct"]["tasks"])
            for n in _cohort_list(config, "evaluate", s["cohorts"]) or _instruct_cohorts(config)}


def _evaluate_units(config: dict, out: Path) -> list[Unit]:
    units = []
    for name, tasks in _evaluate_plan(config).items():
        settings = {**config["evaluate"], "cohorts": None, "tasks": tasks}
        reads = _cohort_reads(config, out, name)
        reads["inputs"].append(out / "instruct")
        work = partial(_evaluate, out / "instruct", cohort_dir(config, out, name), settings)
        units.append(Unit("evaluate", f"evaluate/{name}", out / "evaluate" / name, settings, work, **reads))
    return units


def _evaluate(model: Path, cohort: Path, s: dict, tmp: Path) -> None:
    from fmrilm.evaluate.results import markdown_tables
    from fmrilm.instruct.evaluate import run_evaluate

    rows = run_evaluate(model, cohort, tmp, tasks=s["tasks"], paradigm=s["paradigm"], seeds=s["seeds"],
                        shots=s["shots"], budget_steps=s["budget_steps"], batch_size=s["batch_size"], overwrite=True)
    print(markdown_tables(rows), flush=True)


def _benchmark_units(config: dict, out: Path) -> list[Unit]:
    s = config["benchmark"]
    evaluated = _evaluate_plan(config) if "evaluate" in config["stages"] else {}
    tasks = {n: list(s["tasks"] or evaluated.get(n) or config["instruct"]["tasks"])
             for n in _cohort_list(config, "benchmark", s["cohorts"]) or list(evaluated) or _instruct_cohorts(config)}
    with_fmrilm = bool(s["with_fmrilm"]) and all(evaluated.get(n) == t for n, t in tasks.items())
    settings = {**s, "cohorts": None, "tasks": tasks, "with_fmrilm": with_fmrilm}
    inputs, files = [], []
    for name in tasks:
        reads = _cohort_reads(config, out, name)
        inputs += reads["inputs"] + [out / "descriptors" / name] + ([out / "evaluate" / name] if with_fmrilm else [])
        files += reads["files"]
    work = partial(_benchmark, {n: (cohort_dir(config, out, n), out / "descriptors" / n) for n in tasks}, settings,
                   out / "evaluate")
    return [Unit("benchmark", "benchmark", out / "benchmark", settings, work, inputs, files, in_place=True)]


def _benchmark(cohorts: dict[str, tuple[Path, Path]], s: dict, evaluate: Path, target: Path) -> None:
    """Baselines on the run's cohorts and descriptors; fMRI-LM rows from the evaluate stage, renamed to the
    run's cohort names (evaluate names rows by dataset)."""
    from dataclasses import replace

    from fmrilm.evaluate.baselines import BASELINES
    from fmrilm.evaluate.benchmark import run_benchmark
    from fmrilm.evaluate.results import read_results, write_results

    methods = list(s["methods"] or BASELINES) + (["fmrilm"] if s["with_fmrilm"] else [])
    fmrilm = {}
    if s["with_fmrilm"]:
        rows = [replace(r, cohort=n) for n in cohorts for r in read_results(evaluate / n) if r.task in s["tasks"][n]]
        fmrilm = {"results": str(write_results(target / "fmrilm_rows", rows) / "results.json")}
    config = {"cohorts": [{"name": n, "path": str(c), "descriptors": str(d), "tasks": s["tasks"][n]}
                          for n, (c, d) in cohorts.items()],
              "methods": methods, "seeds": s["seeds"], "shots": s["shots"], "params": s["params"],
              "test_fraction": s["test_fraction"], "val_fraction": s["val_fraction"], "fmrilm": fmrilm}
    run_benchmark(config, target, overwrite=True, progress=print)


def _report_units(config: dict, out: Path) -> list[Unit]:
    return [Unit("report", "report", None, {}, partial(_report, out))]


def merged_rows(out: Path) -> list:
    """Every result row of a run: each evaluate output's (named by the run's cohort name) and the benchmark's,
    each row once (the benchmark repeats fMRI-LM's evaluate rows)."""
    from dataclasses import astuple, replace

    from fmrilm.evaluate.results import read_results

    rows = [replace(r, cohort=p.parent.name) for p in sorted(out.glob("evaluate/*/results.json"))
            for r in read_results(p)]
    rows += read_results(out / "benchmark") if (out / "benchmark" / "results.json").is_file() else []
    unique = {astuple(r)[:7]: r for r in reversed(rows)}  # key: everything but the numbers; first one kept
    return list(reversed(unique.values()))


def _report(out: Path, _tmp: None) -> None:
    from fmrilm.evaluate.results import write_results

    rows = merged_rows(out)
    if rows:
        write_results(out, rows)
        print(f"merged {len(rows)} result rows into {out / 'results.json'}", flush=True)
    try:
        from fmrilm.report import build_report
    except ImportError:
        print("report: fmrilm.report is not part of this fmrilm version; no report.html", flush=True)
        return
    print(f"wrote {build_report(out)}", flush=True)
