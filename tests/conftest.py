"""Shared fixtures: small seeded synthetic scans of unequal sizes, written the way users bring them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ATLAS_DIR = SHARED / "atlases" / "schaefer_tian"
N_ROIS = 11


def ar1_scan(rng: np.random.Generator, n_time: int, n_rois: int = N_ROIS, phi: float = 0.6, scale=1.0, mean=1000.0) -> np.ndarray:
    """A (T, N) BOLD-like series: AR(1) noise with a shared component, a per-ROI baseline and scale."""
    noise = rng.standard_normal((n_time, n_rois)) + 0.5 * rng.standard_normal((n_time, 1))
    x = np.empty_like(noise)
    x[0] = noise[0]
    for t in range(1, n_time):
        x[t] = phi * x[t - 1] + noise[t]
    return mean + scale * x * rng.uniform(0.5, 2.0, n_rois)


@pytest.fixture
def roi_csv(tmp_path: Path) -> Path:
    """An ROI table for an 11-ROI user atlas (two networks)."""
    path = tmp_path / "rois.csv"
    networks = ["Vis"] * 6 + ["Default"] * 5
    pd.DataFrame({"name": [f"roi{i}" for i in range(N_ROIS)], "network": networks}).to_csv(path, index=False)
    return path


def write_scans(directory: Path, subjects: list[str], fmt: str = "npy", n_time=(150, 137, 171), tr_of=None, seed=0, transpose=False):
    """Write one file per subject in ``fmt`` and return {subject: array (T, N)}."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, subject in enumerate(subjects):
        x = ar1_scan(rng, n_time[i % len(n_time)])
        arrays[subject] = x
        stored = x.T if transpose else x
        path = directory / f"{subject}.{fmt}"
        if fmt == "npy":
            np.save(path, stored.astype(np.float32))
        elif fmt in ("csv", "tsv"):
            pd.DataFrame(stored).to_csv(path, sep="," if fmt == "csv" else "\t", index=False, header=False)
        elif fmt in ("txt", "1D"):
            np.savetxt(path, stored)
        elif fmt == "mat":
            import scipy.io

            scipy.io.savemat(path, {"tc": stored, "note": np.array([[1.0]])})
    return arrays


@pytest.fixture
def scan_dir(tmp_path: Path) -> Path:
    """Six subjects (two sites, TR 0.8 and 2.0 s) as .npy files plus participants.tsv."""
    subjects = [f"s{i:02d}" for i in range(6)]
    write_scans(tmp_path / "ts", subjects, n_time=(420, 390, 171, 165))
    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{s}" for s in subjects],
            "sex": ["M", "F", "male", "female", "M", "F"],
            "age": [30, 41.5, 52, 63, 70, 25],
            "site": ["A", "A", "B", "B", "A", "B"],
            "tr": [0.8, 0.8, 2.0, 2.0, 0.8, 2.0],
            "handedness": ["R", "L", "R", "R", "R", "L"],
        }
    )
    # subject ids 0-3 have 420/390 points at 0.8 s (168/156 at 2 s); 2-3 have 171/165 points at 2 s.
    table.loc[table["site"] == "B", "tr"] = 2.0
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    return tmp_path


def pytest_collection_modifyitems(config, items):
    if not ATLAS_DIR.is_dir():
        skip = pytest.mark.skip(reason=f"atlas files not found at {ATLAS_DIR}")
        for item in items:
            if "needs_atlas" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Torch on one thread: tiny models gain nothing from threads, and on a loaded 2-core machine OpenMP
    threads that wait for each other made single tests up to 30x slower. Tests that want more set it themselves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
