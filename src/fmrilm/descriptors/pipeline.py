"""``fmrilm describe``: measure every scan of a cohort, z-score it against a reference, write it as text.

Outputs (written to a temporary directory, renamed when complete)::

    DESC/descriptors.parquet    raw values, one row per scan: scan_id, subject_id, <domain>.<measure>...
    DESC/descriptors_z.parquet  the same columns as z-scores against the reference
    DESC/texts.jsonl            per scan: scan_id, subject_id, fc, fg, ica, graph, text, semantic
    DESC/reference/             the reference used (config.json + arrays.safetensors)
    DESC/meta.json              settings, cohort, reference source, version
"""

from __future__ import annotations

import datetime as _dt
import json
import multiprocessing
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fmrilm import __version__
from fmrilm.data.cohort import Cohort, load_cohort
from fmrilm.descriptors import semantic, text
from fmrilm.descriptors.reference import DescribeConfig, DescriptorReference
from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_output_dir, check_output_dir, write_json_atomic

RAW_FILE, Z_FILE, TEXTS_FILE, REFERENCE_DIR = "descriptors.parquet", "descriptors_z.parquet", "texts.jsonl", "reference"
TEXT_CHUNK = 256  # scan rows turned into dicts at a time when writing texts.jsonl
_WORKER: dict = {}  # the reference and cohort a worker process measures with (inherited through fork)


def training_indices(cohort: Cohort) -> np.ndarray:
    """Scans of training subjects (``split == "train"`` in the phenotypes when present, else every scan)."""
    phenotypes = cohort.phenotypes
    if "split" not in phenotypes.columns:
        return np.arange(len(cohort))
    train = set(phenotypes.loc[phenotypes["split"].astype(str) == "train", "subject_id"])
    return np.flatnonzero(cohort.scans["subject_id"].isin(train).to_numpy())


def _measure_indices(indices: list[int]) -> tuple[tuple[str, ...], np.ndarray]:
    reference, cohort = _WORKER["reference"], _WORKER["cohort"]
    return _block([reference.measure(cohort.scan(i)) for i in indices])


def _block(rows: list[dict]) -> tuple[tuple[str, ...], np.ndarray]:
    """Measure dicts as (column names, (len(rows), C) float64): 8 bytes a value instead of ~100 in a dict."""
    columns = tuple(dict.fromkeys(key for row in rows for key in row))
    return columns, np.array([[row.get(c, np.nan) for c in columns] for row in rows], dtype=np.float64)


class _Blocks:
    """Measured chunks in arrival order; chunks with the same columns share one tuple of names."""

    def __init__(self) -> None:
        self.blocks: list[tuple[tuple[str, ...], np.ndarray]] = []
        self._layouts: dict[tuple[str, ...], tuple[str, ...]] = {}

    def add(self, block: tuple[tuple[str, ...], np.ndarray]) -> int:
        columns, values = block
        self.blocks.append((self._layouts.setdefault(columns, columns), values))
        return len(values)

    def table(self) -> pd.DataFrame:
        """One row per measured scan; a column some chunks lack is NaN there (as a DataFrame of dicts)."""
        if not self.blocks:
            return pd.DataFrame()
        if len(self._layouts) == 1:
            (columns,) = self._layouts
            return pd.DataFrame(np.concatenate([v for _, v in self.blocks]), columns=list(columns))
        return pd.concat([pd.DataFrame(v, columns=list(c)) for c, v in self.blocks], ignore_index=True)


def measure_all(reference: DescriptorReference, cohort: Cohort, jobs: int = 1, chunk: int = 8) -> pd.DataFrame:
    """Raw measures of every scan of ``cohort`` (one row per scan), in ``jobs`` processes.

    Scans are read one chunk at a time (in each worker) and every chunk is kept as a float64 array, so memory
    grows by 8 bytes per scan and measure, not by a dict per scan.
    """
    chunks = [list(range(i, min(i + chunk, len(cohort)))) for i in range(0, len(cohort), chunk)]
    _WORKER.update(reference=reference, cohort=cohort)
    blocks = _Blocks()
    with tqdm(total=len(cohort), desc="describe", unit="scan", disable=None) as progress:
        if jobs <= 1:
            for block in map(_measure_indices, chunks):
                progress.update(blocks.add(block))
        else:
            cohort.close()  # an HDF5 handle must not be shared across fork: reopen in every process
            _WORKER["cohort"] = _Reopen(cohort.path)
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                for block in pool.imap(_measure_indices, chunks):
                    progress.update(blocks.add(block))
    _WORKER.clear()
    return blocks.table()


class _Reopen:
    """Opens the cohort lazily inside each worker process."""

    def __init__(self, path: Path):
        self.path, self._cohort = path, None

    def scan(self, index: int) -> np.ndarray:
        if self._cohort is None:
            self._cohort = load_cohort(self.path)
        return self._cohort.scan(index)


def _texts(cohort: Cohort, z: pd.DataFrame, raw: pd.DataFrame, config: DescribeConfig) -> Iterator[dict]:
    """The texts.jsonl records, one scan at a time (a cohort's texts are ~7 KB a scan: never all held)."""
    table = cohort.scan_phenotypes()
    text_config = text.TextConfig(top_k=config.top_k)
    rows = (row for start in range(0, len(table), TEXT_CHUNK)
            for row in table.iloc[start:start + TEXT_CHUNK].to_dict(orient="records"))
    for i, row in enumerate(rows):
        domains = text.describe(z.iloc[i].to_dict(), raw.iloc[i].to_dict(), seed=config.seed + i, config=text_config)
        yield {
            "scan_id": row["scan_id"], "subject_id": row["subject_id"], **domains,
            "text": text.paragraph(domains),
            "semantic": semantic.semantic_description(row, task=None, seed=config.seed + i),
        }


def run_describe(
    cohort_path: str | Path,
    out: str | Path,
    *,
    reference: str | Path | None = None,
    config: DescribeConfig | None = None,
    jobs: int = 1,
    overwrite: bool = False,
) -> Path:
    """Describe every scan of a prepared cohort (see the module docstring for the outputs).

    Parameters
    ----------
    reference
        A saved reference directory (``DESC/reference`` of an earlier run) to describe against; by default a
        reference is fitted on this cohort's training scans.
    jobs
        Worker processes for the per-scan measures.
    """
    check_output_dir(out, overwrite)
    cohort = load_cohort(cohort_path)
    if reference is not None:
        ref = DescriptorReference.from_pretrained(reference)
        ref.check_compatible(cohort.rois, cohort.meta["atlas"])
        config, train = ref.config, None
    else:
        ref = DescriptorReference(config or DescribeConfig())
        config, train = ref.config, training_indices(cohort)
        ref.fit_models(cohort, train)
    raw = measure_all(ref, cohort, jobs=jobs)
    cohort.close()
    cohort = load_cohort(cohort_path)
    if train is not None:
        ref.fit_statistics(raw.iloc[train])
    raw = raw[ref.columns_]
    z = ref.zscore(raw)
    ids = cohort.scans[["scan_id", "subject_id"]].reset_index(drop=True)
    with atomic_output_dir(out, overwrite) as tmp:
        pd.concat([ids, raw], axis=1).to_parquet(tmp / RAW_FILE, index=False)
        pd.concat([ids, z], axis=1).to_parquet(tmp / Z_FILE, index=False)
        with open(tmp / TEXTS_FILE, "w") as handle:
            for record in _texts(cohort, z, raw, config):
                handle.write(json.dumps(record) + "\n")
        ref.save_pretrained(tmp / REFERENCE_DIR)
        write_json_atomic(tmp / "meta.json", {
            "fmrilm_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cohort": str(Path(cohort_path).resolve()), "n_scans": len(cohort), "config": config.to_dict(),
            "reference": str(reference) if reference else "fitted on this cohort",
            "n_reference_scans": None if train is None else int(len(train)), "columns": ref.columns_,
        })
    cohort.close()
    return Path(out)


def load_descriptors(path: str | Path, z: bool = True) -> pd.DataFrame:
    """Read ``descriptors_z.parquet`` (or the raw values with ``z=False``) of a describe output."""
    path = Path(path) / (Z_FILE if z else RAW_FILE)
    if not path.is_file():
        raise FmrilmError(f"{path} does not exist; run 'fmrilm describe COHORT --out {path.parent}' first")
    return pd.read_parquet(path)
