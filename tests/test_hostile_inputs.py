"""Hostile inputs: whatever bytes, arrays, tables and ids users bring, fmrilm succeeds or says why in one line.

Property tests (hypothesis) over the time-series readers, ``fmrilm prepare`` from a folder with phenotype and
scan tables, and describe's per-scan measures. Allowed outcomes: success (with finite stored values) or a
one-line :class:`FmrilmError`; any other exception is a bug. Ids that could act as paths are refused, and
nothing is ever written outside ``--out``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from conftest import N_ROIS, ar1_scan
from fmrilm.cli import main
from fmrilm.data.cohort import load_cohort
from fmrilm.data.ingest import read_scan_table
from fmrilm.data.phenotypes import read_phenotypes
from fmrilm.data.prepare import standardize_new_scan
from fmrilm.data.readers import check_scan, read_matrix
from fmrilm.data.sources import check_identifier
from fmrilm.descriptors import text
from fmrilm.descriptors.reference import DescriptorReference
from fmrilm.errors import FmrilmError
from test_describe import CONFIG, NETWORKS, make_cohort

# derandomized (the same examples on every run: CI cannot flake) and no example database written to the checkout;
# explore new examples by hand with FMRILM_HYPOTHESIS_EXAMPLES=500 (random search, seeds printed on failure)
EXPLORE = int(os.environ.get("FMRILM_HYPOTHESIS_EXAMPLES", 0))
FAST = settings(max_examples=EXPLORE or 40, deadline=None, derandomize=not EXPLORE, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
FORMATS = ("npy", "csv", "tsv", "txt", "1D", "mat")


def one_line_error(call, *args, **kwargs):
    """Run ``call``; return its result, or the FmrilmError it raised (checked to be one line)."""
    try:
        return call(*args, **kwargs)
    except FmrilmError as exc:
        assert "\n" not in str(exc), str(exc)
        return exc


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``fmrilm ARGV`` in this process: (exit code, stderr). Exceptions other than FmrilmError propagate."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        code = main(argv)
    return code, err.getvalue()


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def write_array(path: Path, x: np.ndarray, fmt: str) -> None:
    if fmt == "npy":
        np.save(path, x)
    elif fmt == "mat":
        scipy.io.savemat(path, {"tc": x.astype(np.float32) if x.dtype == np.float16 else x})
    else:
        sep = {"csv": ",", "tsv": "\t"}.get(fmt, " ")
        np.savetxt(path, np.atleast_1d(x), delimiter=sep, fmt="%.17g" if x.dtype.kind in "fc" else "%d")


# ------------------------------------------------------------------------------------------------- readers
@FAST
@given(data=st.binary(max_size=400), fmt=st.sampled_from(FORMATS), header=st.sampled_from([b"", b"\x93NUMPY", b"MATLAB 5.0 MAT-file"]))
def test_any_bytes_in_any_format_are_read_or_refused_in_one_line(tmp_path, data, fmt, header):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"scan.{fmt}"
    path.write_bytes(header + data)
    result = one_line_error(read_matrix, path)
    if not isinstance(result, FmrilmError):
        assert result.ndim == 2 and result.size > 0 and result.dtype == np.float64


@pytest.mark.parametrize(("content", "match"), [
    ("1,2\n3,4\n".encode("utf-16"), "not UTF-8 text.*re-save it as UTF-8"),
    ("caf\xe9,1\n2,3\n".encode("latin-1"), "not UTF-8 text"),
])
def test_text_in_another_encoding_is_refused(tmp_path, content, match):
    (tmp_path / "x.csv").write_bytes(content)
    with pytest.raises(FmrilmError, match=match):
        read_matrix(tmp_path / "x.csv")


def test_damaged_mat_files_are_refused(tmp_path):
    scipy.io.savemat(tmp_path / "ok.mat", {"tc": np.ones((20, 3))})
    (tmp_path / "cut.mat").write_bytes((tmp_path / "ok.mat").read_bytes()[:150])
    with pytest.raises(FmrilmError, match="cut.mat: not a readable MATLAB file"):
        read_matrix(tmp_path / "cut.mat")
    header = b"MATLAB 7.3 MAT-file".ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
    (tmp_path / "v73.mat").write_bytes(header + b"not hdf5 at all" * 10)
    with pytest.raises(FmrilmError, match="v73.mat: not a readable MATLAB v7.3 file"):
        read_matrix(tmp_path / "v73.mat")
    scipy.io.savemat(tmp_path / "cx.mat", {"tc": np.ones((20, 3)) * 1j, "s": "text"})
    with pytest.raises(FmrilmError, match="0 2D numeric variables"):
        read_matrix(tmp_path / "cx.mat")
    with pytest.raises(FmrilmError, match="variable 's' is not a real numeric matrix"):
        read_matrix(tmp_path / "cx.mat", mat_key="s")


DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.bool_, np.complex64])


@FAST
@given(x=hnp.arrays(DTYPES, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)), fmt=st.sampled_from(FORMATS))
def test_any_array_reads_back_exactly_or_is_refused(tmp_path, x, fmt):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / f"scan.{fmt}"
    if fmt != "npy" and (x.ndim > 2 or x.dtype.kind in "bc"):
        x = x.real.astype(np.float64) if x.ndim <= 2 else x.reshape(len(x), -1).real.astype(np.float64)
    write_array(path, x, fmt)
    read = one_line_error(read_matrix, path)
    if isinstance(read, FmrilmError):
        return
    stored = x.reshape(len(x), -1) if x.ndim == 1 else x
    if fmt == "mat" and x.ndim == 1:
        stored = x[None, :]  # MATLAB has no 1D arrays: savemat stores a row vector
    np.testing.assert_array_equal(read, stored.astype(np.float64))
    checked = one_line_error(check_scan, read, read.shape[1], path)
    assert isinstance(checked, FmrilmError) or (np.isfinite(checked).all() and len(checked) >= 2)


# ------------------------------------------------------------------------------------------------- prepare
@st.composite
def hostile_scan(draw) -> tuple[np.ndarray, float]:
    """A (T, N_ROIS) scan with some of: NaN/Inf cells, constant ROIs, extreme scale, an extreme spike."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = ar1_scan(rng, draw(st.sampled_from([1, 2, 5, 60, 99, 140, 200, 400])))
    if draw(st.booleans()):
        x[draw(st.integers(0, len(x) - 1)), draw(st.integers(0, N_ROIS - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    if draw(st.booleans()):
        x[:, : draw(st.integers(1, N_ROIS))] = draw(st.sampled_from([0.0, 1000.0]))
    x = x * 10.0 ** draw(st.sampled_from([0, -300, -30, 30, 300]))
    if draw(st.booleans()):
        x[0, 0] = draw(st.sampled_from([1e308, -1e300, 1e40]))
    return x, draw(st.sampled_from([0.1, 0.72, 2.0, 19.9]))


@settings(FAST, max_examples=EXPLORE or 8)
@given(scans=st.lists(hostile_scan(), min_size=1, max_size=3), fmt=st.sampled_from(FORMATS),
       skip_bad=st.booleans(), windows=st.sampled_from(["first", "all"]))
def test_prepare_on_hostile_scans_stores_finite_values_or_refuses(tmp_path, roi_csv, scans, fmt, skip_bad, windows):
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    for i, (x, _) in enumerate(scans):
        write_array(root / f"s{i}.{fmt}", x, fmt)
    pd.DataFrame({"subject_id": [f"s{i}" for i in range(len(scans))], "tr": [tr for _, tr in scans]}).to_csv(root / "p.csv", index=False)
    argv = ["prepare", "--timeseries", str(root), "--atlas", str(roi_csv), "--phenotypes", str(root / "p.csv"),
            "--out", str(root / "out"), "--min-points", "2", "--max-constant-fraction", "0.5", "--windows", windows]
    code, err = run_cli(argv + ["--skip-bad"] * skip_bad)
    if code != 0:
        assert code == 2 and err.startswith("fmrilm: error: ") and err.count("\n") == 1, err
        assert sorted(p.name for p in root.iterdir() if p.name.startswith((".out", "out"))) == []
        return
    with load_cohort(root / "out") as cohort:
        assert np.isfinite(cohort.timeseries[:]).all() and cohort.timeseries.shape[1:] == (160, N_ROIS)


def test_a_single_time_point_is_refused_not_a_crash():
    # scipy's polyphase resampler dies with SIGFPE on one sample: the scan must be refused before it
    meta = {"preprocess": {"target_tr": 2.0}, "n_rois": 3, "site_normaliser": None}
    with pytest.raises(FmrilmError, match="1 time point, a scan needs a time series"):
        standardize_new_scan(np.ones((1, 3)), 0.72, meta)


def test_values_that_overflow_when_resampled_are_refused():
    x = ar1_scan(np.random.default_rng(0), 400, n_rois=3) * 1e304  # finite, but the anti-aliasing filter overflows
    meta = {"preprocess": {"target_tr": 2.0}, "n_rois": 3, "site_normaliser": None}
    with pytest.raises(FmrilmError, match="scan: values too extreme to standardize.*rescale"):
        standardize_new_scan(x, 0.72, meta)


# ------------------------------------------------------------------------------------------------- tables
IDS = st.sampled_from(["s1", "s2", "sub-s3", "007", "", "..", "a/b", "/abs", "x\ty", "s1"])
CELLS = st.sampled_from(["", "n/a", "1", "2.5", "-3", "old", "1e400", "inf", "nan", "M", "F", "0", "café", "1,5"])
ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])


@FAST
@given(ids=st.lists(IDS, min_size=0, max_size=5), cells=st.data(), key=st.sampled_from(["subject_id", "participant_id", "id"]),
       columns=st.lists(st.sampled_from(["age", "sex", "site", "tr", "fluid_intelligence", "note"]), max_size=3, unique=True),
       encoding=ENCODINGS, sep=st.sampled_from([",", "\t"]))
def test_phenotype_tables_are_normalised_or_refused(tmp_path, ids, cells, key, columns, encoding, sep):
    rows = [sep.join([i, *(cells.draw(CELLS) for _ in columns)]) for i in ids]
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / ("p.csv" if sep == "," else "p.tsv")
    path.write_bytes("\n".join([sep.join([key, *columns]), *rows]).encode(encoding, errors="replace"))
    table = one_line_error(read_phenotypes, path)
    if isinstance(table, FmrilmError):
        return
    subjects = table["subject_id"]
    assert subjects.notna().all() and subjects.is_unique and all(check_identifier(s, "t") == s for s in subjects)
    for column in {"age", "tr", "fluid_intelligence"} & set(table.columns):
        assert table[column].dtype == np.float64 and not np.isinf(table[column]).any()
    assert set(table.get("sex", pd.Series(dtype="string")).dropna()) <= {"M", "F"}


@FAST
@given(ids=st.lists(IDS, min_size=0, max_size=4), trs=st.lists(CELLS, min_size=4, max_size=4), encoding=ENCODINGS)
def test_scan_tables_are_keyed_by_safe_unique_ids_or_refused(tmp_path, ids, trs, encoding):
    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "scans.csv"
    path.write_bytes("\n".join(["scan_id,tr", *(f"{i},{t}" for i, t in zip(ids, trs))]).encode(encoding, errors="replace"))
    table = one_line_error(read_scan_table, path)
    if not isinstance(table, FmrilmError):
        assert table["scan_id"].notna().all() and table["scan_id"].is_unique
        assert all(check_identifier(s, "t") == s for s in table["scan_id"])


@pytest.mark.parametrize(("table", "match"), [
    ("subject_id,age\n,40\n", "row 1 has no subject_id"),
    ("subject_id,age\n../../etc,40\n", r"subject: id '../../etc' is empty, '\.'/'\.\.' or holds a path separator"),
    ("participant_id,age\nsub-/abs,40\n", "id '/abs'"),
    ("subject_id,age\ns1,inf\n", "column 'age' has infinite value 'inf'"),
    ("subject_id,age\ns1,1,5\ns2,3\n", "data rows have more fields than the header row"),
])
def test_phenotype_table_errors(tmp_path, table, match):
    (tmp_path / "p.csv").write_text(table)
    with pytest.raises(FmrilmError, match=match):
        read_phenotypes(tmp_path / "p.csv")


@pytest.mark.parametrize(("table", "match"), [
    ("scan_id,tr\na,2\na,3\n", "scan 'a' appears more than once"),
    ("scan_id,tr\n,2\n", "row 1 has no scan_id"),
    ("scan_id,tr\n../x,2\n", r"scan: id '\.\./x'"),
    ("", "file holds no values"),
])
def test_scan_table_errors(tmp_path, table, match):
    (tmp_path / "scans.csv").write_text(table)
    with pytest.raises(FmrilmError, match=match):
        read_scan_table(tmp_path / "scans.csv")


# ------------------------------------------------------------------------------------------------- paths
@pytest.mark.parametrize(("name", "table", "match"), [
    ("...npy", None, r"\.\.\.npy: scan: id '\.\.'"),  # the stem of "...npy" is ".."
    ("s\x01x.npy", None, r"id 's\\x01x'"),
    ("s0.npy", "subject_id,tr\n../../../tmp/evil,2\ns0,2\n", r"subject: id '\.\./\.\./\.\./tmp/evil'"),
    ("s0.npy", "participant_id,tr\nsub-/etc/passwd,2\n", r"subject: id '/etc/passwd'"),
])
def test_ids_that_look_like_paths_are_refused_and_nothing_is_written(tmp_path, roi_csv, name, table, match):
    (tmp_path / "ts").mkdir()
    np.save(tmp_path / "ts" / name, ar1_scan(np.random.default_rng(0), 120))
    argv = ["prepare", "--timeseries", str(tmp_path / "ts"), "--atlas", str(roi_csv), "--tr", "2", "--out", str(tmp_path / "out")]
    if table:
        (tmp_path / "p.csv").write_text(table)
        argv += ["--phenotypes", str(tmp_path / "p.csv")]
    before = tree(tmp_path)
    code, err = run_cli(argv)
    assert code == 2 and err.count("\n") == 1 and re.search(match, err), err
    assert tree(tmp_path) == before


def test_odd_but_safe_ids_stay_inside_out(tmp_path, roi_csv):
    names = ["a..b", "sub-01_ses-1", "ü-7", "x y"]
    (tmp_path / "ts").mkdir()
    for i, name in enumerate(names):
        np.save(tmp_path / "ts" / f"{name}.npy", ar1_scan(np.random.default_rng(i), 120))
    before = tree(tmp_path)
    code, err = run_cli(["prepare", "--timeseries", str(tmp_path / "ts"), "--atlas", str(roi_csv), "--tr", "2",
                         "--out", str(tmp_path / "out")])
    assert code == 0, err
    assert {p for p in tree(tmp_path) - before if not p.startswith("out")} == set()
    with load_cohort(tmp_path / "out") as cohort:
        assert sorted(cohort.scans["scan_id"]) == sorted(names)


def test_no_unsafe_deserialisation_in_the_package():
    source = "\n".join(p.read_text() for p in Path(__file__).parents[1].joinpath("src", "fmrilm").rglob("*.py"))
    assert "allow_pickle=True" not in source and "import pickle" not in source and "trust_remote_code=True" not in source
    assert " eval(" not in source and "exec(" not in source and "yaml.load(" not in source
    calls = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert calls and all("weights_only=True" in call for call in calls)


# ------------------------------------------------------------------------------------------------- describe
@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference fitted on a 14-scan toy cohort (statistics included) and one of its standardized scans."""
    cohort = load_cohort(make_cohort(tmp_path_factory.mktemp("hostile") / "cohort"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = DescriptorReference(CONFIG).fit_models(cohort, np.arange(len(cohort)))
        ref.fit_statistics(pd.DataFrame([ref.measure(cohort.scan(i)) for i in range(len(cohort))]))
    scan = cohort.scan(0)
    cohort.close()
    return ref, scan


def _unmeasurable(column: str, constant_networks: set[str]) -> bool:
    return bool(set(column.split(".")[2:]) & constant_networks)


@settings(FAST, max_examples=EXPLORE or 25)
@given(constant=st.lists(st.integers(0, len(NETWORKS) - 1), max_size=12, unique=True),
       scale=st.sampled_from([1.0, 1e-30, 1e30, 1e37]), rounded=st.booleans(), spike=st.booleans(), seed=st.integers(0, 9))
def test_describe_measures_are_finite_or_explicitly_missing(reference, constant, scale, rounded, spike, seed):
    ref, scan = reference
    x = np.random.default_rng(seed).permutation(scan.astype(np.float64), axis=0) * scale
    x = np.round(x) if rounded else x
    x[:, constant] = 0.0
    if spike:
        x[3, 5] = 3e38
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = one_line_error(ref.measure, x.astype(np.float32))
    if isinstance(raw, FmrilmError):
        return
    dead = {n for n in set(NETWORKS) if all(i in constant for i, m in enumerate(NETWORKS) if m == n)}
    for column, value in raw.items():
        assert np.isfinite(value) or (np.isnan(value) and _unmeasurable(column, dead)), (column, value)
    z = ref.zscore(pd.DataFrame([raw])).iloc[0].to_dict()
    paragraph = text.paragraph(text.describe(z, raw, seed=seed))
    assert paragraph and not re.search(r"\b(nan|inf|infinity)\b", paragraph, re.IGNORECASE), paragraph
