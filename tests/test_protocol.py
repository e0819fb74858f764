"""Evaluation protocol: targets, subject-level splits, few-shot sets, metrics against scikit-learn / scipy,
and the results schema and tables."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, f1_score, mean_absolute_error,
                             roc_auc_score)

from fmrilm.errors import FmrilmError
from fmrilm.evaluate import (ResultRow, TaskSpec, aggregate, classification_metrics, few_shot_indices,
                             load_splits, make_splits, read_results, regression_metrics, save_splits,
                             subject_splits, targets, write_results)
from fmrilm.evaluate import metrics
from fmrilm.evaluate.protocol import check_split, ordinal_cuts, get_task


def scan_table(n_subjects=90, seed=0, weights=(0.6, 0.3, 0.1)):
    """A per-scan table: 1-4 scans per subject, a 3-class label, a score and a few missing values."""
    rng = np.random.default_rng(seed)
    subjects = [f"sub{i:03d}" for i in range(n_subjects)]
    label = rng.choice(["a", "b", "c"], size=n_subjects, p=weights)
    score = rng.normal(100, 15, n_subjects)
    rows = [{"scan_id": f"{s}_r{r}", "subject_id": s, "group": label[i], "fluid_intelligence": score[i]}
            for i, s in enumerate(subjects) for r in range(rng.integers(1, 5))]
    table = pd.DataFrame(rows)
    table.loc[table["subject_id"] == "sub000", ["group", "fluid_intelligence"]] = [None, np.nan]
    return table


GROUP = TaskSpec("group", "group", "multiclass", ("a", "b", "c"))


def subjects_of(table, indices):
    return set(table["subject_id"].iloc[list(indices)])


# ------------------------------------------------------------------------------------------------ targets
def test_targets_code_classes_aliases_and_missing():
    table = pd.DataFrame({"subject_id": list("abcdef"), "sex": ["M", "F", None, "f", "M", "F"],
                          "diagnosis": ["AD", "CN", "MCI", "cn", None, "dementia"], "age": [70, None, 60, 61, 62, 63]})
    y, mask = targets(table, "sex")
    assert y.tolist() == [0, 1, -1, 1, 0, 1] and mask.tolist() == [True, True, False, True, True, True]
    y, mask = targets(table, "ad_vs_cn")  # MCI and missing are not part of AD vs CN
    assert y.tolist() == [1, 0, -1, 0, -1, 1] and mask.sum() == 4
    y, mask = targets(table, "age")
    assert y.dtype == np.float64 and np.isnan(y[1]) and mask.tolist() == [True, False, True, True, True, True]
    with pytest.raises(FmrilmError, match="unknown task 'iq'.*sex"):
        targets(table, "iq")
    with pytest.raises(FmrilmError, match="fluid_intelligence"):
        targets(table, "fluid_intelligence")
    with pytest.raises(FmrilmError, match="binary task needs 2 classes"):
        TaskSpec("x", "x", "binary", ("a", "b", "c"))


def test_ordinal_cuts_use_training_statistics_only():
    table = scan_table()
    split = subject_splits(table["subject_id"], table["fluid_intelligence"], [0])[0]
    task = get_task("fluid_intelligence_level")
    with pytest.raises(FmrilmError, match="train=split.train"):
        targets(table, task)
    y, mask = targets(table, task, train=split.train)
    # cuts: mean +- 1.5 SD of the training subjects, each subject once
    train_subjects = table.iloc[list(split.train)].drop_duplicates("subject_id")["fluid_intelligence"].dropna()
    low, high = train_subjects.mean() - 1.5 * train_subjects.std(), train_subjects.mean() + 1.5 * train_subjects.std()
    values = table["fluid_intelligence"].to_numpy()
    expected = np.where(values < low, 0, np.where(values < high, 1, 2))
    np.testing.assert_array_equal(y[mask], expected[mask])
    assert not mask[0] and y[0] == -1 and set(np.unique(y[mask])) == {0, 1, 2}
    # changing every validation and test value changes no cut and no training label
    moved = table.copy()
    held = list(split.val) + list(split.test)
    moved.loc[held, "fluid_intelligence"] = moved.loc[held, "fluid_intelligence"] * 3 + 500
    y_moved, _ = targets(moved, task, train=split.train)
    np.testing.assert_array_equal(y_moved[list(split.train)], y[list(split.train)])
    np.testing.assert_allclose(ordinal_cuts(moved["fluid_intelligence"].to_numpy(), split.train, task,
                                            moved["subject_id"]), [low, high])
    assert (y_moved[list(split.test)][mask[list(split.test)]] == 2).all()


def test_age_group_uses_training_tertiles():
    table = scan_table()
    table["age"] = np.arange(len(table), dtype=float)
    train = np.arange(0, len(table), 2)
    y, mask = targets(table, "age_group", train=train)
    cuts = ordinal_cuts(table["age"].to_numpy(), train, get_task("age_group"), table["subject_id"])
    assert mask.all() and np.all(np.diff(y) >= 0) and set(y) == {0, 1, 2}
    assert np.all(table["age"].to_numpy()[y == 0] < cuts[0])


# ------------------------------------------------------------------------------------------------- splits
def test_splits_have_no_subject_leak_and_cover_every_available_scan():
    table = scan_table()
    y, mask = targets(table, GROUP)
    splits = subject_splits(table["subject_id"], y, seeds=5, mask=mask, task="group")
    assert [s.seed for s in splits] == [0, 1, 2, 3, 4]
    for split in splits:
        parts = [subjects_of(table, p) for p in (split.train, split.val, split.test)]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
        every = sorted(split.train + split.val + split.test)
        assert every == np.flatnonzero(mask).tolist() and split.n_scans == len(table)
        n_subjects = table.loc[mask, "subject_id"].nunique()
        assert abs(len(parts[2]) - 0.2 * n_subjects) <= 1 and abs(len(parts[1]) - 0.1 * n_subjects) <= 1
        assert split.train == tuple(sorted(split.train))


def test_splits_are_stratified_by_class_and_by_binned_target():
    table = scan_table(n_subjects=200, weights=(0.7, 0.2, 0.1))
    y, mask = targets(table, GROUP)
    per_subject = table[mask].drop_duplicates("subject_id").set_index("subject_id")["group"]
    for split in subject_splits(table["subject_id"], y, [0, 1, 2], mask=mask):
        for part, fraction in ((split.test, 0.2), (split.val, 0.1)):
            counts = per_subject[sorted(subjects_of(table, part))].value_counts()
            for label, total in per_subject.value_counts().items():
                assert abs(counts.get(label, 0) - fraction * total) <= 1.5, (label, counts)
    # regression: every score quintile gets its share of the test subjects
    score = table["fluid_intelligence"].to_numpy()
    subjects = table.drop_duplicates("subject_id").set_index("subject_id")["fluid_intelligence"].dropna()
    quintile = pd.qcut(subjects, 5, labels=False)
    for split in subject_splits(table["subject_id"], score, [0, 1]):
        held = quintile[sorted(subjects_of(table, split.test))].value_counts()
        assert held.min() >= 0.2 * quintile.value_counts().min() - 1.5 and len(held) == 5


def test_splits_are_deterministic_per_seed_and_differ_across_seeds():
    table = scan_table()
    y, mask = targets(table, GROUP)
    first = subject_splits(table["subject_id"], y, [0, 1, 2, 3], mask=mask)
    again = subject_splits(table["subject_id"], y, [3, 0], mask=mask)
    assert again == [first[3], first[0]]
    assert len({s.test for s in first}) == 4
    with pytest.raises(FmrilmError, match="test_fraction"):
        subject_splits(table["subject_id"], y, 1, test_fraction=0.8, val_fraction=0.3)


def test_make_splits_stratifies_cut_tasks_on_the_score_and_roundtrips_as_json(tmp_path):
    table = scan_table()
    splits = make_splits(table, "fluid_intelligence_level", seeds=3)
    assert all(s.task == "fluid_intelligence_level" and not (set(s.train) & set(s.test)) for s in splits)
    assert 0 not in splits[0].train + splits[0].val + splits[0].test  # sub000 has no score
    path = save_splits(tmp_path / "splits" / "fi.json", splits)
    record = json.loads(path.read_text())
    assert set(record["splits"][0]) == {"seed", "train", "val", "test", "task", "n_scans"}
    assert load_splits(path) == splits
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(FmrilmError, match="not a splits file"):
        load_splits(tmp_path / "bad.json")
    with pytest.raises(FmrilmError, match="cohort has 5"):
        check_split(splits[0], 5)


# ----------------------------------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("k", [2, 4, 10])
def test_few_shot_sets_are_balanced_nested_and_deterministic(k):
    y = np.array([0] * 30 + [1] * 12 + [-1] * 5)  # unavailable scans are not in train
    train = np.arange(42)
    chosen = few_shot_indices(train, y, k, seed=3)
    assert len(chosen) == k and np.bincount(y[chosen]).tolist() == [k // 2, k // 2] and set(chosen) <= set(train)
    np.testing.assert_array_equal(chosen, few_shot_indices(train, y, k, seed=3))
    assert set(chosen) <= set(few_shot_indices(train, y, k + 3, seed=3))  # nested across k for one seed
    assert not np.array_equal(chosen, few_shot_indices(train, y, k, seed=4))
    three = np.array([0] * 30 + [1] * 12 + [2] * 8)
    counts = np.bincount(three[few_shot_indices(np.arange(50), three, k + 2, seed=0)], minlength=3)
    assert counts.sum() == k + 2 and counts.max() - counts.min() <= 1


def test_few_shot_counts_per_class_and_errors():
    y = np.array([0] * 20 + [1] * 20)
    assert np.bincount(y[few_shot_indices(np.arange(40), y, 10, seed=0)]).tolist() == [5, 5]
    small = np.array([0] * 20 + [1] * 3)
    with pytest.raises(FmrilmError, match="class 1 has 3 training scans"):
        few_shot_indices(np.arange(23), small, 10, seed=0)
    with pytest.raises(FmrilmError, match="cannot cover 3 classes"):
        few_shot_indices(np.arange(3), np.array([0, 1, 2]), 2, seed=0)
    values = np.linspace(0, 1, 30)
    assert len(few_shot_indices(np.arange(30), values, 7, seed=0)) == 7


# ------------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("seed", range(4))
def test_classification_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    for n_classes in (2, 3, 5):
        y_true = rng.integers(0, n_classes, 60)
        y_true[:n_classes] = np.arange(n_classes)
        logits = rng.normal(size=(60, n_classes)) + 1.5 * np.eye(n_classes)[y_true]
        proba = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounding makes ties
        proba /= proba.sum(1, keepdims=True)
        y_pred = proba.argmax(1)
        got = classification_metrics(y_true, y_pred, proba)
        assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred), abs=1e-12)
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred), abs=1e-12)
        if n_classes == 2:
            assert got["auc"] == pytest.approx(roc_auc_score(y_true, proba[:, 1]), abs=1e-12)
            assert got["f1"] == pytest.approx(f1_score(y_true, y_pred), abs=1e-12)
        else:
            expected = roc_auc_score(y_true, proba, multi_class="ovr", average="macro")
            assert got["auc"] == pytest.approx(expected, abs=1e-12)
            assert got["f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_metric_edge_cases_equal_sklearn_or_are_nan():
    y_true, y_pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 3, 1, 1, 1, 2])  # predicts a class absent from y
    assert metrics.f1(y_true, y_pred, binary=False) == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert metrics.balanced_accuracy(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert metrics.f1([0, 0], [0, 0]) == f1_score([0, 0], [0, 0], zero_division=0.0) == 0.0
    assert np.isnan(metrics.auc([1, 1, 1], np.full((3, 2), 0.5)))
    assert metrics.binary_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(
        roc_auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]))
    labelled = classification_metrics(["CN", "AD", "AD"], ["CN", "AD", "CN"], [[.8, .2], [.3, .7], [.6, .4]], ("CN", "AD"))
    assert labelled["f1"] == pytest.approx(f1_score([0, 1, 1], [0, 1, 0])) and labelled["auc"] == 1.0
    with pytest.raises(ValueError, match="expected"):
        classification_metrics([0, 1], [0, 1], [[1.0], [1.0]], ("a", "b"))


@pytest.mark.parametrize("seed", range(3))
def test_regression_metrics_equal_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.normal(60, 10, 40)
    y_pred = y_true + rng.normal(0, 8, 40)
    got = regression_metrics(y_true, y_pred)
    assert got["mae"] == pytest.approx(mean_absolute_error(y_true, y_pred), abs=1e-12)
    assert got["pearson_r"] == pytest.approx(pearsonr(y_true, y_pred)[0], abs=1e-12)
    assert np.isnan(regression_metrics(y_true, np.ones(40))["pearson_r"])


def test_aggregate_mean_sample_std_and_nan_seeds():
    out = aggregate([{"accuracy": 0.6, "auc": 0.7}, {"accuracy": 0.8, "auc": float("nan")}, {"accuracy": 0.7, "auc": 0.9}])
    assert out["accuracy"] == {"mean": pytest.approx(0.7), "std": pytest.approx(np.std([0.6, 0.8, 0.7], ddof=1)),
                               "n_seeds": 3}
    assert out["auc"]["n_seeds"] == 2 and out["auc"]["mean"] == pytest.approx(0.8)
    assert aggregate([{"mae": 3.0}])["mae"] == {"mean": 3.0, "std": 0.0, "n_seeds": 1}


# ------------------------------------------------------------------------------------------------ results
def make_rows():
    values = {  # method: (sex accuracy, age mae)
        "fmri-lm": (0.81, 4.1), "fc_logreg": (0.74, 5.2), "bnt": (0.79, 4.0), "text_clf": (0.60, 6.3)}
    rows = []
    for method, (acc, mae) in values.items():
        rows.append(ResultRow(method, "UKB", "sex", "supervised", "full", None, "accuracy", acc, 0.01, 5))
        rows.append(ResultRow(method, "UKB", "age", "supervised", "full", None, "mae", mae, 0.2, 5))
    rows.append(ResultRow("fmri-lm", "UKB", "sex", "few-shot", "full", 10, "accuracy", 0.7, 0.05, 5))
    return rows


def table_cells(markdown, title):
    block = markdown.split(f"## {title}")[1].split("##")[0]
    lines = [l for l in block.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
    return {l.split(" | ")[0][2:]: [c.strip() for c in l.strip("| \n").split(" | ")[1:]] for l in lines}


def test_results_markdown_marks_best_bold_and_second_underlined(tmp_path):
    out = write_results(tmp_path / "res", make_rows())
    markdown = (out / "results.md").read_text()
    assert "| Method | sex ACC ↑ | age MAE ↓ |" in markdown
    cells = table_cells(markdown, "UKB · supervised · full · all training subjects")
    assert cells["fmri-lm"][0] == "**0.810 ± 0.010**" and cells["bnt"][0] == "<u>0.790 ± 0.010</u>"
    assert cells["fc_logreg"][0] == "0.740 ± 0.010"
    # MAE: lower is better
    assert cells["bnt"][1] == "**4.000 ± 0.200**" and cells["fmri-lm"][1] == "<u>4.100 ± 0.200</u>"
    assert cells["text_clf"][1] == "6.300 ± 0.200"
    few = table_cells(markdown, "UKB · few-shot · full · 10-shot")
    assert few == {"fmri-lm": ["**0.700 ± 0.050**"]}
    assert len(re.findall(r"^## ", markdown, flags=re.M)) == 2


def test_results_json_schema_and_roundtrip(tmp_path):
    rows = make_rows() + [ResultRow("bnt", "ADNI", "ad_vs_cn", "supervised", "full", None, "auc", float("nan"), 0.0, 0)]
    out = write_results(tmp_path, rows)
    record = json.loads((out / "results.json").read_text())
    assert list(record) == ["rows"] and len(record["rows"]) == len(rows)
    assert set(record["rows"][0]) == {"method", "cohort", "task", "paradigm", "setting", "shots", "metric", "mean",
                                      "std", "n_seeds"}
    assert record["rows"][0]["shots"] is None and record["rows"][-1]["mean"] is None
    back = read_results(out)
    assert back[:-1] == rows[:-1] and np.isnan(back[-1].mean)
    assert "| bnt | – |" in (out / "results.md").read_text()
