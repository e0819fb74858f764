"""4D NIfTI parcellation, header TR, plain NIfTI sources and fMRIPrep/BIDS discovery, on tiny synthetic images."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fmrilm.data.atlas import Atlas, load_atlas, roi_table
from fmrilm.data.nifti import (
    CONFOUND_COLUMNS,
    CONFOUND_STRATEGIES,
    bids_sources,
    nifti_sources,
    parcellate,
    read_confounds,
    tr_from_image,
)
from fmrilm.errors import FmrilmError

SHAPE = (12, 14, 10)
AFFINE = np.diag([4.0, 4.0, 4.0, 1.0])
AFFINE[:3, 3] = -(np.asarray(SHAPE) - 1) / 2 * 4  # grid centred on the MNI origin
LABELS = [10, 20, 30, 40, 50, 60]  # not 1..6, so label values and column indices differ
T = 40
REAL_ATLAS_DIR = Path(__file__).resolve().parents[2] / "shared" / "atlases" / "schaefer_tian"
REAL_ATLAS_FILE = "Schaefer2018_100Parcels_7Networks_order_Tian_Subcortex_S1_MNI152NLin6Asym_2mm.nii.gz"


def _label_grid() -> np.ndarray:
    """Six 2-voxel slabs along x inside a background margin; label 60 is the slab at the largest x."""
    grid = np.zeros(SHAPE, dtype=np.int16)
    for i, label in enumerate(LABELS):
        grid[2 * i : 2 * i + 2, 2:12, 2:8] = label
    return grid


@pytest.fixture
def atlas(tmp_path: Path) -> Atlas:
    path = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(_label_grid(), AFFINE), path)
    # ROI table deliberately not in ascending label order: columns must follow the table.
    order = [30, 10, 20, 60, 50, 40]
    return Atlas("tiny", roi_table([f"roi{v}" for v in order], order), path)


def _signals(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {label: 100 + rng.normal(size=T) for label in LABELS}


def _save_bold(path: Path, data: np.ndarray, affine=AFFINE, tr: float | None = 2.0, unit: str = "sec") -> Path:
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    if tr is not None and data.ndim == 4:
        img.header.set_zooms((*np.abs(np.diag(affine)[:3]), tr))
        img.header.set_xyzt_units("mm", unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def _bold(path: Path, signals: dict[int, np.ndarray], extra=None, seed: int = 1, **kwargs) -> Path:
    """4D image on the atlas grid: each labelled voxel = its label's signal (+ extra) + small noise."""
    rng = np.random.default_rng(seed)
    grid = _label_grid()
    data = rng.normal(scale=0.01, size=(*SHAPE, T))
    for label, signal in signals.items():
        data[grid == label] += signal + (0 if extra is None else extra)
    return _save_bold(path, data, **kwargs)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


# ------------------------------------------------------------------------------------------ parcellate
def test_parcellate_recovers_signals_in_roi_table_order(tmp_path, atlas):
    signals = _signals()
    out = parcellate(_bold(tmp_path / "bold.nii.gz", signals), atlas)
    assert out.shape == (T, 6)
    for j, label in enumerate(atlas.rois["label"]):
        assert _corr(out[:, j], signals[label]) > 0.99
        assert abs(out[:, j].mean() - 100) < 0.5  # no standardisation inside


def test_parcellate_resamples_atlas_to_a_shifted_data_grid(tmp_path, atlas):
    signals = _signals()
    grid = _label_grid()
    data = np.random.default_rng(2).normal(scale=0.01, size=(12, 16, 10, T))
    for label, signal in signals.items():
        data[:, 1:15][grid == label] += signal  # data voxel y+1 is atlas voxel y
    affine = AFFINE.copy()
    affine[1, 3] -= 4.0
    out = parcellate(_save_bold(tmp_path / "shifted.nii.gz", data, affine), atlas)
    for j, label in enumerate(atlas.rois["label"]):
        assert _corr(out[:, j], signals[label]) > 0.99


def test_region_outside_field_of_view_is_a_zero_column(tmp_path, atlas):
    signals = _signals()
    path = _bold(tmp_path / "full.nii.gz", signals)
    cropped = _save_bold(tmp_path / "cropped.nii.gz", nib.load(path).get_fdata()[:10])  # drops label 60's slab
    out = parcellate(cropped, atlas)
    assert out.shape == (T, 6)
    column = list(atlas.rois["label"]).index(60)
    assert np.all(out[:, column] == 0)
    for j, label in enumerate(atlas.rois["label"]):
        if label != 60:
            assert _corr(out[:, j], signals[label]) > 0.99


def test_parcellate_regresses_confounds_and_keeps_sample_mask(tmp_path, atlas):
    motion = np.random.default_rng(3).normal(size=T)
    path = _bold(tmp_path / "bold.nii.gz", _signals(), extra=5 * motion)
    assert abs(_corr(parcellate(path, atlas)[:, 0], motion)) > 0.9
    cleaned = parcellate(path, atlas, confounds=pd.DataFrame({"trans_x": motion}))
    assert np.all(np.abs([_corr(cleaned[:, j], motion) for j in range(6)]) < 0.05)
    assert parcellate(path, atlas, sample_mask=np.arange(5, T)).shape == (T - 5, 6)
    with pytest.raises(FmrilmError, match="confounds have shape"):
        parcellate(path, atlas, confounds=np.zeros((T - 1, 2)))


def test_parcellate_errors(tmp_path, atlas):
    with pytest.raises(FmrilmError, match="missing.nii.gz: file does not exist"):
        parcellate(tmp_path / "missing.nii.gz", atlas)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(np.random.default_rng(0).bytes(4000))
    with pytest.raises(FmrilmError, match="junk.nii.gz: not a readable NIfTI"):
        parcellate(junk, atlas)
    also_junk = tmp_path / "plainjunk.nii"
    also_junk.write_bytes(np.random.default_rng(1).bytes(4000))
    with pytest.raises(FmrilmError, match="plainjunk.nii"):
        parcellate(also_junk, atlas)
    with pytest.raises(FmrilmError, match="3D image"):
        parcellate(_save_bold(tmp_path / "t1.nii.gz", np.ones(SHAPE)), atlas)
    with pytest.raises(FmrilmError, match="has 1 volume"):
        parcellate(_save_bold(tmp_path / "one.nii.gz", np.ones((*SHAPE, 1))), atlas)
    with pytest.raises(FmrilmError, match="no label image"):
        parcellate(_bold(tmp_path / "ok.nii.gz", _signals()), Atlas("tableonly", atlas.rois))


def test_truncated_gzip_is_reported(tmp_path, atlas):
    path = _bold(tmp_path / "bold.nii.gz", _signals())
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(FmrilmError, match="bold.nii.gz: image data cannot be read .*truncated"):
        parcellate(path, atlas)


def test_image_in_another_space_is_rejected(tmp_path, atlas):
    path = _bold(tmp_path / "bold.nii.gz", _signals())
    far = AFFINE.copy()
    far[:3, 3] += 500.0  # same grid, half a metre away in world space
    with pytest.raises(FmrilmError, match="far.nii.gz: .*not in the space of atlas tiny.*MNI152NLin6Asym"):
        parcellate(_save_bold(tmp_path / "far.nii.gz", nib.load(path).get_fdata(), far), atlas)
    # Overlapping box but brain elsewhere (a native-space image): most regions carry no signal.
    data = np.zeros((*SHAPE, T))
    data[:3] = np.random.default_rng(4).normal(100, 1, size=(3, *SHAPE[1:], T))
    with pytest.raises(FmrilmError, match="native.nii.gz: only 2 of 6 regions contain non-zero signal"):
        parcellate(_save_bold(tmp_path / "native.nii.gz", data), atlas)


@pytest.mark.skipif(not (REAL_ATLAS_DIR / REAL_ATLAS_FILE).is_file(), reason="real Schaefer/Tian atlas not present")
def test_real_116_roi_atlas(tmp_path):
    atlas = load_atlas("schaefer100_tian_s1", atlas_dir=REAL_ATLAS_DIR)
    reference = nib.load(str(atlas.image))
    rng = np.random.default_rng(0)
    data = (100 + rng.normal(size=(*reference.shape[:3], 5))).astype(np.float32)
    out = parcellate(_save_bold(tmp_path / "mni.nii.gz", data, reference.affine), atlas)
    assert out.shape == (5, 116)
    assert np.all(out != 0)


# ----------------------------------------------------------------------------------------------- TR
@pytest.mark.parametrize(
    ("tr", "unit", "expected"),
    [(2.0, "sec", 2.0), (800.0, "msec", 0.8), (1.0, "sec", 1.0), (1.0, "unknown", None),
     (0.0, "sec", None), (720.0, "unknown", 0.72), (2.5, "unknown", 2.5)],
)
def test_tr_from_header(tmp_path, tr, unit, expected):
    path = _save_bold(tmp_path / "bold.nii.gz", np.ones((*SHAPE, 3)), tr=tr, unit=unit)
    assert tr_from_image(path) == (pytest.approx(expected) if expected is not None else None)


# ------------------------------------------------------------------------------------------ NIfTI files
def test_nifti_sources(tmp_path, atlas):
    signals = _signals()
    a = _bold(tmp_path / "sub-07_ses-2_task-rest_bold.nii.gz", signals, tr=2.0)
    b = _bold(tmp_path / "patient3_rest.nii", signals, tr=1.0, unit="unknown")
    sources = nifti_sources([a, b], atlas)
    assert [s.scan_id for s in sources] == ["sub-07_ses-2_task-rest_bold", "patient3_rest"]
    assert [s.subject_id for s in sources] == ["07", "patient3"]
    assert [s.tr for s in sources] == [2.0, None]
    assert sources[0].load().shape == (T, 6)
    assert [s.tr for s in nifti_sources([a, b], atlas, tr=0.8)] == [0.8, 0.8]


def test_nifti_sources_errors(tmp_path, atlas):
    a = _bold(tmp_path / "x" / "scan_1.nii.gz", _signals())
    b = _bold(tmp_path / "y" / "scan_1.nii.gz", _signals())
    with pytest.raises(FmrilmError, match="scan id 'scan_1' is also that of"):
        nifti_sources([a, b], atlas)
    with pytest.raises(FmrilmError, match="notes.txt: not a NIfTI file"):
        nifti_sources([tmp_path / "notes.txt"], atlas)
    with pytest.raises(FmrilmError, match="anat.nii.gz: 3D image"):
        nifti_sources([_save_bold(tmp_path / "anat.nii.gz", np.ones(SHAPE))], atlas)


# ------------------------------------------------------------------------------------------------- BIDS
def _confounds_table(motion: np.ndarray, with_tissue: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    base = {"trans_x": motion, **{c: rng.normal(size=T) for c in CONFOUND_COLUMNS["motion6"][1:]}}
    table = {}
    for column, values in base.items():
        derivative = np.r_[np.nan, np.diff(values)]
        table.update({column: values, f"{column}_derivative1": derivative, f"{column}_power2": values**2,
                      f"{column}_derivative1_power2": derivative**2})
    if with_tissue:
        table.update({c: rng.normal(size=T) for c in ("csf", "white_matter", "global_signal")})
    return pd.DataFrame(table)


@pytest.fixture
def bids(tmp_path) -> tuple[Path, np.ndarray]:
    """Two subjects: sub-01 in three spaces with a JSON sidecar, sub-02 with a session and no sidecar."""
    root, motion = tmp_path / "fmriprep", np.random.default_rng(6).normal(size=T)
    func1, func2 = root / "sub-01" / "func", root / "sub-02" / "ses-1" / "func"
    for space in ("MNI152NLin6Asym", "MNI152NLin2009cAsym", "T1w"):
        _bold(func1 / f"sub-01_task-rest_space-{space}_desc-preproc_bold.nii.gz", _signals(), extra=5 * motion)
    (func1 / "sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.json").write_text(
        json.dumps({"RepetitionTime": 0.72}))
    _confounds_table(motion).to_csv(func1 / "sub-01_task-rest_desc-confounds_timeseries.tsv", sep="\t",
                                    index=False, na_rep="n/a")
    name = "sub-02_ses-1_task-rest_run-1_space-MNI152NLin2009cAsym_res-2_desc-preproc_bold.nii.gz"
    _bold(func2 / name, _signals(1), tr=1.5)
    _confounds_table(motion).to_csv(func2 / "sub-02_ses-1_task-rest_run-1_desc-confounds_regressors.tsv",
                                    sep="\t", index=False, na_rep="n/a")
    return root, motion


def test_bids_sources_discovery(bids, atlas):
    root, _ = bids
    sources = bids_sources(root, atlas)
    assert [s.scan_id for s in sources] == ["sub-01_task-rest", "sub-02_ses-1_task-rest_run-1"]
    assert [s.subject_id for s in sources] == ["01", "02"]
    assert [s.tr for s in sources] == [0.72, 1.5]  # sidecar beats the header's 2.0; header otherwise
    assert sources[0].extra == {"session": None, "task": "rest", "run": None, "space": "MNI152NLin6Asym"}
    assert sources[1].extra == {"session": "1", "task": "rest", "run": "1", "space": "MNI152NLin2009cAsym"}
    assert [s.extra["space"] for s in bids_sources(root, atlas, space="MNI152NLin2009cAsym")] == [
        "MNI152NLin2009cAsym"] * 2


@pytest.mark.parametrize("strategy", ["motion6", "24p"])
def test_bids_confound_regression_removes_motion(bids, atlas, strategy):
    root, motion = bids
    raw = bids_sources(root, atlas)[0].load()
    assert abs(_corr(raw[:, 0], motion)) > 0.9
    cleaned = bids_sources(root, atlas, confounds=strategy)[0].load()
    assert cleaned.shape == (T, 6)
    assert max(abs(_corr(cleaned[:, j], motion)) for j in range(6)) < 0.05


def test_read_confounds_fills_first_derivative_row(bids):
    root, _ = bids
    table = read_confounds(root / "sub-01" / "func" / "sub-01_task-rest_desc-confounds_timeseries.tsv", "24p")
    assert table.shape == (T, 24) and not table.isna().any().any()
    assert table["trans_x_derivative1"].iloc[0] == 0
    assert set(CONFOUND_STRATEGIES) >= {"none", "motion6", "24p", "9p", "36p"}
    assert len(CONFOUND_COLUMNS["36p"]) == 36


def test_bids_errors(bids, atlas, tmp_path):
    root, _ = bids
    with pytest.raises(FmrilmError, match="BIDS folder .*nowhere does not exist"):
        bids_sources(tmp_path / "nowhere", atlas)
    with pytest.raises(FmrilmError, match=r"no file matches sub-\*/func/\*desc-preproc_bold.nii.gz"):
        bids_sources(tmp_path, atlas)
    with pytest.raises(FmrilmError, match="no desc-preproc_bold file in space MNI152NLin6Asym or .*found spaces: "):
        (root / "sub-01" / "func" / "sub-01_task-rest_space-MNI152NLin6Asym_desc-preproc_bold.nii.gz").unlink()
        for path in root.rglob("*MNI152NLin2009cAsym*"):
            path.unlink()
        bids_sources(root, atlas)


def test_bids_confound_errors(bids, atlas):
    root, _ = bids
    with pytest.raises(FmrilmError, match="unknown confounds strategy 'aroma'; use one of none, motion6, 24p"):
        bids_sources(root, atlas, confounds="aroma")
    with pytest.raises(FmrilmError, match="strategy '9p' needs columns missing from the file: csf, white_matter, "
                                          "global_signal"):
        bids_sources(root, atlas, confounds="9p")
    (root / "sub-01" / "func" / "sub-01_task-rest_desc-confounds_timeseries.tsv").unlink()
    with pytest.raises(FmrilmError, match="preproc_bold.nii.gz: --confounds motion6 needs "
                                          "sub-01_task-rest_desc-confounds_timeseries.tsv beside it"):
        bids_sources(root, atlas, confounds="motion6")
    assert len(bids_sources(root, atlas)) == 2  # no strategy: no confounds file needed


def test_prepare_cli_from_bids_and_nifti(bids, atlas, tmp_path, capsys):
    """`fmrilm prepare --bids/--nifti` with a user label image and ROI table, through to a cohort."""
    from fmrilm import load_cohort
    from fmrilm.cli import main

    root, _ = bids
    labels = tmp_path / "labels.tsv"
    atlas.rois[["label", "name"]].to_csv(labels, sep="\t", index=False)
    common = ["--atlas", str(atlas.image), "--atlas-labels", str(labels), "--length", "10", "--min-points", "8"]
    code = main(["prepare", "--bids", str(root), "--confounds", "motion6", "--out", str(tmp_path / "c_bids"), *common])
    assert code == 0, capsys.readouterr().err
    with load_cohort(tmp_path / "c_bids") as cohort:
        assert cohort.timeseries.shape == (2, 10, 6)
        assert list(cohort.scans["subject_id"]) == ["01", "02"] and list(cohort.scans["native_tr"]) == [0.72, 1.5]
        assert cohort.meta["input"] == {"kind": "bids", "path": str(root), "confounds": "motion6", "space": None}
    image = _bold(tmp_path / "sub-07_rest.nii.gz", _signals(3), tr=2.0)
    code = main(["prepare", "--nifti", str(image), "--out", str(tmp_path / "c_nii"), *common])
    assert code == 0, capsys.readouterr().err
    assert load_cohort(tmp_path / "c_nii").scans["subject_id"].tolist() == ["07"]
    flat = _save_bold(tmp_path / "flat.nii.gz", np.zeros(SHAPE))
    code = main(["prepare", "--nifti", str(flat), "--out", str(tmp_path / "c_bad"), *common])
    err = capsys.readouterr().err
    assert code == 2 and "flat.nii.gz" in err and "4D" in err and err.count("\n") == 1
