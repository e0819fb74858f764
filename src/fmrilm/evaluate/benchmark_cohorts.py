"""The cohorts of a benchmark: simulated and prepared (or existing), described when a baseline needs descriptors,
fingerprinted for the cache, and the tasks run on each.

Simulated cohorts live in ``B/raw/<name>`` and ``B/cohorts/<name>``, descriptors in ``B/descriptors/<name>``;
``B/cache/cohorts`` and ``B/cache/descriptors`` record what they were made from, so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.data.cohort import Cohort, load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.baselines import BASELINES
from fmrilm.evaluate.benchmark_config import BenchmarkConfig, CohortSpec
from fmrilm.evaluate.protocol import TASKS, targets
from fmrilm.io import write_json_atomic

CACHE_VERSION = 1  # bump when a cached result changes meaning
MIN_TARGETS = 10  # scans with a target below which a cohort does not have a task
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltCohort:
    """A benchmark cohort ready to use: its prepared directory, descriptors and fingerprints."""

    spec: CohortSpec
    path: Path
    fingerprint: str  # hash of the cohort's meta (minus timestamps) and tables
    descriptors: Path | None = None
    descriptors_fingerprint: str | None = None


def digest(obj: object) -> str:
    """A short, stable hash of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cohort_fingerprint(cohort: Cohort) -> str:
    """A hash of a prepared cohort: its meta.json without timestamps or input paths, and its scan,
    phenotype and ROI tables (any change of the data or the targets changes it)."""
    meta = {k: v for k, v in cohort.meta.items() if k not in ("created", "input", "fmrilm_version")}
    tables = [int(pd.util.hash_pandas_object(t.astype(str), index=False).sum() % 2**63)
              for t in (cohort.scans, cohort.phenotypes, cohort.rois)]
    return digest({"meta": meta, "tables": tables, "shape": list(cohort.timeseries.shape)})


def _prepare_simulated(raw: Path, out: Path, atlas: str) -> None:
    from fmrilm.cli import build_parser
    from fmrilm.data.ingest import prepare_from_args

    argv = ["prepare", "--timeseries", str(raw / "timeseries"), "--phenotypes", str(raw / "participants.tsv"),
            "--atlas", atlas, "--out", str(out), "--overwrite"]
    prepare_from_args(build_parser().parse_args(argv)).close()


def reusable(record: Path, key: dict, target: Path) -> bool:
    """True when ``target`` exists and ``record`` holds ``key``: what made it has not changed."""
    return target.is_dir() and record.is_file() and json.loads(record.read_text()) == json.loads(json.dumps(key))


def _simulated_cohort(spec: CohortSpec, out: Path, log: Progress) -> Path:
    """Simulate and prepare ``spec`` under ``out`` unless an identical one is there already."""
    from fmrilm.data.simulate import simulate_cohort

    path, record = out / "cohorts" / spec.name, out / "cache" / "cohorts" / f"{spec.name}.json"
    key = {"version": CACHE_VERSION, "spec": asdict(spec)}
    if reusable(record, key, path):
        return path
    log(f"simulating {spec.subjects} {spec.simulate} subjects ({spec.atlas}) as cohort {spec.name}")
    raw = out / "raw" / spec.name
    simulate_cohort(spec.simulate, spec.subjects, spec.seed, raw, atlas=spec.atlas, overwrite=True)
    _prepare_simulated(raw, path, spec.atlas)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record, key)
    return path


def _described(spec: CohortSpec, path: Path, fingerprint: str, config: BenchmarkConfig, out: Path,
               log: Progress) -> tuple[Path, str]:
    """The descriptors of a cohort (the spec's, or described under ``out`` once) and their fingerprint."""
    from fmrilm.descriptors.pipeline import run_describe
    from fmrilm.descriptors.reference import DescribeConfig

    if spec.descriptors is not None:
        meta = Path(spec.descriptors) / "meta.json"
        if not meta.is_file():
            raise FmrilmError(f"cohort {spec.name}: descriptors {spec.descriptors} are not a 'fmrilm describe' output")
        return Path(spec.descriptors), digest(json.loads(meta.read_text()) | {"created": None})
    settings = DescribeConfig.from_dict(config.describe).to_dict()
    desc, record = out / "descriptors" / spec.name, out / "cache" / "descriptors" / f"{spec.name}.json"
    key = {"version": CACHE_VERSION, "cohort": fingerprint, "describe": settings}
    if not reusable(record, key, desc):
        log(f"describing cohort {spec.name} (Stage 0 descriptors for descriptor_mlp and text_clf)")
        run_describe(path, desc, config=DescribeConfig.from_dict(config.describe), overwrite=True)
        record.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record, key)
    return desc, digest(key)


def build_cohort(spec: CohortSpec, config: BenchmarkConfig, out: Path, log: Progress) -> BuiltCohort:
    """Simulate, prepare and describe (as the methods need) one cohort, reusing what ``out`` has."""
    path = _simulated_cohort(spec, out, log) if spec.simulate else Path(spec.path)
    with load_cohort(path) as cohort:
        fingerprint = cohort_fingerprint(cohort)
    built = BuiltCohort(spec, path, fingerprint)
    if any(BASELINES[m].needs_descriptors for m in config.baselines):
        desc, desc_fingerprint = _described(spec, path, fingerprint, config, out, log)
        built = replace(built, descriptors=desc, descriptors_fingerprint=desc_fingerprint)
    return built


def _has_task(table: pd.DataFrame, task: str) -> bool:
    spec = TASKS[task]
    if spec.column not in table.columns:
        return False
    if spec.needs_train:
        return int(np.isfinite(pd.to_numeric(table[spec.column], errors="coerce")).sum()) >= MIN_TARGETS
    y, mask = targets(table, spec)
    return int(mask.sum()) >= MIN_TARGETS and (spec.kind == "regression" or len(np.unique(y[mask])) >= 2)


def cohort_tasks(spec: CohortSpec, table: pd.DataFrame, only: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The tasks run on a cohort: its listed tasks (each must have targets), or every registry task it has
    targets for except the binned versions of continuous scores (``age_group``: list them to run them);
    restricted to ``only`` when given."""
    for task in spec.tasks:
        if not _has_task(table, task):
            column = TASKS[task].column
            raise FmrilmError(f"task {task} is not in cohort {spec.name}: fewer than {MIN_TARGETS} scans with a "
                              f"usable {column!r}; drop it from the cohort's tasks")
    tasks = spec.tasks or tuple(t for t, task in TASKS.items() if not task.needs_train and _has_task(table, t))
    return tuple(t for t in tasks if not only or t in only)
