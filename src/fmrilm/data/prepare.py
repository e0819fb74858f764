"""``fmrilm prepare``: turn scans in any supported format into a standardized cohort store.

Scans are read, validated, standardized and written one at a time (memory does not grow with the number of
scans); site-wise variance normalisation is fitted on the training subjects in a first pass and applied in
place in a second. Everything is written to a temporary directory that replaces ``out`` only on success.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fmrilm import __version__
from fmrilm.constants import META_FILE, TIMESERIES_FILE
from fmrilm.data.atlas import Atlas
from fmrilm.data.cohort import Cohort, TimeseriesWriter, load_cohort, write_tables
from fmrilm.data.phenotypes import report_unmatched
from fmrilm.data.readers import check_scan
from fmrilm.data.sources import ScanSource, check_identifier
from fmrilm.errors import FmrilmError, FmrilmWarning
from fmrilm.io import atomic_output_dir, check_output_dir, write_json_atomic
from fmrilm.preprocess import PreprocessConfig, SiteVarianceNormalizer, standardize_scan

UNKNOWN_SITE = "unknown"


def _lookup(table: pd.DataFrame | None, key: str, value: str, column: str) -> object:
    if table is None or column not in table.columns:
        return None
    match = table.loc[table[key] == value, column]
    return None if match.empty or pd.isna(match.iloc[0]) else match.iloc[0]


def resolve_scan_info(
    source: ScanSource,
    phenotypes: pd.DataFrame | None,
    scan_table: pd.DataFrame | None,
    tr: float | None,
    dataset: str | None,
) -> dict:
    """TR, site and dataset of one scan: ``--tr`` > scan table > phenotype table > the file's own header."""
    def pick(column: str) -> object:
        for table, key, value in ((scan_table, "scan_id", source.scan_id), (phenotypes, "subject_id", source.subject_id)):
            found = _lookup(table, key, value, column)
            if found is not None:
                return found
        return source.extra.get(column)

    scan_tr = tr if tr is not None else pick("tr") if pick("tr") is not None else source.tr
    if scan_tr is None:
        raise FmrilmError(f"{source.path}: unknown TR; pass --tr SECONDS or add a 'tr' column to the phenotype or scan table")
    scan_tr = float(scan_tr)
    if not np.isfinite(scan_tr) or scan_tr <= 0 or scan_tr > 20:
        raise FmrilmError(f"{source.path}: TR {scan_tr} s is not plausible; give the repetition time in seconds")
    return {
        "scan_id": source.scan_id,
        "subject_id": source.subject_id,
        "dataset": str(pick("dataset") or dataset or "custom"),
        "site": str(pick("site") or UNKNOWN_SITE),
        "source_file": str(source.path),
        "native_tr": scan_tr,
        **{k: v for k, v in source.extra.items() if k not in ("site", "dataset", "tr")},
    }


def _check_ids(sources: list[ScanSource]) -> None:
    for source in sources:
        check_identifier(source.scan_id, f"{source.path}: scan")
        check_identifier(source.subject_id, f"{source.path}: subject")
    ids = pd.Series([s.scan_id for s in sources])
    if ids.duplicated().any():
        dup = ids[ids.duplicated()].iloc[0]
        files = [str(s.path) for s in sources if s.scan_id == dup]
        raise FmrilmError(f"duplicate scan id {dup!r} from {' and '.join(files[:2])}; rename one of the files")


def _load_checked(source: ScanSource, n_rois: int) -> np.ndarray:
    try:
        x = np.asarray(source.load(), dtype=np.float64)
    except (OSError, ValueError, EOFError) as exc:
        if isinstance(exc, FmrilmError):
            raise
        raise FmrilmError(f"{source.path}: cannot be read ({exc.__class__.__name__}: {str(exc)[:80]})") from None
    return check_scan(x, n_rois, source.path)


def _standardize_all(sources, infos, atlas, config, writer, normaliser, train_subjects, skip_bad):
    rows, skipped = [], []
    for source, info in tqdm(list(zip(sources, infos)), desc="prepare", unit="scan", disable=None):
        try:
            x = _load_checked(source, atlas.n_rois)
            windows, qc = _standardize(x, info["native_tr"], config, source.path)
        except FmrilmError as exc:
            if not skip_bad:
                raise
            skipped.append({"scan_id": source.scan_id, "source_file": str(source.path), "reason": str(exc)})
            continue
        for k, window in enumerate(windows):
            writer.append(window)
            scan_id = f"{info['scan_id']}_win-{k}" if config.windows == "all" else info["scan_id"]
            rows.append({**info, "scan_id": scan_id, "native_length": len(x), "window": k, **_qc_columns(qc)})
            if normaliser is not None and (train_subjects is None or info["subject_id"] in train_subjects):
                normaliser.partial_fit(window, info["site"])
    return rows, skipped


def _standardize(x: np.ndarray, tr: float, config: PreprocessConfig, path: Path) -> tuple[list[np.ndarray], dict]:
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below, with the file named
            windows, qc = standardize_scan(x, tr, config)
    except FmrilmError as exc:
        raise FmrilmError(f"{path}: {exc}") from None
    for window in windows:
        _check_stored(window, path)
    return windows, qc


def _check_stored(window: np.ndarray, path: Path | str) -> None:
    if not np.isfinite(window).all():
        raise FmrilmError(f"{path}: values too extreme to standardize (they overflow float32); "
                          "remove outliers or rescale the time series")


def _qc_columns(qc: dict) -> dict:
    return {f"qc_{key}": value for key, value in qc.items()}


def _normalise_sites(dataset, rows: list[dict], normaliser: SiteVarianceNormalizer) -> None:
    for index, row in enumerate(tqdm(rows, desc="site variance", unit="scan", disable=None)):
        with np.errstate(over="ignore", invalid="ignore"):
            window = normaliser.transform(dataset[index], row["site"]).astype(np.float32)
        _check_stored(window, row["source_file"])
        dataset[index] = window


def _train_subjects(phenotypes: pd.DataFrame | None) -> set[str] | None:
    """Subjects the site normaliser is fitted on: ``split == "train"`` rows when the table has a split column."""
    if phenotypes is None or "split" not in phenotypes.columns:
        return None
    return set(phenotypes.loc[phenotypes["split"].astype(str) == "train", "subject_id"])


def prepare_cohort(
    sources: list[ScanSource],
    atlas: Atlas,
    out: str | Path,
    *,
    phenotypes: pd.DataFrame | None = None,
    scan_table: pd.DataFrame | None = None,
    tr: float | None = None,
    config: PreprocessConfig | None = None,
    dataset: str | None = None,
    input_description: dict | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> Cohort:
    """Standardize ``sources`` and write them as a cohort store at ``out``.

    Parameters
    ----------
    sources
        Scans to ingest (from :mod:`fmrilm.data.readers` or :mod:`fmrilm.data.nifti`).
    atlas
        The atlas the scans were parcellated with; its ROI table is stored with the cohort.
    phenotypes
        Normalised phenotype table (:func:`fmrilm.data.phenotypes.read_phenotypes`), one row per subject.
    scan_table
        Optional per-scan table keyed by ``scan_id`` with ``tr``, ``site`` or ``dataset`` columns.
    tr
        Repetition time in seconds for every scan, overriding tables and headers.
    skip_bad
        Leave out scans that fail validation (listed in ``meta.json`` under ``skipped``) instead of stopping.

    Returns
    -------
    The prepared :class:`Cohort`, opened for reading.
    """
    config = config or PreprocessConfig()
    check_output_dir(out, overwrite)
    if not sources:
        raise FmrilmError("no scans to prepare; check the input folder or file list")
    _check_ids(sources)
    infos = [resolve_scan_info(s, phenotypes, scan_table, tr, dataset) for s in sources]
    normaliser = SiteVarianceNormalizer() if config.site_variance else None
    with atomic_output_dir(out, overwrite) as tmp:
        writer = TimeseriesWriter(tmp / TIMESERIES_FILE, config.length, atlas.n_rois)
        try:
            rows, skipped = _standardize_all(sources, infos, atlas, config, writer, normaliser, _train_subjects(phenotypes), skip_bad)
            if not rows:
                raise FmrilmError(f"every scan failed validation (first: {skipped[0]['reason']})")
            if normaliser is not None:
                normaliser.finalize()
                _normalise_sites(writer.dataset, rows, normaliser)
        finally:
            writer.close()
        scans = pd.DataFrame(rows)
        phenotypes, unmatched = _phenotype_table(phenotypes, scans)
        write_tables(tmp, scans, phenotypes, atlas.rois)
        meta = _meta(atlas, config, normaliser, scans, skipped, input_description)
        meta["unmatched"] = unmatched
        write_json_atomic(tmp / META_FILE, meta)
    if skipped:
        warnings.warn(f"{len(skipped)} scans skipped (listed in {out}/meta.json)", FmrilmWarning, stacklevel=2)
    return load_cohort(out)


def _phenotype_table(phenotypes: pd.DataFrame | None, scans: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    subjects = set(scans["subject_id"])
    if phenotypes is None:
        return pd.DataFrame({"subject_id": pd.Series(sorted(subjects), dtype="string")}), {}
    return phenotypes, report_unmatched(subjects, set(phenotypes["subject_id"]))


def _meta(atlas, config, normaliser, scans, skipped, input_description) -> dict:
    return {
        "fmrilm_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "atlas": atlas.name,
        "atlas_image": str(atlas.image) if atlas.image else None,
        "n_rois": atlas.n_rois,
        "tr": config.target_tr,
        "length": config.length,
        "layout": "scans x time x rois (S, T, N), float32",
        "preprocess": config.to_dict(),
        "site_normaliser": normaliser.to_dict() if normaliser is not None else None,
        "n_scans": len(scans),
        "n_subjects": int(scans["subject_id"].nunique()),
        "input": input_description or {},
        "skipped": skipped,
    }


def standardize_new_scan(x: np.ndarray, tr: float, meta: dict, site: str | None = None) -> list[np.ndarray]:
    """Standardize a new (T, N) scan exactly as a prepared cohort was, with the cohort's saved statistics.

    Returns the list of (length, N) float32 windows (one unless the cohort was cut into all windows).
    """
    config = PreprocessConfig.from_dict(meta["preprocess"])
    windows, _ = _standardize(check_scan(x, meta["n_rois"], "scan"), tr, config, "scan")
    if meta.get("site_normaliser"):
        normaliser = SiteVarianceNormalizer.from_dict(meta["site_normaliser"])
        windows = [normaliser.transform(w, site).astype(np.float32) for w in windows]
        for window in windows:
            _check_stored(window, "scan")
    return windows
