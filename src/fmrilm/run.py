"""``fmrilm run CONFIG``: any subset of the stages from one YAML or JSON configuration, skipping what is up to date.

Configuration. A mapping with the keys of :func:`defaults`: ``cohorts`` (name -> exactly one of ``simulate``
(simulate_cohort arguments), ``sample: hcp``, ``path`` (a prepared cohort) or ``prepare`` (``fmrilm prepare``
options without dashes: ``timeseries``/``nifti``/``bids``, ``phenotypes``, ``atlas``...); optional ``describe``
(DescribeConfig fields for this cohort) and ``check`` (phenotype for the descriptor check)), one section per stage
in :data:`STAGES`, ``stages`` (those to run) and ``estimates`` (seconds per stage, for the remaining-time display).
Presets are files in ``fmrilm/presets/run/`` (:func:`list_presets`); ``--set a.b=value`` overrides one key (the
value is parsed as YAML); relative paths are taken from the configuration file's folder.

Output layout (``fmrilm report`` reads it)::

    config.resolved.json     the whole resolved configuration of the last run
    raw/<cohort>/            simulated inputs (time series, participants.tsv, simulation.json)
    cohorts/<cohort>/        prepared cohorts (a link to the user's folder for ``path`` cohorts)
    descriptors/<cohort>/    Stage 0 (with check_<target>.json when ``check`` is set)
    tokenizer/, lm/          Stage 1 and Stage 2
    instruct/, evaluate/<cohort>/, benchmark/    Stage 3, its evaluation and the baselines
    results.json, results.md, report.html        all result rows merged, and the report

Skipping. Every output above (a *unit*) is written through a temporary folder that replaces the old one only when
complete, with ``run_config.json`` inside: its settings, the hashes of the units it read, a fingerprint (names,
sizes, modification times) of the user files it read, and ``hash``, the SHA-256 of those three. A unit whose
recorded hash equals the one computed now is skipped, so changing one setting reruns that unit and the units that
read it, and nothing else. The report stage is always rebuilt (it is cheap and shows whatever exists).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from fmrilm.errors import FmrilmError
from fmrilm.io import write_json_atomic

STAGES = ("prepare", "describe", "tokenizer", "align", "instruct", "evaluate", "benchmark", "report")
RESOLVED_FILE = "config.resolved.json"
PRESET_DIR = Path(__file__).parent / "presets" / "run"
COHORT_SOURCES = ("simulate", "sample", "path", "prepare")
SAMPLES = ("hcp",)
# Modules a stage needs; a stage whose module is not installed is reported and left out.
STAGE_MODULES = {"instruct": "fmrilm.instruct.pipeline", "evaluate": "fmrilm.instruct.evaluate",
                 "benchmark": "fmrilm.evaluate.benchmark", "report": "fmrilm.report"}
_NOT_COMPARED = ("description", "stages", "estimates")  # changing these never needs --overwrite
_PATH_KEYS = ("path", "timeseries", "bids", "nifti", "phenotypes", "scan_table", "atlas_dir", "atlas_labels")


# ------------------------------------------------------------------------------------------ configuration
def defaults() -> dict:
    """Every allowed key with its default; a ``{}`` default accepts keys the stage itself checks; ``None``
    means "from the stage before" (cohorts, tasks, llm) or "all" (benchmark methods: every baseline)."""
    return copy.deepcopy(_defaults())


@functools.lru_cache(maxsize=1)
def _defaults() -> dict:
    from fmrilm.descriptors.reference import DescribeConfig

    return {
        "description": "", "stages": list(STAGES), "estimates": {s: 60 for s in STAGES}, "cohorts": {},
        "prepare": {k: v for k, v in prepare_defaults().items() if k in _PREPROCESS_KEYS},
        "describe": {**DescribeConfig().to_dict(), "jobs": 1},
        "tokenizer": {"cohort": None, "preset": "quick", "llm": "smollm2-135m", "train": {}, "overrides": {},
                      "held_out_fraction": 0.1, "text_pooling": "mean",
                      "text_fields": ["fc", "fg", "ica", "graph"], "text_depth": 0.8},
        "align": {"cohort": None, "llm": None, "lora": True, "train": {}, "config_overrides": {},
                  "held_out_fraction": 0.1, "max_text_tokens": 96, "text_field": "text", "n_generate": 32},
        "instruct": {"cohorts": None, "tasks": ["sex"], "paradigms": ["single", "multi", "open"], "seed": 0,
                     "train": {}, "semantic": False, "max_text_tokens": 192, "held_out_fraction": 0.2},
        "evaluate": {"cohorts": None, "tasks": None, "paradigm": "single", "seeds": [0], "shots": [0],
                     "budget_steps": 20, "batch_size": 8},
        "benchmark": {"cohorts": None, "tasks": None, "methods": None, "seeds": 3, "shots": [2, 4, 10],
                      "params": {}, "test_fraction": 0.2, "val_fraction": 0.1, "with_fmrilm": True},
        "report": {},
    }


_PREPROCESS_KEYS = ("target_tr", "length", "windows", "min_points", "max_constant_fraction", "no_site_variance",
                    "skip_bad")
_SIMULATE_DEFAULTS = {"preset": None, "subjects": 100, "seed": 0, "atlas": "schaefer400_tian_s3", "fmt": "npy",
                      "effect_scale": 1.0, "use_hcp_fc": True}


def list_presets() -> list[str]:
    """Names of the run presets shipped with fmrilm."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_config(source: str | os.PathLike, sets: list[str] = ()) -> dict:
    """Read a configuration file or preset, apply ``--set`` overrides, and return it validated and resolved.

    Parameters
    ----------
    source
        A YAML or JSON file, or the name of a preset (:func:`list_presets`).
    sets
        ``"a.b=value"`` strings; ``value`` is parsed as YAML (``3`` is an int, ``[a, b]`` a list).
    """
    path = Path(source)
    if not path.is_file() and str(source) in list_presets():
        path = PRESET_DIR / f"{source}.json"
    config = _read_file(path)
    for item in sets:
        _apply_set(config, item)
    return resolve(config, base=path.parent)


def _read_file(path: Path) -> dict:
    import yaml

    if not path.is_file():
        raise FmrilmError(f"configuration {path} not found; give a YAML or JSON file or a preset "
                          f"({', '.join(list_presets())})")
    text = path.read_text()
    try:
        config = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise FmrilmError(f"{path} line {exc.lineno}: invalid JSON ({exc.msg}); fix the file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise FmrilmError(f"{path}{where}: invalid YAML ({problem}); fix the file") from None
    if not isinstance(config, dict):
        raise FmrilmError(f"{path} must hold a mapping of settings (cohorts:, describe:, ...), not "
                          f"{type(config).__name__}")
    return config


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def parse_set(item: str) -> tuple[list[str], Any]:
    """``"a.b=3"`` -> (["a", "b"], 3); the value is parsed as YAML."""
    import yaml

    key, sep, value = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise FmrilmError(f"--set {item!r} is not KEY=VALUE; write e.g. --set describe.jobs=2")
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        raise FmrilmError(f"--set {item!r}: the value is not valid YAML; quote it, e.g. --set a.b='x: y'") from None
    if isinstance(parsed, str) and _EXPONENT.fullmatch(parsed):
        parsed = float(parsed)  # YAML 1.1 reads 1e-3 as a string; YAML 1.2 and users read a number
    return [k.strip() for k in keys], parsed


def _apply_set(config: dict, item: str) -> None:
    keys, value = parse_set(item)
    node = config
    for key in keys[:-1]:
        if not isinstance(node.setdefault(key, {}), dict):
            raise FmrilmError(f"--set {item!r}: {key} holds a value, not settings; set {key}= itself")
        node = node[key]
    node[keys[-1]] = value


def resolve(config: dict, base: Path = Path(".")) -> dict:
    """The defaults updated with ``config``, every key checked, relative paths made absolute from ``base``."""
    allowed = defaults()
    merged = _merge(allowed, config, [])
    if not isinstance(merged["cohorts"], dict):
        raise FmrilmError(f"cohorts must map cohort names to their settings, got {merged['cohorts']!r}")
    merged["cohorts"] = {str(name): _resolve_cohort(str(name), spec, base) for name, spec in merged["cohorts"].items()}
    if not isinstance(merged["stages"], list):
        raise FmrilmError(f"stages must be a list of stage names ({', '.join(STAGES)}), got {merged['stages']!r}")
    for stage in merged["stages"]:
        if stage not in STAGES:
            raise FmrilmError(f"unknown stage {stage!r} in stages; allowed stages are {', '.join(STAGES)}")
    _check_train_keys(merged)
    return merged


def _merge(default: Any, given: Any, where: list[str]) -> Any:
    if isinstance(given, dict) and default is not None and not isinstance(default, dict):
        raise FmrilmError(f"{'.'.join(where)} takes a value (like {default!r}), not settings {given!r}")
    if not isinstance(default, dict) or not default:
        return copy.deepcopy(given)
    if not isinstance(given, dict):
        raise FmrilmError(f"{'.'.join(where)} must be a mapping of settings ({', '.join(default)}), got {given!r}")
    unknown = sorted(set(given) - set(default))
    if unknown:
        raise FmrilmError(f"unknown key {'.'.join(where + [unknown[0]])!r}; allowed keys"
                          f"{' in ' + '.'.join(where) if where else ''}: {', '.join(default)}")
    return {k: _merge(v, given[k], where + [k]) if k in given else copy.deepcopy(v)
            for k, v in default.items()}


def _resolve_cohort(name: str, spec: Any, base: Path) -> dict:
    where = ["cohorts", name]
    if not isinstance(spec, dict):
        raise FmrilmError(f"cohorts.{name} must be a mapping with one of {', '.join(COHORT_SOURCES)}, got {spec!r}")
    if not name or name.startswith(".") or any(c in name for c in "/\\"):
        raise FmrilmError(f"cohort name {name!r} must be a plain folder name such as 'ukb'")
    allowed = {"simulate": None, "sample": None, "path": None, "prepare": {}, "describe": {}, "check": None}
    if isinstance(spec.get("simulate"), str):  # simulate: ukb
        spec = {**spec, "simulate": {"preset": spec["simulate"]}}
    spec = _merge(allowed, spec, where)
    given = [s for s in ("simulate", "sample", "path") if spec[s] is not None]
    options = spec["prepare"] if isinstance(spec["prepare"], dict) else {}
    inputs = [k for k in ("timeseries", "nifti", "bids") if options.get(k)]
    if len(given) + bool(inputs) != 1:
        raise FmrilmError(f"cohorts.{name} needs exactly one source: simulate, sample, path, or prepare with one of "
                          f"timeseries, nifti or bids; got {given + [f'prepare.{k}' for k in inputs] or 'none'}")
    if spec["simulate"] is not None:
        spec["simulate"] = _merge(_SIMULATE_DEFAULTS, spec["simulate"], where + ["simulate"])
        spec["simulate"]["preset"] = spec["simulate"]["preset"] or name
    if spec["sample"] is not None and spec["sample"] not in SAMPLES:
        raise FmrilmError(f"cohorts.{name}.sample {spec['sample']!r} is unknown; allowed: {', '.join(SAMPLES)}")
    _check_options(spec["prepare"], prepare_defaults(), f"cohorts.{name}.prepare")
    _check_options(spec["describe"], defaults()["describe"], f"cohorts.{name}.describe")
    if spec["path"] is not None:
        spec["path"] = str((base / spec["path"]).resolve())
    spec["prepare"] = {k: _absolute(v, base) if k in _PATH_KEYS or (k == "atlas" and (base / str(v)).is_file())
                       else v for k, v in spec["prepare"].items()}
    return spec


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_absolute(v, base) for v in value]
    return None if value is None else str((base / str(value)).resolve())


def _check_options(given: Any, allowed: dict, where: str) -> None:
    if not isinstance(given, dict):
        raise FmrilmError(f"{where} must be a mapping of settings ({', '.join(allowed)}), got {given!r}")
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise FmrilmError(f"unknown key '{where}.{unknown[0]}'; allowed keys in {where}: {', '.join(allowed)}")


def _check_train_keys(config: dict) -> None:
    import dataclasses

    from fmrilm.train import TrainConfig

    fields = {f.name: None for f in dataclasses.fields(TrainConfig)}
    for stage in ("tokenizer", "align", "instruct"):
        _check_options(config[stage]["train"], fields, f"{stage}.train")


def prepare_defaults() -> dict:
    """The options of ``fmrilm prepare`` with their defaults (``out``, ``overwrite`` excluded)."""
    parser = _subparser("prepare")
    return {a.dest: a.default for a in parser._actions if a.dest not in ("help", "out", "overwrite", "func")}


def _subparser(name: str):
    from fmrilm.cli import build_parser

    for action in build_parser()._subparsers._group_actions:
        if name in getattr(action, "choices", {}):
            return action.choices[name]
    raise KeyError(name)


# ------------------------------------------------------------------------------------------ running
def run_pipeline(config: dict, out: str | os.PathLike, *, stages: list[str] | None = None, overwrite: bool = False,
                 echo: Callable[[str], None] = print) -> dict[str, str]:
    """Run the selected stages of a resolved configuration into ``out``, skipping up-to-date outputs.

    Parameters
    ----------
    config
        A resolved configuration (:func:`load_config` or :func:`resolve`).
    out
        The run folder (layout in the module docstring). One holding a run with a different configuration is
        refused unless ``overwrite``; even then, outputs whose settings and inputs did not change are kept.
    stages
        Stages to run (default: the configuration's ``stages``), in pipeline order whatever the order given.

    Returns
    -------
    dict
        ``{unit name: "ran" | "skipped"}`` in running order.
    """
    from fmrilm.run_stages import plan, run_unit

    out = Path(out)
    selected = _select(config, stages, echo)
    _check_out(out, config, overwrite)
    units = plan(config, out, selected)  # refuses a bad stage setting before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESOLVED_FILE, config)
    _link_cohorts(config, out)
    progress = Progress([s for s in selected if any(u.stage == s for u in units)], config["estimates"], echo)
    status = {}
    for stage in progress.stages:
        progress.start(stage)
        for unit in (u for u in units if u.stage == stage):
            started = time.perf_counter()
            status[unit.name] = "ran" if run_unit(unit, config) else "skipped"
            echo(f"  {unit.name}: " + (f"done in {_clock(time.perf_counter() - started)}"
                                      if status[unit.name] == "ran" else "up to date, skipped"))
        progress.finish(stage, ran=any(status[u.name] == "ran" for u in units if u.stage == stage))
    echo(f"finished in {_clock(time.perf_counter() - progress.begin)}: {out}")
    return status


def _select(config: dict, stages: list[str] | None, echo: Callable[[str], None]) -> list[str]:
    wanted = list(config["stages"] if stages is None else stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise FmrilmError(f"unknown stage {unknown[0]!r}; allowed stages are {', '.join(STAGES)}")
    selected = []
    for stage in (s for s in STAGES if s in wanted):
        module = STAGE_MODULES.get(stage)
        if module and stage != "report" and importlib.util.find_spec(module) is None:
            echo(f"stage {stage} left out: {module} is not part of this fmrilm version")
        else:
            selected.append(stage)
    return selected


def _check_out(out: Path, config: dict, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FmrilmError(f"output {out} exists and is not a folder; choose another --out")
    if overwrite or not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / RESOLVED_FILE).is_file():
        raise FmrilmError(f"output {out} exists and is not an fmrilm run folder; choose another --out or pass "
                          "--overwrite")
    old = json.loads((out / RESOLVED_FILE).read_text())
    difference = _first_difference({k: v for k, v in old.items() if k not in _NOT_COMPARED},
                                   {k: v for k, v in config.items() if k not in _NOT_COMPARED}, [])
    if difference:
        raise FmrilmError(f"{out} holds a run with a different configuration ({difference}); pass --overwrite to "
                          "rerun the stages this changes (the others are kept) or choose another --out")


def _first_difference(old: Any, new: Any, where: list[str]) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), where + [str(key)])
            if found:
                return found
        return None
    return None if old == new else f"{'.'.join(where)}: {old!r} before, {new!r} now"


def _link_cohorts(config: dict, out: Path) -> None:
    """``out/cohorts/<name>`` for ``path`` cohorts: a link to the user's folder, so the layout is complete."""
    for name, spec in config["cohorts"].items():
        link = out / "cohorts" / name
        if spec["path"] and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(spec["path"], target_is_directory=True)


def _clock(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Printed progress across stages: stage i/n, elapsed time, and the remaining time from the per-stage
    estimates scaled by how long the finished stages took against theirs."""

    def __init__(self, stages: list[str], estimates: dict, echo: Callable[[str], None] = print):
        self.stages, self.estimates, self.echo = stages, estimates, echo
        self.begin, self.took, self.current_start = time.perf_counter(), {}, time.perf_counter()

    def remaining(self) -> float:
        """Estimated seconds left, the current stage's elapsed part taken off."""
        ran = [s for s, (_, did_run) in self.took.items() if did_run and self.estimates.get(s, 60) > 0]
        planned = sum(self.estimates.get(s, 60) for s in ran)
        factor = sum(self.took[s][0] for s in ran) / planned if planned else 1.0
        left = sum(self.estimates.get(s, 60) for s in self.stages if s not in self.took)
        return max(left * min(max(factor, 0.1), 10.0) - (time.perf_counter() - self.current_start), 0.0)

    def start(self, stage: str) -> None:
        self.current_start = time.perf_counter()
        i = self.stages.index(stage) + 1
        self.echo(f"[stage {i}/{len(self.stages)} {stage}] elapsed {_clock(self.current_start - self.begin)}, "
                  f"remaining ~{_clock(self.remaining())}")

    def finish(self, stage: str, ran: bool) -> None:
        self.took[stage] = (time.perf_counter() - self.current_start, ran)
