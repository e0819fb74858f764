"""4D NIfTI input: parcellate volumes with an atlas label image, and find fMRIPrep derivatives in BIDS.

:func:`nifti_sources` and :func:`bids_sources` only find scans; each :class:`ScanSource` parcellates its
image when ``load()`` is called, so one 4D image at a time is held in memory. Parcellation averages the
voxels of each atlas label (nilearn's ``NiftiLabelsMasker``, labels resampled to the data grid with nearest
neighbour) and does no standardising, detrending or filtering: :mod:`fmrilm.preprocess` does that.

Confound strategies (``--confounds``) regress fMRIPrep confounds out inside ``load()``:

``none``     nothing (default)
``motion6``  trans_x/y/z, rot_x/y/z
``24p``      motion6 + their derivatives, squares and squared derivatives
``9p``       motion6 + csf, white_matter, global_signal
``36p``      9p + their derivatives, squares and squared derivatives
"""

from __future__ import annotations

import itertools
import json
import re
import zlib
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from fmrilm.data.atlas import Atlas
from fmrilm.data.sources import ScanSource
from fmrilm.errors import FmrilmError

# Preference order when one run exists in several spaces: the registry atlases are in MNI152NLin6Asym.
MNI_SPACES = ("MNI152NLin6Asym", "MNI152NLin2009cAsym")
_MOTION = [f"{kind}_{axis}" for kind in ("trans", "rot") for axis in "xyz"]
_TISSUE = ["csf", "white_matter", "global_signal"]


def _expand(base: list[str]) -> list[str]:
    return base + [f"{c}{s}" for s in ("_derivative1", "_power2", "_derivative1_power2") for c in base]


CONFOUND_COLUMNS: dict[str, list[str]] = {
    "none": [],
    "motion6": _MOTION,
    "24p": _expand(_MOTION),
    "9p": _MOTION + _TISSUE,
    "36p": _expand(_MOTION + _TISSUE),
}
CONFOUND_STRATEGIES: list[str] = list(CONFOUND_COLUMNS)

_BOLD_PATTERNS = ("sub-*/func/*desc-preproc_bold.nii.gz", "sub-*/ses-*/func/*desc-preproc_bold.nii.gz")
_CONFOUND_SUFFIXES = ("desc-confounds_timeseries.tsv", "desc-confounds_regressors.tsv")  # new, pre-20.2 names
_NOT_RUN_ENTITIES = {"space", "res", "den", "cohort", "desc"}  # differ between outputs of the same run
_MIN_FRACTION = 0.5  # of atlas box covered / of atlas regions with signal, below which spaces differ
_TIME_SCALE = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}
_TR_RANGE = (0.05, 30.0)  # seconds; anything outside is a placeholder, not a repetition time
_SPACE_FIX = "register it to MNI or use fMRIPrep's space-MNI152NLin6Asym (or MNI152NLin2009cAsym) output"


# ----------------------------------------------------------------------------------------------- images
def _stem(path: Path) -> str:
    for ext in (".nii.gz", ".nii"):
        if path.name.endswith(ext):
            return path.name[: -len(ext)]
    return path.stem


def _open(path: str | Path) -> nib.spatialimages.SpatialImage:
    path = Path(path)
    if not path.is_file():
        raise FmrilmError(f"{path}: file does not exist; check the path")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises many types (gzip, ImageFileError...) for damaged files
        raise FmrilmError(f"{path}: not a readable NIfTI image ({exc.__class__.__name__}); re-export it") from None


def _open_4d(path: str | Path) -> nib.spatialimages.SpatialImage:
    img = _open(path)
    shape = img.shape
    if len(shape) == 3:
        raise FmrilmError(f"{path}: 3D image {shape}; a 4D (x, y, z, time) resting-state series is needed")
    if len(shape) != 4:
        raise FmrilmError(f"{path}: image shape {shape} is not 4D (x, y, z, time); pass a 4D BOLD series")
    if shape[3] < 2:
        raise FmrilmError(f"{path}: 4D image has {shape[3]} volume(s); at least 2 time points are needed")
    return img


def _read_data(img: nib.spatialimages.SpatialImage, path: Path) -> np.ndarray:
    try:
        return np.asanyarray(img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:  # truncated gzip / short uncompressed file
        raise FmrilmError(f"{path}: image data cannot be read ({exc.__class__.__name__}, truncated or "
                          "corrupt file); copy or export it again") from None


def tr_from_image(img_path: str | Path) -> float | None:
    """Repetition time in seconds from the NIfTI header (``pixdim[4]`` with its ``xyzt_units``).

    Rule: explicit units (s, ms, us) are converted to seconds; with unknown units, 1.0 (the value every
    writer puts when it knows nothing) and 0 are untrusted, values >= 100 are read as milliseconds and smaller
    ones as seconds. A result outside 0.05-30 s is untrusted too.

    Returns
    -------
    float or None
        The TR in seconds, or None when the header does not give a trustworthy one.
    """
    header = _open(img_path).header
    zooms = header.get_zooms()
    if len(zooms) < 4 or not hasattr(header, "get_xyzt_units"):
        return None
    value, unit = float(zooms[3]), header.get_xyzt_units()[1]
    if unit in _TIME_SCALE:
        tr = value * _TIME_SCALE[unit]
    elif unit == "unknown" and value != 1.0:
        tr = value / 1000.0 if value >= 100 else value
    else:
        return None
    return tr if _TR_RANGE[0] <= tr <= _TR_RANGE[1] else None


# ------------------------------------------------------------------------------------------ parcellation
def _atlas_labels(atlas: Atlas) -> nib.Nifti1Image:
    if atlas.image is None:
        raise FmrilmError(f"atlas {atlas.name} has no label image; pass a registry atlas or a label .nii.gz")
    img = _open(atlas.image)
    data = np.rint(np.asanyarray(img.dataobj)).astype(np.int32)  # float-stored labels are integers
    if data.ndim != 3 or not data.any():
        raise FmrilmError(f"atlas image {atlas.image} is not a 3D label image with non-zero labels")
    return nib.Nifti1Image(data, img.affine)


def _world_box(affine: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    corners = np.array(list(itertools.product(*zip(lo, hi))), dtype=float)
    world = nib.affines.apply_affine(affine, corners)
    return world.min(axis=0), world.max(axis=0)


def _box_overlap(img: nib.spatialimages.SpatialImage, labels: nib.Nifti1Image) -> float:
    """Fraction of the atlas's labelled bounding box (world mm) inside the image's field of view."""
    voxels = np.argwhere(np.asarray(labels.dataobj) != 0)
    a_lo, a_hi = _world_box(labels.affine, voxels.min(0) - 0.5, voxels.max(0) + 0.5)
    d_lo, d_hi = _world_box(img.affine, np.full(3, -0.5), np.asarray(img.shape[:3]) - 0.5)
    inside = np.clip(np.minimum(a_hi, d_hi) - np.maximum(a_lo, d_lo), 0, None)
    return float(np.prod(inside) / np.prod(a_hi - a_lo))


def _space_error(path: Path, atlas: Atlas, found: str) -> FmrilmError:
    return FmrilmError(f"{path}: {found}; the image is not in the space of atlas {atlas.name} (MNI): {_SPACE_FIX}")


def _labels_on_grid(labels: nib.Nifti1Image, img: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
    if labels.shape == img.shape[:3] and np.allclose(labels.affine, img.affine, atol=1e-4):
        return labels
    from nilearn.image import resample_img

    resampled = resample_img(labels, target_affine=img.affine, target_shape=img.shape[:3], interpolation="nearest")
    return nib.Nifti1Image(np.rint(np.asanyarray(resampled.dataobj)).astype(np.int32), img.affine)


def _check_confounds(confounds, n_volumes: int, path: Path) -> np.ndarray | None:
    if confounds is None:
        return None
    try:
        values = np.asarray(confounds, dtype=float)
    except (TypeError, ValueError):
        raise FmrilmError(f"{path}: confounds hold non-numeric values; pass numbers only") from None
    values = values[:, None] if values.ndim == 1 else values
    if values.ndim == 2 and values.shape[1] == 0:
        return None
    if values.ndim != 2 or values.shape[0] != n_volumes:
        raise FmrilmError(f"{path}: confounds have shape {values.shape} but the image has {n_volumes} volumes; "
                          "pass one confound row per volume")
    if not np.isfinite(values).all():
        raise FmrilmError(f"{path}: confounds hold NaN or infinite values; fill or drop those rows first")
    return values


def _extract(img: nib.spatialimages.SpatialImage, path: Path, labels: nib.Nifti1Image, confounds, sample_mask):
    from nilearn.maskers import NiftiLabelsMasker

    data = nib.Nifti1Image(_read_data(img, path), img.affine)
    masker = NiftiLabelsMasker(labels_img=labels, resampling_target="data", strategy="mean", standardize=None,
                               detrend=False, standardize_confounds=True)  # demeaned confounds keep ROI means
    return masker.fit_transform(data, confounds=confounds, sample_mask=sample_mask)


def parcellate(
    img_path: str | Path,
    atlas: Atlas,
    confounds: pd.DataFrame | np.ndarray | None = None,
    sample_mask: np.ndarray | None = None,
) -> np.ndarray:
    """Mean BOLD signal of every atlas region, in atlas ROI-table order.

    Parameters
    ----------
    img_path
        4D NIfTI image, shape (X, Y, Z, T), in the atlas's space (MNI).
    atlas
        Atlas with a label image; its ROI table's ``label`` column gives the column order.
    confounds
        Optional regressors, shape (T, K), regressed out of every region's signal (no other cleaning).
    sample_mask
        Optional indices (or boolean mask) of the volumes to keep, as nilearn takes it.

    Returns
    -------
    numpy.ndarray
        Shape (T, N) with N = ``len(atlas.rois)`` (T = kept volumes with ``sample_mask``). Regions with no
        voxel in the image's field of view are columns of zeros.

    Raises
    ------
    FmrilmError
        Missing/corrupt file, not 4D, fewer than 2 volumes, image not in the atlas space, bad confounds.
    """
    path = Path(img_path)
    img = _open_4d(path)
    labels = _atlas_labels(atlas)
    wanted = atlas.rois["label"].astype(int).to_numpy()
    if _box_overlap(img, labels) < _MIN_FRACTION:
        raise _space_error(path, atlas, "its field of view covers under half of the atlas regions' extent")
    labels = _labels_on_grid(labels, img)
    present = np.unique(np.asarray(labels.dataobj))
    present = present[present != 0]
    if np.isin(wanted, present).sum() < _MIN_FRACTION * len(wanted):
        raise _space_error(path, atlas, f"only {np.isin(wanted, present).sum()} of {len(wanted)} regions overlap it")
    signals = _extract(img, path, labels, _check_confounds(confounds, img.shape[3], path), sample_mask)
    columns = {int(label): i for i, label in enumerate(present)}
    out = np.zeros((signals.shape[0], len(wanted)), dtype=np.float64)
    for j, label in enumerate(wanted):
        if label in columns:
            out[:, j] = signals[:, columns[label]]
    # Data that is zero over most regions sits in another space (e.g. native) that happens to overlap MNI.
    n_signal = int(np.any(out != 0, axis=0).sum())
    if n_signal < _MIN_FRACTION * len(wanted):
        raise _space_error(path, atlas, f"only {n_signal} of {len(wanted)} regions contain non-zero signal")
    return out


# -------------------------------------------------------------------------------------------- NIfTI files
def _subject_from_name(stem: str) -> str:
    match = re.search(r"(?:^|_)sub-([A-Za-z0-9]+)(?:_|$)", stem)
    if match:
        return match.group(1)
    return stem.split("_")[0] or stem


def _check_unique(sources: list[ScanSource]) -> None:
    seen: dict[str, Path] = {}
    for source in sources:
        if source.scan_id in seen:
            raise FmrilmError(f"{source.path}: scan id {source.scan_id!r} is also that of {seen[source.scan_id]}; "
                              "rename one of the files so every scan id is unique")
        seen[source.scan_id] = source.path


def nifti_sources(paths: list[str | Path], atlas: Atlas, tr: float | None = None) -> list[ScanSource]:
    """One :class:`ScanSource` per 4D NIfTI file, parcellated with ``atlas`` when loaded.

    ``scan_id`` is the file name without ``.nii``/``.nii.gz``; ``subject_id`` the BIDS ``sub-<label>`` value
    when present, else the name up to the first ``_``. ``tr`` (seconds) overrides the header's TR; without
    either the source's TR is None and the caller must ask for ``--tr``.

    Returns
    -------
    list of ScanSource
        ``load()`` returns shape (T, N), N = ``len(atlas.rois)``.
    """
    if tr is not None and not tr > 0:
        raise FmrilmError(f"--tr {tr} is not a positive number of seconds")
    _atlas_labels(atlas)  # fail before any scan if the atlas has no usable image
    sources = []
    for raw in paths:
        path = Path(raw)
        if not path.name.endswith((".nii", ".nii.gz")):
            raise FmrilmError(f"{path}: not a NIfTI file (.nii or .nii.gz); pass 4D BOLD images")
        _open_4d(path)  # header only: wrong files fail now, not halfway through the cohort
        stem = _stem(path)
        scan_tr = tr if tr is not None else tr_from_image(path)
        sources.append(ScanSource(stem, _subject_from_name(stem), path, partial(parcellate, path, atlas), scan_tr))
    _check_unique(sources)
    return sources


# ----------------------------------------------------------------------------------------- BIDS / fMRIPrep
def _entities(path: Path) -> dict[str, str]:
    return dict(part.split("-", 1) for part in _stem(path).split("_") if "-" in part)


def _run_prefix(entities: dict[str, str]) -> str:
    return "_".join(f"{key}-{value}" for key, value in entities.items() if key not in _NOT_RUN_ENTITIES)


def _check_strategy(confounds: str | None) -> str:
    strategy = (confounds or "none").lower()
    if strategy not in CONFOUND_COLUMNS:
        raise FmrilmError(f"unknown confounds strategy {confounds!r}; use one of {', '.join(CONFOUND_STRATEGIES)}")
    return strategy


def _pick_spaces(bolds: list[Path], space: str | None, root: Path) -> list[Path]:
    """Keep one file per run: a wanted space, the preferred one first, then 2 mm resolution."""
    wanted = [space] if space else list(MNI_SPACES)
    runs: dict[str, list[Path]] = {}
    for path in bolds:
        entities = _entities(path)
        if entities.get("space") in wanted:
            runs.setdefault(_run_prefix(entities), []).append(path)
    if not runs:
        found = sorted({_entities(p).get("space", "none") for p in bolds})
        raise FmrilmError(f"{root}: no desc-preproc_bold file in space {' or '.join(wanted)} (found spaces: "
                          f"{', '.join(found)}); run fMRIPrep with --output-spaces MNI152NLin6Asym:res-2")

    def rank(path: Path) -> tuple:
        entities = _entities(path)
        return wanted.index(entities["space"]), entities.get("res", "2") != "2", path.name

    return [min(paths, key=rank) for paths in runs.values()]


def _sidecar_tr(bold: Path) -> float | None:
    sidecar = bold.with_name(_stem(bold) + ".json")
    if sidecar.is_file():
        try:
            tr = json.loads(sidecar.read_text()).get("RepetitionTime")
        except (ValueError, AttributeError):
            raise FmrilmError(f"{sidecar}: not a valid JSON object; fix or delete the sidecar") from None
        if isinstance(tr, (int, float)) and tr > 0:
            return float(tr)
    return tr_from_image(bold)


def _confounds_file(bold: Path, entities: dict[str, str], strategy: str) -> Path:
    prefix = _run_prefix(entities)
    for suffix in _CONFOUND_SUFFIXES:
        if (bold.parent / f"{prefix}_{suffix}").is_file():
            return bold.parent / f"{prefix}_{suffix}"
    raise FmrilmError(f"{bold}: --confounds {strategy} needs {prefix}_{_CONFOUND_SUFFIXES[0]} beside it; "
                      "copy fMRIPrep's confounds file there or use --confounds none")


def _check_columns(path: Path, strategy: str) -> None:
    try:
        columns = set(pd.read_csv(path, sep="\t", nrows=0).columns)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
        raise FmrilmError(f"{path}: not a tab-separated confounds table; restore fMRIPrep's file") from None
    missing = [c for c in CONFOUND_COLUMNS[strategy] if c not in columns]
    if missing:
        shown = ", ".join(missing[:8]) + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise FmrilmError(f"{path}: confounds strategy {strategy!r} needs columns missing from the file: {shown}; "
                          "choose another --confounds strategy")


def read_confounds(path: str | Path, strategy: str) -> pd.DataFrame:
    """The columns of an fMRIPrep confounds tsv that ``strategy`` regresses out, shape (T, K).

    Derivative columns start with ``n/a`` (no previous volume); those become 0.
    """
    path, columns = Path(path), CONFOUND_COLUMNS[_check_strategy(strategy)]
    _check_columns(path, strategy)
    table = pd.read_csv(path, sep="\t", usecols=columns)[columns].apply(pd.to_numeric, errors="coerce")
    derivatives = [c for c in columns if "derivative" in c]
    table.loc[table.index[:1], derivatives] = table.loc[table.index[:1], derivatives].fillna(0.0)
    bad = [c for c in columns if table[c].isna().any()]
    if bad:
        raise FmrilmError(f"{path}: confound columns {', '.join(bad[:5])} hold non-numeric or missing values "
                          "beyond the first row; fix the file or choose another --confounds strategy")
    return table


def _load_bids_run(bold: Path, atlas: Atlas, confounds_path: Path | None, strategy: str) -> np.ndarray:
    confounds = read_confounds(confounds_path, strategy) if confounds_path is not None else None
    return parcellate(bold, atlas, confounds=confounds)


def _bids_source(bold: Path, atlas: Atlas, strategy: str) -> ScanSource:
    entities = _entities(bold)
    confounds_path = None
    if CONFOUND_COLUMNS[strategy]:
        confounds_path = _confounds_file(bold, entities, strategy)
        _check_columns(confounds_path, strategy)  # fail at discovery, not after hours of loading
    subject = entities.get("sub") or next(p for p in bold.parts if p.startswith("sub-"))[4:]
    extra = {"session": entities.get("ses"), "task": entities.get("task"), "run": entities.get("run"),
             "space": entities.get("space")}
    load = partial(_load_bids_run, bold, atlas, confounds_path, strategy)
    return ScanSource(_run_prefix(entities), subject, bold, load, _sidecar_tr(bold), extra)


def bids_sources(
    bids_dir: str | Path, atlas: Atlas, space: str | None = None, confounds: str | None = None
) -> list[ScanSource]:
    """One :class:`ScanSource` per fMRIPrep run (``sub-*/[ses-*/]func/*desc-preproc_bold.nii.gz``).

    Parameters
    ----------
    bids_dir
        The fMRIPrep output folder (holding the ``sub-*`` folders).
    atlas
        Atlas with a label image, used when each scan is loaded.
    space
        Template space to use; by default MNI152NLin6Asym, else MNI152NLin2009cAsym, per run.
    confounds
        One of :data:`CONFOUND_STRATEGIES` (None = ``none``), read from the run's confounds tsv.

    Returns
    -------
    list of ScanSource
        ``scan_id`` from the sub/ses/task/acq/run entities, ``subject_id`` without ``sub-``, TR from the JSON
        sidecar's ``RepetitionTime`` (else the header), ``extra`` = session, task, run, space. ``load()``
        returns shape (T, N), N = ``len(atlas.rois)``.
    """
    root = Path(bids_dir)
    if not root.is_dir():
        raise FmrilmError(f"BIDS folder {root} does not exist; pass fMRIPrep's output folder to --bids")
    strategy = _check_strategy(confounds)
    _atlas_labels(atlas)
    bolds = sorted({path for pattern in _BOLD_PATTERNS for path in root.glob(pattern)})
    if not bolds:
        raise FmrilmError(f"{root}: no file matches {' or '.join(_BOLD_PATTERNS)}; pass fMRIPrep's output "
                          "folder (e.g. derivatives/fmriprep)")
    sources = [_bids_source(bold, atlas, strategy) for bold in _pick_spaces(bolds, space, root)]
    _check_unique(sources)
    return sources
