"""Brain atlases: where their files are, which ROIs they hold, and the ROI table every cohort carries.

An atlas is a label image (for parcellating NIfTI data) plus an ROI table with one row per label in label
order: ``index`` (0-based column in the time series), ``label`` (the integer in the image), ``name``,
``network`` (Yeo-7 name for Schaefer parcels, ``Subcortical`` for Tian regions), ``hemisphere`` (L/R) and
``x, y, z`` (MNI centre of mass in mm, where known).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.constants import SUBCORTICAL, YEO7_NETWORKS
from fmrilm.errors import FmrilmError
from fmrilm.io import plain_mode, sha256_file

_SOURCE = "https://raw.githubusercontent.com/yetianmed/subcortex/master/Group-Parcellation/3T/Cortex-Subcortex/"


@dataclass(frozen=True)
class AtlasSpec:
    """A named atlas of the registry: its files (with sha256) in the public Tian/Schaefer repository."""

    name: str
    image: str
    image_sha256: str
    labels: str
    labels_sha256: str
    n_rois: int
    description: str


REGISTRY: dict[str, AtlasSpec] = {
    spec.name: spec
    for spec in (
        AtlasSpec(
            "schaefer400_tian_s3",
            "Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3_MNI152NLin6Asym_2mm.nii.gz",
            "a6568b75ec7920bc60262d8b10dfaf9bb9fdbddd518c7313b48ae7465b687d7f",
            "Schaefer2018_400Parcels_7Networks_order_Tian_Subcortex_S3_label.txt",
            "98653ec054aacf4513fa828e49c9e22991b2d15f4200ecf134ba31c7e5af6869",
            450,
            "the paper's atlas: Tian S3 subcortex (50) then Schaefer-400 7-network cortex, MNI152NLin6Asym 2 mm",
        ),
        AtlasSpec(
            "schaefer100_tian_s1",
            "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1_MNI152NLin6Asym_2mm.nii.gz",
            "c569d92097f389e6f98ae379b75c9d26c2a48b9056fa4cbea9fc3c08e0d32ba0",
            "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1_label.txt",
            "7ef4c82f6fcc3901bef0286af486c586eb91412878c6fcaa7d231a8d345badbc",
            116,
            "for quick runs: Tian S1 subcortex (16) then Schaefer-100 7-network cortex, MNI152NLin6Asym 2 mm",
        ),
    )
}


@dataclass
class Atlas:
    """An atlas ready for use: its name, ROI table and (when it has one) its label image."""

    name: str
    rois: pd.DataFrame
    image: Path | None = None

    @property
    def n_rois(self) -> int:
        return len(self.rois)


def list_atlases() -> list[str]:
    """Names accepted by ``--atlas`` besides a path to a user label image."""
    return sorted(REGISTRY)


def _search_dirs(atlas_dir: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(atlas_dir)] if atlas_dir else []
    if os.environ.get("FMRILM_DATA"):
        dirs.append(Path(os.environ["FMRILM_DATA"]))
        dirs.append(Path(os.environ["FMRILM_DATA"]) / "atlases")
    # ../shared beside the checkout: development and CI on this project's machines.
    for parent in Path(__file__).resolve().parents:
        dirs.append(parent.parent / "shared" / "atlases" / "schaefer_tian")
        if (parent / ".git").exists() or (parent / "pyproject.toml").exists():
            break
    dirs.append(cache_dir() / "atlases")
    return dirs


def cache_dir() -> Path:
    """The user cache directory for fmrilm (``$FMRILM_CACHE``, else ``$XDG_CACHE_HOME/fmrilm``)."""
    if os.environ.get("FMRILM_CACHE"):
        return Path(os.environ["FMRILM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmrilm"


def _download(filename: str, sha256: str, dest_dir: Path) -> Path:
    dest = dest_dir / filename
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest_dir, delete=False) as tmp:
        with urllib.request.urlopen(_SOURCE + filename, timeout=60) as response:
            shutil.copyfileobj(response, tmp)
    if sha256_file(Path(tmp.name)) != sha256:
        os.unlink(tmp.name)
        raise FmrilmError(f"downloaded {filename} does not match its sha256 checksum; try again or place it by hand")
    plain_mode(tmp.name)  # NamedTemporaryFile is private (0600); the cache is shared like any download
    os.replace(tmp.name, dest)
    return dest


def find_atlas_file(filename: str, sha256: str, atlas_dir: str | os.PathLike | None = None) -> Path:
    """Locate an atlas file: ``atlas_dir``, ``$FMRILM_DATA``, ``../shared`` beside the checkout, the cache,
    then a checksummed download from the public source; offline and missing, a clear error."""
    dirs = _search_dirs(atlas_dir)
    for directory in dirs:
        if (directory / filename).is_file():
            return directory / filename
    try:
        return _download(filename, sha256, cache_dir() / "atlases")
    except (OSError, ValueError) as exc:  # URLError is an OSError
        raise FmrilmError(
            f"atlas file {filename} not found in {', '.join(str(d) for d in dirs[:2]) or 'any search folder'} "
            f"and could not be downloaded ({exc.__class__.__name__}); place it in --atlas-dir or $FMRILM_DATA"
        ) from None


def read_label_txt(path: Path) -> pd.DataFrame:
    """Read a Tian/Schaefer label file (a name line, then an ``id R G B A`` line, per label)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if len(lines) % 2:
        raise FmrilmError(f"{path}: expected alternating name and 'id R G B A' lines, got an odd line count")
    names, labels = lines[0::2], [int(line.split()[0]) for line in lines[1::2]]
    return roi_table(names, labels)


def _network(name: str) -> str:
    parts = name.split("_")
    if len(parts) >= 3 and parts[0].endswith("Networks") and parts[2] in YEO7_NETWORKS:
        return parts[2]
    if len(parts) >= 3 and parts[0].endswith("Networks"):
        return parts[2]  # 17-network names keep their own label (VisCent, DefaultA...)
    return SUBCORTICAL


def _hemisphere(name: str) -> str:
    if "_LH_" in name or name.endswith(("-lh", "_lh")) or name.startswith("L"):
        return "L"
    if "_RH_" in name or name.endswith(("-rh", "_rh")) or name.startswith("R"):
        return "R"
    return ""


def roi_table(names: list[str], labels: list[int] | None = None) -> pd.DataFrame:
    """Build the standard ROI table from names (network and hemisphere parsed from Schaefer/Tian names)."""
    labels = list(range(1, len(names) + 1)) if labels is None else list(labels)
    return pd.DataFrame(
        {
            "index": np.arange(len(names)),
            "label": labels,
            "name": names,
            "network": [_network(n) for n in names],
            "hemisphere": [_hemisphere(n) for n in names],
            "x": np.nan,
            "y": np.nan,
            "z": np.nan,
        }
    )


def add_centroids(rois: pd.DataFrame, image: Path) -> pd.DataFrame:
    """Fill ``x, y, z`` with each label's centre of mass in world (MNI) millimetres."""
    import nibabel as nib
    from scipy import ndimage

    img = nib.load(str(image))
    data = np.asarray(img.dataobj).astype(np.int64)
    centres = ndimage.center_of_mass(np.ones_like(data, dtype=np.float32), data, rois["label"].to_numpy())
    world = nib.affines.apply_affine(img.affine, np.asarray(centres, dtype=float))
    rois = rois.copy()
    rois[["x", "y", "z"]] = np.round(world, 2)
    return rois


def read_roi_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a user ROI table (csv/tsv with at least ``name``; optional label, network, hemisphere, x, y, z)
    or a Tian/Schaefer label txt."""
    path = Path(path)
    if not path.is_file():
        raise FmrilmError(f"ROI table {path} does not exist; pass a csv/tsv with a 'name' column")
    if path.suffix == ".txt":
        return read_label_txt(path)
    table = pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
    if "name" not in table.columns:
        raise FmrilmError(f"ROI table {path} has no 'name' column (columns: {', '.join(map(str, table.columns))})")
    rois = roi_table(table["name"].astype(str).tolist(), table["label"] if "label" in table else None)
    for column in ("network", "hemisphere", "x", "y", "z"):
        if column in table.columns:
            rois[column] = table[column].to_numpy()
    return rois


def load_atlas(
    name: str = "schaefer400_tian_s3",
    *,
    atlas_dir: str | os.PathLike | None = None,
    labels: str | os.PathLike | None = None,
    with_image: bool = True,
) -> Atlas:
    """Load a registry atlas by name, or a user atlas: a label NIfTI (with ``labels`` table) or an ROI table.

    Parameters
    ----------
    name
        A registry name (see :func:`list_atlases`), a path to a label image (``.nii``/``.nii.gz``), or a path
        to an ROI table (csv/tsv/txt) when only time series are ingested.
    atlas_dir
        Extra folder searched first for registry files.
    labels
        ROI table for a user label image; without it ROIs are named ``roi_<label>``.
    with_image
        Whether the label image is needed (it is not for ROI time-series input).
    """
    if name in REGISTRY:
        spec = REGISTRY[name]
        rois = read_label_txt(find_atlas_file(spec.labels, spec.labels_sha256, atlas_dir))
        image = find_atlas_file(spec.image, spec.image_sha256, atlas_dir) if with_image else None
        if image is not None:
            rois = add_centroids(rois, image)
        return Atlas(name, rois, image)
    path = Path(name)
    if path.name.endswith((".nii", ".nii.gz")):
        return _user_image_atlas(path, labels)
    if path.suffix in (".csv", ".tsv", ".txt"):
        return Atlas(path.stem, read_roi_table(path))
    raise FmrilmError(
        f"unknown atlas {name!r}; use one of {', '.join(list_atlases())}, a label image (.nii.gz) or an ROI table"
    )


def _user_image_atlas(path: Path, labels: str | os.PathLike | None) -> Atlas:
    import nibabel as nib

    if not path.is_file():
        raise FmrilmError(f"atlas image {path} does not exist")
    try:
        data = np.asarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise FmrilmError(f"atlas image {path} cannot be read as NIfTI ({exc.__class__.__name__})") from None
    if data.ndim != 3:
        raise FmrilmError(f"atlas image {path} must be a 3D label image, got shape {data.shape}")
    present = [int(v) for v in np.unique(data) if v != 0]
    if labels is not None:
        rois = read_roi_table(labels)
        missing = sorted(set(rois["label"]) - set(present))
        if missing:
            raise FmrilmError(f"atlas labels {missing[:5]} of {labels} are absent from {path}; check the pairing")
    else:
        rois = roi_table([f"roi_{v}" for v in present], present)
    return Atlas(path.name.split(".")[0], add_centroids(rois, path), path)
