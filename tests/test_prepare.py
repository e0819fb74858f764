"""fmrilm prepare / info through the CLI: the cohort store contract and every bad input."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from conftest import ar1_scan, write_scans
from fmrilm import load_cohort
from fmrilm.cli import main
from fmrilm.data.prepare import standardize_new_scan
from fmrilm.data.readers import read_matrix


def run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def prepare(capsys, scan_dir, roi_csv, *extra, out="cohort"):
    return run(
        capsys, "prepare", "--timeseries", scan_dir / "ts", "--atlas", roi_csv,
        "--phenotypes", scan_dir / "participants.tsv", "--out", scan_dir / out, *extra,
    )


def test_prepare_writes_the_cohort_store(capsys, scan_dir, roi_csv):
    code, out, err = prepare(capsys, scan_dir, roi_csv)
    assert code == 0, err
    with load_cohort(scan_dir / "cohort") as cohort:
        assert isinstance(cohort.timeseries, h5py.Dataset)  # lazy, not loaded into memory
        assert cohort.timeseries.shape == (6, 160, 11) and cohort.timeseries.dtype == np.float32
        assert cohort.timeseries.chunks == (1, 160, 11)
        assert list(cohort.scans["scan_id"]) == [f"s{i:02d}" for i in range(6)]
        assert set(cohort.scans.columns) >= {"scan_id", "subject_id", "dataset", "site", "source_file", "native_tr", "native_length"}
        assert list(cohort.scans["native_tr"]) == [0.8, 0.8, 2.0, 2.0, 0.8, 2.0]
        assert list(cohort.scans["native_length"]) == [420, 390, 171, 165, 420, 390]
        assert list(cohort.phenotypes["sex"]) == ["M", "F", "M", "F", "M", "F"]
        assert "handedness" in cohort.phenotypes  # unrecognised columns kept
        assert list(cohort.rois["network"][:6]) == ["Vis"] * 6
        meta = cohort.meta
        assert meta["tr"] == 2.0 and meta["length"] == 160 and meta["n_rois"] == 11
        assert meta["preprocess"]["min_points"] == 100
        assert set(meta["site_normaliser"]["sites"]) == {"A", "B"}
        assert meta["fmrilm_version"]
    code, out, _ = run(capsys, "info", scan_dir / "cohort")
    assert code == 0 and "6 from 6 subjects" in out and "A (3), B (3)" in out


def test_stored_scans_are_standardized_and_reproducible_from_saved_statistics(capsys, scan_dir, roi_csv):
    assert prepare(capsys, scan_dir, roi_csv)[0] == 0
    with load_cohort(scan_dir / "cohort") as cohort:
        for index in (0, 3):
            row = cohort.scans.iloc[index]
            raw = read_matrix(row["source_file"])
            again = standardize_new_scan(raw, row["native_tr"], cohort.meta, row["site"])
            np.testing.assert_allclose(again[0], cohort.scan(index), atol=1e-5)
        # the two sites end with the same per-ROI spread (site-wise variance normalisation)
        scans = cohort.scans
        sd = {site: _pooled_sd(cohort.timeseries[np.flatnonzero(scans["site"] == site)]) for site in "AB"}
        np.testing.assert_allclose(sd["A"], sd["B"], rtol=1e-5)
        assert not np.allclose(_pooled_sd(cohort.timeseries[:1]), _pooled_sd(cohort.timeseries[2:3]), rtol=1e-3)


def _pooled_sd(scans):
    """Per-ROI within-scan SD pooled over scans (S, T, N) -> (N,)."""
    centred = scans - scans.mean(axis=1, keepdims=True)
    return np.sqrt((centred.astype(np.float64) ** 2).sum(axis=(0, 1)) / (scans.shape[0] * (scans.shape[1] - 1)))


def test_cohort_round_trip_is_identical(tmp_path):
    from fmrilm.data.cohort import TimeseriesWriter, write_tables
    from fmrilm.data.atlas import roi_table

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((37, 11)).astype(np.float32) for _ in range(5)]
    writer = TimeseriesWriter(tmp_path / "timeseries.h5", 37, 11)
    for array in arrays:
        writer.append(array)
    writer.close()
    scans = pd.DataFrame({"scan_id": list("abcde"), "subject_id": ["007", "008", "009", "010", "011"]})
    write_tables(tmp_path, scans, scans[["subject_id"]], roi_table([f"r{i}" for i in range(11)]))
    (tmp_path / "meta.json").write_text(json.dumps({"tr": 2.0}))
    with load_cohort(tmp_path) as cohort:
        for i, array in enumerate(arrays):
            np.testing.assert_array_equal(cohort.scan(i), array)
        assert cohort.scans["subject_id"].iloc[0] == "007"  # identifiers keep their type


def test_layouts_simulate_does_not_write(capsys, tmp_path, roi_csv):
    """N x T files with --transpose, tsv and mat all prepare to the same cohort."""
    arrays = None
    for fmt in ("tsv", "mat"):
        arrays = write_scans(tmp_path / fmt, ["x1", "x2"], fmt=fmt, n_time=(200, 181), transpose=True)
        extra = ("--mat-key", "tc") if fmt == "mat" else ()
        code, _, err = run(capsys, "prepare", "--timeseries", tmp_path / fmt, "--atlas", roi_csv, "--tr", 1.5,
                           "--transpose", "--out", tmp_path / f"c_{fmt}", *extra)
        assert code == 0, err
    with load_cohort(tmp_path / "c_tsv") as a, load_cohort(tmp_path / "c_mat") as b:
        np.testing.assert_allclose(a.timeseries[:], b.timeseries[:], atol=1e-5)
        expected = standardize_new_scan(arrays["x1"], 1.5, a.meta, None)[0]
        np.testing.assert_allclose(a.scan(0), expected, atol=1e-5)


def test_windows_all_cuts_extra_scans(capsys, scan_dir, roi_csv):
    code, _, err = prepare(capsys, scan_dir, roi_csv, "--windows", "all", "--length", 80)
    assert code == 0, err
    with load_cohort(scan_dir / "cohort") as cohort:
        counts = cohort.scans.groupby("subject_id").size()
        assert counts["s00"] == 2 and counts["s02"] == 2  # 168 and 171 points at 2 s -> two windows of 80
        assert "s00_win-1" in set(cohort.scans["scan_id"])


def test_split_column_chooses_the_subjects_the_site_statistics_come_from(capsys, scan_dir, roi_csv):
    table = pd.read_csv(scan_dir / "participants.tsv", sep="\t")
    table["split"] = ["train", "train", "train", "test", "test", "test"]
    table.to_csv(scan_dir / "participants.tsv", sep="\t", index=False)
    assert prepare(capsys, scan_dir, roi_csv)[0] == 0
    with load_cohort(scan_dir / "cohort") as cohort:
        assert cohort.meta["site_normaliser"]["sites"]["A"]["n_scans"] == 2
        assert cohort.meta["site_normaliser"]["sites"]["B"]["n_scans"] == 1


def _bad_file(scan_dir, name, array):
    np.save(scan_dir / "ts" / name, array)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda d: _bad_file(d, "s01.npy", np.full((200, 11), np.nan)), r"s01.npy: 2200 NaN"),
        (lambda d: _bad_file(d, "s01.npy", np.full((200, 11), np.inf)), r"s01.npy: .*Inf"),
        (lambda d: _bad_file(d, "s01.npy", np.zeros((420, 11))), r"s01.npy: .*constant"),
        (lambda d: _bad_file(d, "s01.npy", np.ones((200, 12))), r"s01.npy: 12 ROI columns but the atlas has 11"),
        (lambda d: _bad_file(d, "s01.npy", np.ones((11, 200))), r"s01.npy.*looks like ROIs x time.*--transpose"),
        (lambda d: _bad_file(d, "s01.npy", np.ones((11, 11))), r"s01.npy: ambiguous orientation"),
        (lambda d: _bad_file(d, "s01.npy", ar1_scan(np.random.default_rng(0), 90)), r"s01.npy.*--min-points"),
        (lambda d: (d / "ts" / "s01.npy").write_bytes(b""), r"s01.npy: file is empty"),
        (lambda d: (d / "ts" / "s01.csv").write_text("1,2\nx,3\n"), r"duplicate scan id 's01'"),
        (lambda d: (d / "participants.tsv").write_text("participant_id\tsex\nsub-s00\t3\n"), r"unknown sex value '3'.*--sex-coding"),
        (lambda d: (d / "participants.tsv").write_text("participant_id\tage\nsub-s00\told\n"), r"column 'age' has non-numeric value 'old'"),
        (lambda d: (d / "participants.tsv").write_text("name\tage\ns00\t3\n"), r"no subject_id or participant_id column"),
        (lambda d: (d / "participants.tsv").write_text("subject_id\tage\ns00\t3\ns00\t4\n"), r"subject 's00' appears 2 times"),
        (lambda d: (d / "participants.tsv").write_text("subject_id\tsex\ns00\tM\n"), r"unknown TR.*--tr SECONDS"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_leaves_existing_output(capsys, scan_dir, roi_csv, setup, match):
    out = scan_dir / "cohort"
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    setup(scan_dir)
    code, _, err = prepare(capsys, scan_dir, roi_csv, "--overwrite")
    assert code == 2
    lines = [line for line in err.splitlines() if not line.startswith("fmrilm: warning")]
    assert len(lines) == 1 and lines[0].startswith("fmrilm: error: "), err
    assert pytest.importorskip("re").search(match, lines[0]), lines[0]
    assert (out / "keep.txt").read_text() == "previous results"
    assert [p.name for p in scan_dir.iterdir() if p.name.startswith(".cohort")] == []  # no temporary left


def test_existing_output_is_refused_without_overwrite(capsys, scan_dir, roi_csv):
    (scan_dir / "cohort").mkdir()
    code, _, err = prepare(capsys, scan_dir, roi_csv)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert prepare(capsys, scan_dir, roi_csv, "--overwrite")[0] == 0
    assert load_cohort(scan_dir / "cohort").timeseries.shape[0] == 6


def test_constant_rois_under_the_limit_are_zeroed_and_flagged(capsys, scan_dir, roi_csv):
    x = ar1_scan(np.random.default_rng(1), 420)
    x[:, 4] = 7.0
    _bad_file(scan_dir, "s01.npy", x)
    code, _, err = prepare(capsys, scan_dir, roi_csv, "--max-constant-fraction", 0.2)
    assert code == 0, err
    with load_cohort(scan_dir / "cohort") as cohort:
        assert cohort.scans.set_index("scan_id").loc["s01", "qc_n_constant_rois"] == 1
        assert np.all(cohort.scan(1)[:, 4] == 0)


def test_skip_bad_leaves_out_and_records_failing_scans(capsys, scan_dir, roi_csv):
    _bad_file(scan_dir, "s01.npy", np.full((200, 11), np.nan))
    code, _, err = prepare(capsys, scan_dir, roi_csv, "--skip-bad")
    assert code == 0 and "1 scans skipped" in err
    with load_cohort(scan_dir / "cohort") as cohort:
        assert "s01" not in set(cohort.scans["scan_id"])
        assert cohort.meta["skipped"][0]["scan_id"] == "s01" and "NaN" in cohort.meta["skipped"][0]["reason"]


def test_unmatched_subjects_warn_with_counts(capsys, scan_dir, roi_csv):
    table = pd.read_csv(scan_dir / "participants.tsv", sep="\t")
    extra = pd.DataFrame({"participant_id": ["sub-zz1", "sub-zz2"], "sex": ["M", "F"], "tr": [2.0, 2.0]})
    pd.concat([table.iloc[1:], extra]).to_csv(scan_dir / "participants.tsv", sep="\t", index=False)
    code, _, err = prepare(capsys, scan_dir, roi_csv, "--tr", 2.0)
    assert code == 0
    assert "1 subjects have scans but no phenotype row (e.g. 's00')" in err
    assert "2 phenotype rows have no scan" in err
    assert load_cohort(scan_dir / "cohort").meta["unmatched"] == {"subjects_without_phenotypes": 1, "phenotypes_without_scans": 2}


def test_numeric_sex_needs_and_follows_an_explicit_coding(capsys, scan_dir, roi_csv):
    table = pd.read_csv(scan_dir / "participants.tsv", sep="\t")
    table["sex"] = [0, 1, 0, 1, 1, 0]
    table.to_csv(scan_dir / "participants.tsv", sep="\t", index=False)
    code, _, err = prepare(capsys, scan_dir, roi_csv)
    assert code == 2 and "unknown sex value '0'" in err
    assert prepare(capsys, scan_dir, roi_csv, "--sex-coding", "0=F,1=M")[0] == 0
    assert list(load_cohort(scan_dir / "cohort").phenotypes["sex"]) == ["F", "M", "F", "M", "M", "F"]
    code, _, err = prepare(capsys, scan_dir, roi_csv, "--sex-coding", "0=X", "--overwrite")
    assert code == 2 and "VALUE=M or VALUE=F" in err


def test_info_on_missing_or_incomplete_cohort(capsys, tmp_path):
    code, _, err = run(capsys, "info", tmp_path / "nope")
    assert code == 2 and "does not exist" in err
    (tmp_path / "half").mkdir()
    code, _, err = run(capsys, "info", tmp_path / "half")
    assert code == 2 and "incomplete: timeseries.h5 is missing" in err


def test_console_script_prints_no_traceback(scan_dir, roi_csv):
    exe = Path(sys.executable).parent / "fmrilm"
    result = subprocess.run([exe, "prepare", "--timeseries", scan_dir / "nope", "--atlas", roi_csv, "--out", scan_dir / "c"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "not a directory" in result.stderr
    help_text = subprocess.run([exe, "--help"], capture_output=True, text=True).stdout
    for command in ("prepare", "info", "simulate", "sample", "demo"):
        assert command in help_text


@pytest.mark.needs_atlas
def test_registry_atlas_by_name_for_time_series(capsys, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "ts").mkdir()
    np.save(tmp_path / "ts" / "a.npy", ar1_scan(rng, 170, n_rois=116))
    code, _, err = run(capsys, "prepare", "--timeseries", tmp_path / "ts", "--atlas", "schaefer100_tian_s1", "--tr", 2.0, "--out", tmp_path / "c")
    assert code == 0, err
    rois = load_cohort(tmp_path / "c").rois
    assert len(rois) == 116 and rois["network"].iloc[0] == "Subcortical" and rois["name"].iloc[16] == "7Networks_LH_Vis_1"


def test_env_reports_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "fmrilm" in out and "torch" in out and "transformers" in out and "cache" in out
