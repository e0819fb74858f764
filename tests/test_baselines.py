"""Baselines: input and output shapes for any ROI and class count, and learning planted effects on small
synthetic cohorts (held-out accuracy clearly above chance, regression r clearly above 0)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fmrilm.data.atlas import Atlas, roi_table
from fmrilm.data.cohort import load_cohort
from fmrilm.data.prepare import prepare_cohort
from fmrilm.data.sources import ScanSource
from fmrilm.descriptors.pipeline import run_describe
from fmrilm.descriptors.reference import DescribeConfig
from fmrilm.errors import FmrilmError
from fmrilm.evaluate import TaskSpec, make_splits, write_results
from fmrilm.evaluate.baselines import BASELINES, baseline_rows, get_baseline, predict_baseline, run_baseline
from fmrilm.evaluate.baselines.bnt import OCRead, orthonormal_centers
from fmrilm.evaluate.baselines.brainnetcnn import E2E
from fmrilm.evaluate.baselines.linear import fc_features, fc_matrix, upper_triangle

GROUP = TaskSpec("group", "group", "multiclass", ("a", "b", "c"))
PAIR = TaskSpec("pair", "group", "binary", ("a", "b"))  # scans of class c have no target
SCORE = TaskSpec("score", "score", "regression")
# Few epochs at Adam's 1e-3 (the defaults are 1e-4 for 100 epochs): the tests check learning, not the budget.
FAST = {"brainnetcnn": {"epochs": 30, "lr": 1e-3}, "bnt": {"epochs": 30, "lr": 1e-3}, "descriptor_mlp": {"epochs": 60}}
FC_BASELINES = ("fc_logreg", "fc_svm", "brainnetcnn", "bnt")


def planted_scan(rng, label, score, n_rois, blocks, strength, length=170):
    """A (T, N) scan: block ``label`` of ROIs shares a signal (FC up inside it) and the last block shares one
    whose weight grows with ``score`` (FC grows with the score)."""
    x = rng.standard_normal((length, n_rois))
    x[:, blocks[label]] += strength * rng.standard_normal((length, 1))
    weight = np.clip(0.35 + 0.2 * score, 0.02, 0.9)
    last = blocks[-1]
    x[:, last] = np.sqrt(weight) * rng.standard_normal((length, 1)) + np.sqrt(1 - weight) * x[:, last]
    return 1000 + 10 * x


def build_cohort(path, networks, blocks, n_subjects=48, scans_per_subject=2, seed=0, strength=0.5):
    """A prepared cohort with ``scans_per_subject`` scans per subject, classes a/b/c and a score."""
    rng = np.random.default_rng(seed)
    labels, score = np.array(list("abc"))[np.arange(n_subjects) % 3], rng.standard_normal(n_subjects)
    sources = []
    for i in range(n_subjects):
        for r in range(scans_per_subject):
            x = planted_scan(rng, "abc".index(labels[i]), score[i], len(networks), blocks, strength)
            sources.append(ScanSource(f"s{i:02d}_r{r}", f"s{i:02d}", path / f"s{i}_{r}.npy", (lambda x=x: x), tr=2.0))
    rois = roi_table([f"roi{i}" for i in range(len(networks))])
    rois["network"] = networks
    phenotypes = pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(n_subjects)], "group": labels, "score": score})
    prepare_cohort(sources, Atlas("toy", rois), path, phenotypes=phenotypes).close()
    return path


@pytest.fixture(scope="module")
def fc_cohort(tmp_path_factory):
    """13 ROIs (an unequal N), 48 subjects x 2 scans, classes in ROIs 0-2 / 3-5 / 6-8, score in 9-12."""
    blocks = [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 13)]
    return build_cohort(tmp_path_factory.mktemp("fc") / "cohort", ["Vis"] * 7 + ["Default"] * 6, blocks)


@pytest.fixture(scope="module")
def described(tmp_path_factory):
    """38 ROIs in four networks (classes change within-Vis, -Default or -Cont FC; score the Subcortical),
    described with fmrilm describe: (cohort, DESC)."""
    networks = ["Vis"] * 12 + ["Default"] * 10 + ["Cont"] * 9 + ["Subcortical"] * 7
    blocks = [slice(0, 12), slice(12, 22), slice(22, 31), slice(31, 38)]
    root = tmp_path_factory.mktemp("described")
    cohort = build_cohort(root / "cohort", networks, blocks, n_subjects=36, strength=1.0)
    return cohort, run_describe(cohort, root / "desc", config=DescribeConfig(ica_components=4))


def random_inputs(kind, n, rng):
    if kind == "text":
        words = np.array(["elevated", "reduced", "typical", "visual", "default", "within", "between"])
        return np.array([" ".join(rng.choice(words, 8)) for _ in range(n)], dtype=object)
    if kind == "descriptors":
        return rng.standard_normal((n, 20)).astype(np.float32)
    fc = np.stack([fc_matrix(rng.standard_normal((60, 13))) for _ in range(n)])
    return fc if kind == "fc_matrix" else upper_triangle(fc)


# --------------------------------------------------------------------------------------------- features
def test_fc_features_are_fisher_z_upper_triangles_of_the_scans(fc_cohort):
    with load_cohort(fc_cohort) as cohort:
        features = fc_features(cohort, [3, 0])
        expected = np.arctanh(np.corrcoef(cohort.scan(0), rowvar=False)[np.triu_indices(13, 1)])
    assert features.shape == (2, 78) and features.dtype == np.float32
    np.testing.assert_allclose(features[1], expected, atol=1e-5)
    x = np.random.default_rng(0).standard_normal((50, 5))
    x[:, 2] = 1.0  # a constant ROI has no correlation: zeros, not NaN
    fc = fc_matrix(x)
    assert np.isfinite(fc).all() and (fc[2] == 0).all() and (np.diag(fc) == 0).all() and np.allclose(fc, fc.T)


def test_e2e_is_cross_shaped_and_ocread_centres_orthonormal():
    layer = E2E(2, 3, 5)  # equals the paper's 1 x N plus N x 1 convolutions
    row, col = torch.nn.Conv2d(2, 3, (1, 5)), torch.nn.Conv2d(2, 3, (5, 1), bias=False)
    with torch.no_grad():
        row.weight.copy_(layer.row[:, :, None, :]), col.weight.copy_(layer.col[:, :, :, None])
        row.bias.copy_(layer.bias)
        x = torch.randn(4, 2, 5, 5)
        torch.testing.assert_close(layer(x), row(x) + col(x))
    centres = orthonormal_centers(4, 16)
    np.testing.assert_allclose((centres @ centres.T).numpy(), np.eye(4), atol=1e-5)
    assignment = OCRead(13, 16, 4).assignment(torch.randn(2, 13, 16))
    assert assignment.shape == (2, 13, 4) and torch.allclose(assignment.sum(-1), torch.ones(2, 13))


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", list(BASELINES))
def test_estimators_fit_predict_shapes_for_three_classes_and_regression(name):
    rng = np.random.default_rng(1)
    baseline = get_baseline(name)
    X, X_new = random_inputs(baseline.inputs, 30, rng), random_inputs(baseline.inputs, 7, rng)
    y = np.array(["x", "y", "z"] * 10)
    params = {"epochs": 3} if name in ("brainnetcnn", "bnt", "descriptor_mlp") else {}
    model = baseline("classification", **params).fit(X, y, groups=np.repeat(np.arange(15), 2))
    proba = model.predict_proba(X_new)
    assert list(model.classes_) == ["x", "y", "z"] and proba.shape == (7, 3)
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-6)
    assert model.predict(X_new).shape == (7,) and set(model.predict(X_new)) <= {"x", "y", "z"}
    regressor = baseline("regression", **params).fit(X, rng.normal(50, 10, 30))
    prediction = regressor.predict(X_new)
    assert prediction.shape == (7,) and np.isfinite(prediction).all()


def test_torch_baselines_are_seeded_and_leave_the_global_rng_alone():
    rng = np.random.default_rng(2)
    X, y = random_inputs("fc_matrix", 24, rng), np.arange(24) % 2
    state = torch.get_rng_state()
    first = get_baseline("bnt")(epochs=3, seed=5).fit(X, y).predict_proba(X)
    assert torch.equal(state, torch.get_rng_state())
    np.testing.assert_array_equal(first, get_baseline("bnt")(epochs=3, seed=5).fit(X, y).predict_proba(X))
    assert not np.array_equal(first, get_baseline("bnt")(epochs=3, seed=6).fit(X, y).predict_proba(X))


# ------------------------------------------------------------------------------------- planted effects
@pytest.mark.parametrize("name", FC_BASELINES)
def test_fc_baselines_learn_a_planted_three_class_effect(fc_cohort, name):
    split = make_splits(fc_cohort, GROUP, seeds=[0])[0]
    result = run_baseline(name, fc_cohort, GROUP, split, params=FAST.get(name))
    print(name, "3-class", result)
    assert result["accuracy"] >= 0.7 and result["auc"] >= 0.8  # chance 1/3 and 0.5


@pytest.mark.parametrize("name", FC_BASELINES)
def test_fc_baselines_learn_a_planted_continuous_effect(fc_cohort, name):
    split = make_splits(fc_cohort, SCORE, seeds=[1])[0]
    result = run_baseline(name, fc_cohort, SCORE, split, params=FAST.get(name))
    print(name, "regression", result)
    assert result["pearson_r"] >= 0.5


@pytest.mark.parametrize("name", ["descriptor_mlp", "text_clf"])
def test_descriptor_baselines_learn_planted_effects_from_describe_output(described, name):
    cohort, desc = described
    split = make_splits(cohort, GROUP, seeds=[0])[0]
    result = run_baseline(name, cohort, GROUP, split, descriptors=desc, params=FAST.get(name))
    print(name, "3-class", result)
    assert result["accuracy"] >= 0.6 and result["auc"] >= 0.75
    split = make_splits(cohort, SCORE, seeds=[0])[0]
    result = run_baseline(name, cohort, SCORE, split, descriptors=desc, params=FAST.get(name))
    print(name, "regression", result)
    assert result["pearson_r"] >= 0.4


# ---------------------------------------------------------------------------------------- run_baseline
def test_binary_task_leaves_out_unlabelled_scans_and_few_shot_trains_on_k(fc_cohort):
    split = make_splits(fc_cohort, PAIR, seeds=[0])[0]
    out = predict_baseline("fc_logreg", fc_cohort, PAIR, split)
    assert len(out["test"]) == len(out["y_true"]) and set(out["y_true"]) <= {0, 1} and out["proba"].shape[1] == 2
    with load_cohort(fc_cohort) as cohort:
        labels = cohort.scan_phenotypes()["group"].to_numpy()
    assert (labels[out["test"]] != "c").all()
    for name in ("fc_logreg", "bnt"):  # k = 4: two scans per class, no validation scans
        result = run_baseline(name, fc_cohort, PAIR, split, shots=4, params={"epochs": 5} if name == "bnt" else None)
        assert set(result) == {"accuracy", "balanced_accuracy", "auc", "f1"}


def test_run_baseline_errors_name_the_fix(fc_cohort, described, tmp_path):
    assert set(BASELINES) == {"fc_logreg", "fc_svm", "brainnetcnn", "bnt", "descriptor_mlp", "text_clf"}
    split = make_splits(fc_cohort, GROUP, seeds=[0])[0]
    with pytest.raises(FmrilmError, match="unknown baseline 'svm'.*fc_logreg, fc_svm, brainnetcnn, bnt"):
        run_baseline("svm", fc_cohort, GROUP, split)
    for name in ("descriptor_mlp", "text_clf"):
        with pytest.raises(FmrilmError, match="needs descriptors"):
            run_baseline(name, fc_cohort, GROUP, split)
    with pytest.raises(FmrilmError, match="fmrilm describe"):
        run_baseline("text_clf", fc_cohort, GROUP, split, descriptors=tmp_path / "nowhere")
    with pytest.raises(FmrilmError, match="lack .* scans of the cohort"):
        run_baseline("descriptor_mlp", fc_cohort, GROUP, split, descriptors=described[1])
    other = make_splits(described[0], GROUP, seeds=[0])[0]
    with pytest.raises(FmrilmError, match="make the splits for this cohort"):
        run_baseline("fc_logreg", fc_cohort, GROUP, other)


def test_baseline_rows_feed_the_results_tables(fc_cohort, tmp_path):
    splits = make_splits(fc_cohort, GROUP, seeds=2)
    rows = baseline_rows(["fc_logreg", "fc_svm"], fc_cohort, GROUP, splits, cohort_name="toy")
    assert {(r.method, r.metric) for r in rows} == {(m, k) for m in ("fc_logreg", "fc_svm")
                                                    for k in ("accuracy", "balanced_accuracy", "auc", "f1")}
    assert all(r.n_seeds == 2 and r.cohort == "toy" and r.shots is None for r in rows)
    out = write_results(tmp_path, rows)
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 8
    assert "## toy · supervised · full" in (out / "results.md").read_text()
