"""fmrilm describe end to end on small prepared cohorts: files, columns, z-scores, reference reuse, errors."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import ar1_scan
from fmrilm.cli import main
from fmrilm.data.atlas import Atlas, roi_table
from fmrilm.data.prepare import prepare_cohort
from fmrilm.data.sources import ScanSource
from fmrilm.descriptors.common import DESCRIPTORS
from fmrilm.descriptors.pipeline import load_descriptors, run_describe
from fmrilm.descriptors.reference import DescribeConfig
from fmrilm.descriptors.text import parse

NETWORKS = ["Vis"] * 12 + ["Default"] * 10 + ["Cont"] * 9 + ["Subcortical"] * 7  # >= 30 ROIs: 90 % row sparsity keeps 3+ per row


def make_cohort(path, n_scans=14, networks=NETWORKS, seed=0, constant_roi=None):
    rng = np.random.default_rng(seed)
    names = [f"roi{i}" for i in range(len(networks))]
    rois = roi_table(names)
    rois["network"] = networks
    arrays = [ar1_scan(rng, 170, n_rois=len(networks)) for _ in range(n_scans)]
    if constant_roi is not None:
        arrays[0][:, constant_roi] = 3.0
    sources = [ScanSource(f"s{i:02d}", f"s{i:02d}", path / f"s{i}.npy", (lambda a=a: a), tr=2.0) for i, a in enumerate(arrays)]
    phenotypes = pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(n_scans)], "sex": ["M", "F"] * (n_scans // 2), "age": np.arange(n_scans) + 40.0})
    prepare_cohort(sources, Atlas("toy", rois), path, phenotypes=phenotypes,
                   config=__import__("fmrilm.preprocess", fromlist=["x"]).PreprocessConfig(max_constant_fraction=0.2)).close()
    return path


CONFIG = DescribeConfig(ica_components=4)


def test_describe_writes_every_file_with_named_columns(tmp_path):
    cohort = make_cohort(tmp_path / "cohort")
    out = run_describe(cohort, tmp_path / "desc", config=CONFIG)
    for name in ("descriptors.parquet", "descriptors_z.parquet", "texts.jsonl", "meta.json", "reference/config.json", "reference/arrays.safetensors"):
        assert (out / name).is_file(), name
    raw, z = load_descriptors(out, z=False), load_descriptors(out)
    assert list(raw.columns[:2]) == ["scan_id", "subject_id"] and len(raw) == 14
    for column in ("graph.modularity", "graph.global_efficiency", "graph.clustering", "graph.strength.Default",
                   "fc.pair.Default.Vis", "fc.pair.Default.Default", "fg.g1.range", "fg.g1.Default", "fg.variance",
                   "ica.amplitude", "fc.mean"):
        assert column in raw.columns, column
    assert any(c.startswith("ica.fALFF.") for c in raw.columns)
    # every catalogue descriptor has at least one column
    for d in DESCRIPTORS:
        assert any(c == d["columns"] or c.startswith(d["columns"] + ".") for c in raw.columns), d["name"]
    # z-scores are standardised over the reference (here: every scan)
    values = z.drop(columns=["scan_id", "subject_id"]).dropna(axis=1, how="all")
    np.testing.assert_allclose(values.mean(), 0, atol=1e-9)
    np.testing.assert_allclose(values.std(ddof=1), 1, atol=1e-9)


def test_texts_state_the_z_scores_of_the_table(tmp_path):
    cohort = make_cohort(tmp_path / "cohort")
    out = run_describe(cohort, tmp_path / "desc", config=CONFIG)
    z = load_descriptors(out).set_index("scan_id")
    records = [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]
    assert len(records) == 14 and set(records[0]) >= {"scan_id", "subject_id", "fc", "fg", "ica", "graph", "text", "semantic"}
    checked = 0
    for record in records:
        for column, (level, direction, value) in parse(record["text"]).items():
            if value is not None:
                assert value == pytest.approx(round(z.loc[record["scan_id"], column], 2), abs=1e-9), column
                if level != "typical":
                    assert direction == ("higher" if value > 0 else "lower")
                checked += 1
    assert checked > 50


def test_reference_reuse_gives_identical_descriptors_and_parallel_equals_serial(tmp_path):
    cohort = make_cohort(tmp_path / "cohort")
    first = run_describe(cohort, tmp_path / "a", config=CONFIG)
    again = run_describe(cohort, tmp_path / "b", reference=first / "reference", jobs=2)
    pd.testing.assert_frame_equal(load_descriptors(first), load_descriptors(again))
    pd.testing.assert_frame_equal(load_descriptors(first, z=False), load_descriptors(again, z=False))
    other = make_cohort(tmp_path / "other", seed=5)
    described = load_descriptors(run_describe(other, tmp_path / "c", reference=first / "reference"))
    assert abs(described["graph.modularity"].mean()) < 5  # on the first cohort's scale, not re-standardised
    assert not np.allclose(described.drop(columns=["scan_id", "subject_id"]).mean().fillna(0), 0)


def test_constant_roi_gives_finite_measures(tmp_path):
    cohort = make_cohort(tmp_path / "cohort", constant_roi=2)
    raw = load_descriptors(run_describe(cohort, tmp_path / "desc", config=CONFIG), z=False)
    row = raw.drop(columns=["scan_id", "subject_id"]).iloc[0]
    assert np.isfinite(row.to_numpy(dtype=float)).all()


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_describe_errors_are_one_line(capsys, tmp_path):
    cohort = make_cohort(tmp_path / "cohort", n_scans=6)
    code, err = run(capsys, "describe", cohort, "--out", tmp_path / "d")
    assert code == 2 and "6 training scans but 20 ICA components" in err and "--ica-components" in err
    assert not (tmp_path / "d").exists()
    assert run(capsys, "describe", cohort, "--out", tmp_path / "d", "--ica-components", 3)[0] == 0
    code, err = run(capsys, "describe", cohort, "--out", tmp_path / "d", "--ica-components", 3)
    assert code == 2 and "already exists" in err
    other = make_cohort(tmp_path / "other", networks=NETWORKS[:-1])
    code, err = run(capsys, "describe", other, "--out", tmp_path / "e", "--reference", tmp_path / "d" / "reference")
    assert code == 2 and "reference was built on atlas 'toy' (38 ROIs)" in err
    code, err = run(capsys, "describe", cohort, "--out", tmp_path / "f", "--reference", tmp_path)
    assert code == 2 and "not a descriptor reference" in err
    code, err = run(capsys, "describe", cohort, "--out", tmp_path / "g", "--density", 1.5)
    assert code == 2 and "density 1.5" in err
