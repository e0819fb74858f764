"""The configuration of ``fmrilm benchmark``: which cohorts, tasks, methods, seeds and few-shot sizes.

A benchmark preset is a JSON file in ``presets/benchmark`` (``quick``, ``paper``) or anywhere else::

    {"description": "...",
     "cohorts": [{"name": "ukb", "simulate": "ukb", "subjects": 200, "atlas": "schaefer100_tian_s1",
                  "tasks": ["sex", "age"]},
                 {"name": "mine", "path": "COHORT", "descriptors": "DESC", "tasks": ["sex"]}],
     "methods": ["fc_logreg", "bnt", "fmrilm"], "seeds": 3, "shots": [2, 4, 10],
     "params": {"bnt": {"epochs": 50}}, "describe": {"ica_components": 10},
     "fmrilm": {"results": "R/results.json", "stages": {...}}}   # or "models": [INST, ...], "shots": [0, 4]

Every key except ``cohorts`` and ``methods`` has a default (:class:`BenchmarkConfig`); unknown keys are
refused. :func:`resolve_config` applies the command-line overrides; the resolved config is saved as
``B/config.json`` and reloads with :meth:`BenchmarkConfig.from_dict`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.baselines import BASELINES
from fmrilm.evaluate.protocol import get_task

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "benchmark"
FMRILM = "fmrilm"  # the method whose rows come from 'fmrilm evaluate'
FMRILM_KEYS = ("results", "models", "paradigm", "shots", "stages")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class CohortSpec:
    """One cohort of the benchmark: simulated with a simulation preset, or an existing prepared directory."""

    name: str  # label in the tables and directory name under B/cohorts
    simulate: str | None = None  # simulation preset (ukb, adni, ...; fmrilm simulate --help) or a preset JSON
    path: str | None = None  # an existing prepared cohort directory (instead of simulate)
    subjects: int = 200  # simulated subjects (one scan each)
    atlas: str = "schaefer100_tian_s1"  # atlas of the simulated scans
    seed: int = 0  # simulation seed
    tasks: tuple[str, ...] = ()  # registry task names; empty = every task the cohort has a target for
    descriptors: str | None = None  # 'fmrilm describe' output of an existing cohort (else described in B)

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\") or self.name.startswith("."):
            raise FmrilmError(f"cohort name {self.name!r} must be a plain file name such as 'ukb'")
        if (self.simulate is None) == (self.path is None):
            raise FmrilmError(f"cohort {self.name}: give exactly one of \"simulate\" (a preset) or \"path\" (a cohort)")
        if not _is_int(self.subjects) or self.subjects < 10:
            raise FmrilmError(f"cohort {self.name}: subjects must be an integer >= 10, got {self.subjects!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise FmrilmError(f"cohort {self.name}: seed must be an integer >= 0, got {self.seed!r}")
        for task in self.tasks:
            get_task(task)

    @classmethod
    def from_dict(cls, record: dict) -> "CohortSpec":
        _refuse_unknown(record, cls, f"cohort {record.get('name', '?')}")
        return cls(**{**record, "tasks": tuple(record.get("tasks", ()))})


@dataclass(frozen=True)
class BenchmarkConfig:
    """Everything a benchmark run depends on (saved as ``B/config.json``)."""

    cohorts: tuple[CohortSpec, ...]  # at least one
    methods: tuple[str, ...]  # baseline names (fmrilm.evaluate.baselines.BASELINES) and/or "fmrilm"
    seeds: int = 3  # splits 0..seeds-1, the same for every method
    shots: tuple[int, ...] = (2, 4, 10)  # few-shot training-set sizes (total, balanced over classes); () = none
    tasks: tuple[str, ...] = ()  # if given, keep only these tasks of every cohort
    test_fraction: float = 0.2  # share of subjects in each test part
    val_fraction: float = 0.1  # share of subjects for early stopping of the neural baselines
    params: dict = field(default_factory=dict)  # baseline name -> estimator hyper-parameters
    describe: dict = field(default_factory=dict)  # DescribeConfig fields for the descriptor baselines
    fmrilm: dict = field(default_factory=dict)  # results (R/results.json) or models, paradigm, shots, stages
    description: str = ""

    def __post_init__(self) -> None:
        if not self.cohorts:
            raise FmrilmError("the benchmark has no cohorts; list at least one (--cohorts ukb)")
        names = [c.name for c in self.cohorts]
        if len(set(names)) != len(names):
            raise FmrilmError(f"cohort names repeat in {names}; give each cohort its own name")
        _check_methods(self.methods)
        _check_counts(self.seeds, self.shots)
        for task in self.tasks:
            get_task(task)
        test, val = self.test_fraction, self.val_fraction
        if not (0 < test < 1 and 0 <= val < 1 and test + val < 1):
            raise FmrilmError(f"test_fraction {self.test_fraction} and val_fraction {self.val_fraction} must be "
                              "shares in [0, 1) with a sum below 1, e.g. 0.2 and 0.1")
        _check_params(self.params)
        unknown = set(self.fmrilm) - set(FMRILM_KEYS)
        if unknown:
            raise FmrilmError(f"unknown fmrilm settings {sorted(unknown)}; known: {', '.join(FMRILM_KEYS)}")

    @property
    def baselines(self) -> tuple[str, ...]:
        return tuple(m for m in self.methods if m != FMRILM)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "BenchmarkConfig":
        record = {k: v for k, v in record.items() if k not in ("name",)}
        _refuse_unknown(record, cls, "benchmark config")
        for key in ("cohorts", "methods"):
            if key not in record:
                raise FmrilmError(f"benchmark config lacks {key!r}; see 'fmrilm benchmark --help'")
        cohorts = tuple(CohortSpec.from_dict(c) for c in record["cohorts"])
        tuples = {k: tuple(record[k]) for k in ("methods", "shots", "tasks") if k in record}
        return cls(**{**record, **tuples, "cohorts": cohorts})


def _refuse_unknown(record: object, cls: type, what: str) -> None:
    if not isinstance(record, dict):
        raise FmrilmError(f"{what} must be a JSON object, got {type(record).__name__}")
    unknown = set(record) - {f.name for f in fields(cls)}
    if unknown:
        raise FmrilmError(f"{what}: unknown keys {sorted(unknown)}; known: {', '.join(f.name for f in fields(cls))}")


def _check_methods(methods: tuple[str, ...]) -> None:
    allowed = (*BASELINES, FMRILM)
    if not methods:
        raise FmrilmError(f"the benchmark has no methods; use some of {', '.join(allowed)}")
    for method in methods:
        if method not in allowed:
            raise FmrilmError(f"unknown method {method!r}; use one of {', '.join(allowed)}")
    if len(set(methods)) != len(methods):
        raise FmrilmError(f"methods repeat in {list(methods)}; list each once")


def _check_counts(seeds: object, shots: tuple) -> None:
    if not _is_int(seeds) or seeds < 1:
        raise FmrilmError(f"seeds must be an integer >= 1 (the number of splits), got {seeds!r}")
    bad = [k for k in shots if not _is_int(k) or k < 2]
    if bad or len(set(shots)) != len(shots):
        raise FmrilmError(f"shots {list(shots)} must be distinct integers >= 2 (training scans per few-shot run), "
                          "e.g. 2 4 10")


def _check_params(params: dict) -> None:
    for method, values in params.items():
        if method not in BASELINES:
            raise FmrilmError(f"params for unknown baseline {method!r}; use one of {', '.join(BASELINES)}")
        baseline = BASELINES[method]
        known = set(baseline("classification").get_params()) | set(baseline("regression").get_params())
        unknown = set(values) - known
        if unknown:
            raise FmrilmError(f"params of {method}: unknown {sorted(unknown)}; known: {', '.join(sorted(known))}")


# ----------------------------------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """Names accepted by :func:`load_benchmark_preset`: the JSON files in ``presets/benchmark``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_benchmark_preset(name: str | os.PathLike) -> BenchmarkConfig:
    """A benchmark config by preset name (``quick``, ``paper``) or from a JSON file path."""
    path = Path(name)
    if path.suffix != ".json":
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise FmrilmError(f"unknown benchmark preset {str(name)!r}; choose one of {', '.join(list_presets())} "
                              "or a JSON file")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FmrilmError(f"benchmark preset {path} is not readable JSON ({exc.__class__.__name__})") from None
    return BenchmarkConfig.from_dict(record)


def _cohort_override(value: str, config: BenchmarkConfig) -> CohortSpec:
    """A --cohorts value: a cohort of the preset, a simulation preset or a prepared cohort directory."""
    from fmrilm.data.simulate import list_presets as simulation_presets

    by_name = {c.name: c for c in config.cohorts}
    if value in by_name:
        return by_name[value]
    if value in simulation_presets():
        return replace(config.cohorts[0], name=value, simulate=value, path=None, tasks=(), descriptors=None)
    if Path(value).is_dir():
        path = Path(value).absolute()
        return CohortSpec(name=path.name, path=str(path))
    raise FmrilmError(f"unknown cohort {value!r}; use a cohort of the preset ({', '.join(by_name)}), a simulation "
                      f"preset ({', '.join(simulation_presets())}) or a prepared cohort directory")


def resolve_config(preset: str | os.PathLike | BenchmarkConfig = "quick", *, cohorts: list[str] | None = None,
                   tasks: list[str] | None = None, methods: list[str] | None = None, seeds: int | None = None,
                   shots: list[int] | None = None, fmrilm_results: str | os.PathLike | None = None,
                   fmrilm_models: list[str] | None = None) -> BenchmarkConfig:
    """A preset with the command-line overrides applied (None = keep the preset's value)."""
    config = preset if isinstance(preset, BenchmarkConfig) else load_benchmark_preset(preset)
    changes: dict = {}
    if cohorts is not None:
        changes["cohorts"] = tuple(_cohort_override(c, config) for c in cohorts)
    if tasks is not None:
        changes["tasks"] = tuple(tasks)
    if methods is not None:
        changes["methods"] = tuple(methods)
    if seeds is not None:
        changes["seeds"] = seeds
    if shots is not None:
        changes["shots"] = tuple(shots)
    if fmrilm_results is not None and fmrilm_models is not None:
        raise FmrilmError("give --fmrilm-results (rows of fmrilm evaluate) or --fmrilm-models (evaluated here), "
                          "not both")
    if fmrilm_results is not None:
        changes["fmrilm"] = {**config.fmrilm, "results": str(Path(fmrilm_results).absolute()), "models": None}
    if fmrilm_models is not None:
        models = [str(Path(m).absolute()) for m in fmrilm_models]
        changes["fmrilm"] = {**config.fmrilm, "results": None, "models": models}
    return replace(config, **changes)
