import h5py
import numpy as np
import pytest
import scipy.io

from conftest import write_scans
from fmrilm.data.readers import check_finite, orient, read_matrix, subject_from_stem, timeseries_sources
from fmrilm.errors import FmrilmError


@pytest.mark.parametrize("fmt", ["npy", "csv", "tsv", "txt", "1D", "mat"])
def test_every_format_reads_back_the_stored_matrix(tmp_path, fmt):
    arrays = write_scans(tmp_path, ["a"], fmt=fmt, n_time=(37,))
    read = read_matrix(tmp_path / f"a.{fmt}", mat_key="tc" if fmt == "mat" else None)
    assert read.shape == (37, 11)
    np.testing.assert_allclose(read, arrays["a"], rtol=1e-6 if fmt == "npy" else 1e-9)


def test_csv_with_header_row_of_roi_names(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("roiA,roiB\n1.5,2\n3,4\n")
    np.testing.assert_array_equal(read_matrix(path), [[1.5, 2], [3, 4]])


def test_mat_picks_the_only_2d_variable_and_refuses_ambiguity(tmp_path):
    scipy.io.savemat(tmp_path / "one.mat", {"tc": np.ones((5, 3)), "tr": 2.0})
    assert read_matrix(tmp_path / "one.mat").shape == (5, 3)
    scipy.io.savemat(tmp_path / "two.mat", {"a": np.ones((5, 3)), "b": np.ones((4, 3))})
    with pytest.raises(FmrilmError, match="2 2D numeric variables.*--mat-key"):
        read_matrix(tmp_path / "two.mat")
    with pytest.raises(FmrilmError, match="no variable 'zz'"):
        read_matrix(tmp_path / "two.mat", mat_key="zz")


def test_mat_v73_hdf5_is_read_with_matlab_orientation(tmp_path):
    path = tmp_path / "v73.mat"
    data = np.arange(12.0).reshape(4, 3)  # what MATLAB shows
    with h5py.File(path, "w", userblock_size=512) as handle:
        handle.create_dataset("tc", data=data.T)  # MATLAB writes column-major
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as handle:
        handle.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")
    np.testing.assert_array_equal(read_matrix(path), data)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "file is empty"),
        ("1,2\n3,x\n", "non-numeric cell 'x' at data row 2, column 2"),
        ("1,2\n3,\n", "empty cell at data row 2"),
        ("1,2\n3,4,5\n", "different numbers of columns"),
        ("# only a comment\n", "holds no values"),
    ],
)
def test_bad_text_files_give_one_line_errors(tmp_path, content, match):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(FmrilmError, match=match) as info:
        read_matrix(path)
    assert "\n" not in str(info.value) and "bad.csv" in str(info.value)


def test_bad_npy_and_extension(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"not numpy at all")
    with pytest.raises(FmrilmError, match="not a readable .npy"):
        read_matrix(tmp_path / "x.npy")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(FmrilmError, match="not real numeric"):
        read_matrix(tmp_path / "s.npy")
    (tmp_path / "x.xlsx").write_text("1")
    with pytest.raises(FmrilmError, match="unsupported extension"):
        read_matrix(tmp_path / "x.xlsx")
    np.save(tmp_path / "3d.npy", np.zeros((2, 3, 4)))
    with pytest.raises(FmrilmError, match="expected a 2D"):
        read_matrix(tmp_path / "3d.npy")


def test_orientation_rules():
    x = np.zeros((37, 11))
    assert orient(x, 11, "auto", "f").shape == (37, 11)
    assert orient(x.T, 11, "time-cols", "f").shape == (37, 11)
    with pytest.raises(FmrilmError, match="looks like ROIs x time.*--transpose"):
        orient(x.T, 11, "auto", "f")
    with pytest.raises(FmrilmError, match="ambiguous orientation.*square"):
        orient(np.zeros((11, 11)), 11, "auto", "f")
    assert orient(np.zeros((11, 11)), 11, "time-rows", "f").shape == (11, 11)
    with pytest.raises(FmrilmError, match="12 ROI columns but the atlas has 11"):
        orient(np.zeros((37, 12)), 11, "auto", "f")


def test_check_finite_names_first_bad_value():
    x = np.zeros((5, 3))
    x[2, 1] = np.nan
    x[4, 0] = np.inf
    with pytest.raises(FmrilmError, match=r"2 NaN.*time point 2, ROI 1"):
        check_finite(x, "scan.npy")


def test_subject_from_stem_uses_known_subjects_and_drops_sub_prefix():
    assert subject_from_stem("sub-01_run-1") == "01"
    assert subject_from_stem("ab_cd_rest", {"ab_cd", "ab"}) == "ab_cd"
    assert subject_from_stem("007") == "007"


def test_timeseries_sources_find_files_and_load_lazily(tmp_path):
    write_scans(tmp_path, ["a", "b_run-2"], fmt="csv", n_time=(37, 41))
    (tmp_path / "notes.md").write_text("ignored")
    sources = timeseries_sources(tmp_path, 11)
    assert [s.scan_id for s in sources] == ["a", "b_run-2"]
    assert [s.subject_id for s in sources] == ["a", "b"]
    assert sources[1].load().shape == (41, 11)
    with pytest.raises(FmrilmError, match="no files with extension"):
        timeseries_sources(_empty(tmp_path), 11)
    with pytest.raises(FmrilmError, match="not a directory"):
        timeseries_sources(tmp_path / "nope", 11)


def _empty(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path
