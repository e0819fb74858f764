"""ROI time-series files: one file per scan, named ``<subject_id>[_<suffix>].<ext>``.

Formats: ``.npy``; ``.csv``/``.tsv`` (an optional header row of ROI names); ``.txt``/``.1D`` (whitespace
separated, ``#`` comments as AFNI writes them); ``.mat`` (MATLAB v5 or v7.3; the variable chosen with
``mat_key`` or the only 2D numeric one). Time runs along rows (T x N) unless the orientation says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.data.sources import ScanSource
from fmrilm.errors import FmrilmError

EXTENSIONS = (".npy", ".csv", ".tsv", ".txt", ".1d", ".mat")
ORIENTATIONS = ("auto", "time-rows", "time-cols")


def read_matrix(path: str | Path, mat_key: str | None = None) -> np.ndarray:
    """Read the 2D numeric matrix stored in one time-series file, as float64, exactly as stored.

    Raises
    ------
    FmrilmError
        Empty file, non-numeric cells, an unknown extension, or an ambiguous/missing MATLAB variable.
    """
    path = Path(path)
    if not path.is_file():
        raise FmrilmError(f"{path}: file does not exist")
    if path.stat().st_size == 0:
        raise FmrilmError(f"{path}: file is empty; remove it or replace it with the scan's time series")
    ext = path.suffix.lower()
    if ext == ".npy":
        matrix = _read_npy(path)
    elif ext in (".csv", ".tsv", ".txt", ".1d"):
        matrix = _read_text(path, ext)
    elif ext == ".mat":
        matrix = _read_mat(path, mat_key)
    else:
        raise FmrilmError(f"{path}: unsupported extension {ext!r}; use one of {', '.join(EXTENSIONS)}")
    if matrix.ndim == 1:
        matrix = matrix[:, None]
    if matrix.ndim != 2 or matrix.size == 0:
        raise FmrilmError(f"{path}: expected a 2D time x ROI matrix, got shape {matrix.shape}")
    return matrix


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FmrilmError(f"{path}: not a readable .npy array ({exc}); re-save it with numpy.save") from None
    if not _real_numeric(array):
        raise FmrilmError(f"{path}: array dtype {array.dtype} is not real numeric; save float values")
    return array.astype(np.float64)


def read_csv_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """``pandas.read_csv(path, **kwargs)`` with an empty file, ragged rows or text that is not UTF-8 refused in
    one line that starts with ``what`` (the option or file the table came from)."""
    try:
        table = pd.read_csv(path, **kwargs)
    except pd.errors.EmptyDataError:
        raise FmrilmError(f"{what}: file holds no values; remove it or fill it in") from None
    except pd.errors.ParserError as exc:
        raise FmrilmError(f"{what}: rows have different numbers of columns ({str(exc).strip()[:80]})") from None
    except UnicodeDecodeError as exc:
        raise FmrilmError(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 text") from None
    if not isinstance(table.index, pd.RangeIndex):  # pandas turns the first column into an index when rows are longer
        raise FmrilmError(f"{what}: data rows have more fields than the header row; check the separator and quoting")
    return table


def _read_text(path: Path, ext: str) -> np.ndarray:
    sep = {".csv": ",", ".tsv": "\t"}.get(ext, r"\s+")
    table = read_csv_table(path, str(path), sep=sep, header=None, comment="#", dtype=str, na_filter=False)
    table = table.fillna("").apply(lambda column: column.str.strip())
    numeric = table.apply(pd.to_numeric, errors="coerce")
    # "nan" cells are numbers (check_finite reports them later); anything else that failed to parse is not.
    bad = (numeric.isna() & (table.apply(lambda column: column.str.lower()) != "nan")).to_numpy()
    if bad[0].all() and len(table) > 1:  # a header row of ROI names (a row of "nan" values is data)
        table, numeric, bad = table.iloc[1:], numeric.iloc[1:], bad[1:]
    if bad.any():
        row, col = np.argwhere(bad)[0]
        cell = table.iat[row, col]
        what = f"non-numeric cell {cell!r}" if cell else "empty cell"
        raise FmrilmError(f"{path}: {what} at data row {row + 1}, column {col + 1}; every cell needs a number")
    return numeric.to_numpy(dtype=np.float64)


def _read_mat(path: Path, mat_key: str | None) -> np.ndarray:
    variables = _mat_variables(path)
    candidates = {
        k: v for k, v in variables.items() if np.ndim(v) == 2 and np.size(v) > 1 and _real_numeric(v)
    }  # MATLAB stores scalars as 1 x 1 matrices: not candidates
    if mat_key is not None:
        if mat_key not in variables:
            raise FmrilmError(f"{path}: no variable {mat_key!r}; it holds {', '.join(variables) or 'nothing'} (--mat-key)")
        if not _real_numeric(variables[mat_key]):
            raise FmrilmError(f"{path}: variable {mat_key!r} is not a real numeric matrix; save the time series as doubles")
        return np.asarray(variables[mat_key], dtype=np.float64)
    if len(candidates) != 1:
        raise FmrilmError(
            f"{path}: {len(candidates)} 2D numeric variables ({', '.join(candidates) or 'none'}); "
            "name the time series with --mat-key"
        )
    return np.asarray(next(iter(candidates.values())), dtype=np.float64)


def _real_numeric(value: object) -> bool:
    dtype = np.asarray(value).dtype
    return np.issubdtype(dtype, np.number) and not np.issubdtype(dtype, np.complexfloating)


def _mat_variables(path: Path) -> dict:
    import scipy.io

    try:
        return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        return _mat_v73_variables(path)
    except Exception as exc:  # scipy's parser raises many types (MatReadError, IndexError...) on damaged files
        raise FmrilmError(f"{path}: not a readable MATLAB file ({type(exc).__name__}: {str(exc)[:80]})") from None


def _mat_v73_variables(path: Path) -> dict:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            # MATLAB stores arrays column-major: transpose back to the shape MATLAB shows.
            return {k: np.asarray(v).T for k, v in handle.items() if isinstance(v, h5py.Dataset)}
    except Exception as exc:  # a damaged HDF5 body raises OSError, KeyError or RuntimeError depending on the damage
        raise FmrilmError(f"{path}: not a readable MATLAB v7.3 file ({type(exc).__name__}: {str(exc)[:80]})") from None


def orient(matrix: np.ndarray, n_rois: int, orientation: str, path: Path | str) -> np.ndarray:
    """Return ``matrix`` as (T, N) given the expected ROI count and the stated orientation.

    ``auto`` accepts (T, N); a matrix that only fits as (N, T) or that is square (T == N) is refused with a
    hint to pass ``--transpose`` (time along columns) or ``--orientation time-rows``.
    """
    if orientation not in ORIENTATIONS:
        raise FmrilmError(f"orientation {orientation!r} is not one of {', '.join(ORIENTATIONS)}")
    if orientation == "time-cols":
        matrix = matrix.T
    rows, cols = matrix.shape
    if orientation == "auto" and rows == cols == n_rois:
        raise FmrilmError(
            f"{path}: ambiguous orientation, shape {matrix.shape} is square with {n_rois} ROIs; "
            "pass --orientation time-rows or --transpose"
        )
    if cols == n_rois:
        return matrix
    if orientation == "auto" and rows == n_rois:
        raise FmrilmError(f"{path}: shape {matrix.shape} looks like ROIs x time ({n_rois} ROIs); pass --transpose")
    raise FmrilmError(
        f"{path}: {cols} ROI columns but the atlas has {n_rois} ROIs (shape {matrix.shape}); "
        "choose the matching --atlas or pass --transpose if time runs along columns"
    )


def check_scan(x: np.ndarray, n_rois: int, path: Path | str) -> np.ndarray:
    """Return ``x`` as a float64 (T, N) scan, refusing another ROI count, fewer than 2 time points or NaN/Inf."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != n_rois:
        raise FmrilmError(f"{path}: shape {x.shape} does not match the atlas's {n_rois} ROIs")
    if len(x) < 2:  # resampling a single time point crashes scipy's polyphase filter (SIGFPE)
        raise FmrilmError(f"{path}: {len(x)} time point, a scan needs a time series; remove the file or fix its orientation")
    check_finite(x, path)
    return x


def check_finite(x: np.ndarray, path: Path | str) -> None:
    """Refuse NaN or Inf values, naming the first offending time point and ROI."""
    finite = np.isfinite(x)
    if not finite.all():
        t, roi = np.argwhere(~finite)[0]
        kind = "NaN" if np.isnan(x[t, roi]) else "Inf"
        count = int((~finite).sum())
        raise FmrilmError(
            f"{path}: {count} {kind}/non-finite values (first at time point {t}, ROI {roi}); "
            "interpolate or remove them before prepare"
        )


def subject_from_stem(stem: str, known_subjects: set[str] | None = None) -> str:
    """Subject of a file named ``<subject_id>[_<suffix>]``: the longest known subject that prefixes the stem,
    else the part before the first ``_``; a ``sub-`` prefix is dropped."""
    bare = stem[4:] if stem.startswith("sub-") else stem
    if known_subjects:
        matches = [s for s in known_subjects if bare == s or bare.startswith(s + "_")]
        if matches:
            return max(matches, key=len)
    return bare.split("_", 1)[0]


def timeseries_sources(
    directory: str | Path,
    n_rois: int,
    *,
    orientation: str = "auto",
    mat_key: str | None = None,
    known_subjects: set[str] | None = None,
) -> list[ScanSource]:
    """Find the time-series files of ``directory`` (one per scan) and say how to load each as (T, N).

    Parameters
    ----------
    directory
        Folder of files ``<subject_id>[_<suffix>].<ext>`` with ext in :data:`EXTENSIONS`.
    n_rois
        ROI count of the atlas; files must have exactly this many ROI columns.
    orientation
        ``auto`` (time along rows, refusing shapes that only fit transposed), ``time-rows`` or ``time-cols``.
    known_subjects
        Subject ids from the phenotype table, used to split the subject from the suffix.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FmrilmError(f"--timeseries {directory}: not a directory; pass the folder holding one file per scan")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise FmrilmError(f"--timeseries {directory}: no files with extension {', '.join(EXTENSIONS)}")
    sources = []
    for path in files:
        def load(path: Path = path) -> np.ndarray:
            return orient(read_matrix(path, mat_key), n_rois, orientation, path)

        sources.append(ScanSource(path.stem, subject_from_stem(path.stem, known_subjects), path, load))
    return sources
