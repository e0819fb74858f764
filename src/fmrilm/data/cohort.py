"""The cohort store: the contract between stages.

A cohort is a directory::

    timeseries.h5      dataset "timeseries", S x T x N float32, chunked one scan per chunk, read lazily
    scans.parquet      one row per scan: scan_id, subject_id, dataset, site, source_file, native_tr,
                       native_length, qc_* flags (row i describes timeseries[i])
    phenotypes.parquet one row per subject, keyed by subject_id
    rois.parquet       one row per ROI: index, label, name, network, hemisphere, x, y, z
    meta.json          atlas, tr, length, every preprocessing parameter, fitted normalisation statistics,
                       package version

Tables are Parquet so identifiers such as ``"007"`` keep their type.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from fmrilm.constants import META_FILE, PHENOTYPES_FILE, ROIS_FILE, SCANS_FILE, TIMESERIES_DATASET, TIMESERIES_FILE
from fmrilm.errors import FmrilmError

SCAN_COLUMNS = ("scan_id", "subject_id", "dataset", "site", "source_file", "native_tr", "native_length")


class Cohort:
    """A prepared cohort opened for reading. Use as a context manager, or call :meth:`close`.

    Attributes
    ----------
    timeseries : h5py.Dataset
        Array-like of shape (S, T, N), float32, read lazily: ``cohort.timeseries[i]`` loads one scan.
    scans, phenotypes, rois : pandas.DataFrame
    meta : dict
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        _check_complete(self.path)
        self.meta = json.loads((self.path / META_FILE).read_text())
        self.scans = pd.read_parquet(self.path / SCANS_FILE)
        self.phenotypes = pd.read_parquet(self.path / PHENOTYPES_FILE)
        self.rois = pd.read_parquet(self.path / ROIS_FILE)
        self._file = h5py.File(self.path / TIMESERIES_FILE, "r")
        self.timeseries = self._file[TIMESERIES_DATASET]
        if self.timeseries.shape[0] != len(self.scans):
            raise FmrilmError(f"cohort {self.path}: {self.timeseries.shape[0]} arrays but {len(self.scans)} scan rows; prepare it again")

    def __len__(self) -> int:
        return len(self.scans)

    def __enter__(self) -> "Cohort":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def scan(self, index: int) -> np.ndarray:
        """One standardized scan, shape (T, N) float32."""
        return np.asarray(self.timeseries[index])

    def scan_phenotypes(self) -> pd.DataFrame:
        """The scan table joined with each scan's subject phenotypes (one row per scan, same order)."""
        extra = [c for c in self.phenotypes.columns if c == "subject_id" or c not in self.scans.columns]
        return self.scans.merge(self.phenotypes[extra], on="subject_id", how="left")

    def __repr__(self) -> str:
        s, t, n = self.timeseries.shape
        return f"Cohort({str(self.path)!r}, scans={s}, subjects={self.scans['subject_id'].nunique()}, T={t}, N={n})"


def _check_complete(path: Path) -> None:
    if not path.is_dir():
        raise FmrilmError(f"cohort {path} does not exist; create it with 'fmrilm prepare ... --out {path}'")
    for name in (TIMESERIES_FILE, SCANS_FILE, PHENOTYPES_FILE, ROIS_FILE, META_FILE):
        if not (path / name).is_file():
            raise FmrilmError(f"cohort {path} is incomplete: {name} is missing; prepare it again")


def load_cohort(path: str | Path) -> Cohort:
    """Open a prepared cohort directory (see the module docstring for its layout)."""
    return Cohort(path)


class TimeseriesWriter:
    """Append standardized scans one at a time to a chunked, resizable (S, T, N) float32 HDF5 dataset."""

    def __init__(self, path: Path, length: int, n_rois: int):
        self._file = h5py.File(path, "w")
        self.dataset = self._file.create_dataset(
            TIMESERIES_DATASET,
            shape=(0, length, n_rois),
            maxshape=(None, length, n_rois),
            chunks=(1, length, n_rois),
            dtype=np.float32,
        )

    def append(self, x: np.ndarray) -> int:
        """Store one (T, N) scan and return its row index."""
        index = self.dataset.shape[0]
        self.dataset.resize(index + 1, axis=0)
        self.dataset[index] = x
        return index

    def close(self) -> None:
        self._file.close()


def write_tables(path: Path, scans: pd.DataFrame, phenotypes: pd.DataFrame, rois: pd.DataFrame) -> None:
    """Write the three tables of a cohort directory."""
    scans.to_parquet(path / SCANS_FILE, index=False)
    phenotypes.to_parquet(path / PHENOTYPES_FILE, index=False)
    rois.to_parquet(path / ROIS_FILE, index=False)


def describe_cohort(cohort: Cohort) -> str:
    """A short human-readable summary of a cohort (what ``fmrilm info`` prints)."""
    s, t, n = cohort.timeseries.shape
    meta, scans = cohort.meta, cohort.scans
    lines = [
        f"cohort      {cohort.path}",
        f"scans       {s} from {scans['subject_id'].nunique()} subjects",
        f"array       {s} x {t} x {n} float32 (scans x time x ROIs), TR {meta['tr']} s",
        f"atlas       {meta['atlas']} ({n} ROIs; networks: {', '.join(cohort.rois['network'].value_counts().index)})",
        f"datasets    {_counts(scans['dataset'])}",
        f"sites       {_counts(scans['site'])}",
        f"native TR   {_counts(scans['native_tr'].round(3))}",
        f"native len  {int(scans['native_length'].min())}-{int(scans['native_length'].max())} points",
    ]
    qc = [c for c in scans.columns if c.startswith("qc_")]
    if "qc_length_flag" in qc:
        lines.append(f"length QC   {_counts(scans['qc_length_flag'])}")
    if "qc_n_constant_rois" in qc:
        lines.append(f"constant    {int((scans['qc_n_constant_rois'] > 0).sum())} scans with constant ROIs")
    for column in cohort.phenotypes.columns[1:]:
        values = cohort.phenotypes[column]
        lines.append(f"phenotype   {column}: {int(values.notna().sum())}/{len(values)} filled; {_summary(values)}")
    lines.append(f"skipped     {len(meta.get('skipped', []))} scans")
    lines.append(f"version     fmrilm {meta['fmrilm_version']}, created {meta['created']}")
    return "\n".join(lines)


def _counts(values: pd.Series, top: int = 6) -> str:
    counts = values.astype(str).value_counts()
    text = ", ".join(f"{k} ({v})" for k, v in counts.head(top).items())
    return text + (f", ... {len(counts) - top} more" if len(counts) > top else "")


def _summary(values: pd.Series) -> str:
    if pd.api.types.is_numeric_dtype(values):
        return f"mean {values.mean():.2f}, range {values.min():.2f}-{values.max():.2f}"
    return _counts(values, top=4)
