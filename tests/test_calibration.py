"""Class-prior calibration: the maths on planted scores, storage, and its use by evaluate (training scans only).

The evaluate tests use a tiny untrained model directory with a hand-written ``instruct.json`` (no training) and
replace the model's answer log-probabilities by planted ones: signal + a constant preference for one class, so
that the raw decision always picks that class and a calibration fitted on training scans must undo the offset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from test_describe import make_cohort
from test_instruct_evaluate import read_predictions, save_align_layout
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import make_splits, targets
from fmrilm.instruct import paradigm_eval
from fmrilm.instruct.calibration import (
    CALIBRATION_FILE, Calibration, TaskCalibration, apply_bias, fit_bias, task_calibration,
)
from fmrilm.instruct.evaluate import calibrate_model, run_evaluate
from fmrilm.instruct.pipeline import INFO_FILE, run_instruct
from fmrilm.io import write_json_atomic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
OFFSET = 3.0  # planted a-priori preference (nats) for the second class


def planted(y: np.ndarray, rng: np.random.Generator, n_classes: int = 2) -> np.ndarray:
    """(n, C) log-probabilities: +1 nat on the true class, OFFSET on the last class, a little noise."""
    scores = rng.normal(0.0, 0.2, (len(y), n_classes))
    scores[np.arange(len(y)), y] += 1.0
    scores[:, -1] += OFFSET
    return scores - np.logaddexp.reduce(scores, axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------------ the maths
@pytest.mark.parametrize("method", ["bias", "mean"])
def test_calibration_removes_a_planted_constant_bias(method):
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 2, 61), rng.integers(0, 2, 37)
    train, test = planted(y_train, rng), planted(y_test, rng)
    raw = apply_bias(test, None).argmax(1)
    assert (raw == 1).all() and np.mean(raw == y_test) == pytest.approx(np.mean(y_test == 1))  # the majority answer
    bias = fit_bias(train, y_train, method)
    calibrated = apply_bias(test, bias)
    assert bias[1] - bias[0] == pytest.approx(OFFSET, abs=0.5) and bias.sum() == pytest.approx(0.0, abs=1e-9)
    assert np.mean(calibrated.argmax(1) == y_test) > 0.95
    assert roc_auc_score(y_test, calibrated[:, 1]) == pytest.approx(roc_auc_score(y_test, apply_bias(test, None)[:, 1]))


def test_max_likelihood_bias_keeps_class_imbalance_and_mean_does_not():
    """Three classes, 80 % of them the middle one, no signal: the ML bias keeps predicting the majority, the
    label-free mean spreads the answers over the classes."""
    rng = np.random.default_rng(1)
    y = rng.choice(3, 400, p=[0.1, 0.8, 0.1])
    scores = rng.normal(0.0, 0.5, (400, 3)) + np.array([0.0, -1.0, 2.0])  # prefers the last class a priori
    ml = apply_bias(scores, fit_bias(scores, y, "bias"))
    assert np.allclose(ml.mean(0), np.bincount(y) / len(y), atol=0.01)  # mean probability = class share
    assert np.mean(ml.argmax(1) == 1) > 0.9
    mean = apply_bias(scores, fit_bias(scores, y, "mean")).argmax(1)
    assert all(0.15 < np.mean(mean == c) < 0.55 for c in range(3))


def test_a_class_missing_from_the_calibration_scans_gets_a_finite_bias():
    rng = np.random.default_rng(2)
    bias = fit_bias(planted(np.zeros(5, np.int64), rng), np.zeros(5, np.int64))
    assert np.isfinite(bias).all() and bias[1] > bias[0]


def test_calibration_errors():
    scores = np.log(np.full((4, 2), 0.5))
    with pytest.raises(FmrilmError, match="unknown calibration method 'platt'; choose one of bias, mean"):
        fit_bias(scores, np.zeros(4, int), "platt")
    with pytest.raises(FmrilmError, match="method 'bias' needs the class codes y"):
        fit_bias(scores)
    with pytest.raises(FmrilmError, match=r"y must hold 4 class codes in 0..1, got \[0, 1, 2, 0\]"):
        fit_bias(scores, np.array([0, 1, 2, 0]))
    with pytest.raises(FmrilmError, match=r"finite \(n >= 1, C\) answer log-probabilities, got shape \(0, 2\)"):
        fit_bias(np.zeros((0, 2)), np.zeros(0, int))
    with pytest.raises(FmrilmError, match="has 2 classes but the scores have 3; calibrate the model again"):
        TaskCalibration(["a", "b"], [0.0, 0.0], 4).apply(np.zeros((1, 3)))


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 23)
    entry = task_calibration(["lower", "mean", "higher"], planted(y, rng, 3), y, cohort="/c", scans=range(23))
    calibration = Calibration("bias", {"fluid_intelligence_level": entry})
    path = calibration.save(tmp_path)
    assert path == tmp_path / CALIBRATION_FILE and json.loads(path.read_text())["format"] == "fmrilm.calibration/1"
    loaded = Calibration.load(tmp_path)
    assert loaded == calibration and loaded.get("sex") is None
    assert loaded.get("fluid_intelligence_level").class_counts == np.bincount(y, minlength=3).tolist()
    assert Calibration.load(tmp_path / "nowhere") is None
    path.write_text(json.dumps({"format": "other/9", "method": "bias", "tasks": {}}))
    with pytest.raises(FmrilmError, match="has format 'other/9', not 'fmrilm.calibration/1'; delete it"):
        Calibration.load(tmp_path)


# ------------------------------------------------------------------------------------------------ evaluate
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 40-scan cohort and an untrained model directory whose instruct.json records a sex split of it."""
    root = tmp_path_factory.mktemp("calibration")
    cohort = make_cohort(root / "cohort", n_scans=40)
    model = save_align_layout(root, cohort)
    split = make_splits(cohort, "sex", [0])[0]
    info = {"format": "fmrilm.instruct/1", "tasks": ["sex"], "paradigms": ["single"], "seed": 0,
            "cohorts": [{"path": str(cohort.resolve()), "name": "UKB", "split": split.to_dict(), "cuts": {},
                         "train_scans": list(split.train)}]}
    write_json_atomic(model / INFO_FILE, info)
    y, _ = targets(cohort, "sex")
    return {"cohort": cohort, "model": model, "split": split, "y": y, "info": info}


@pytest.fixture
def plant(setup, monkeypatch):
    """Planted log-probabilities instead of the model's; returns the scan indices each call was asked about."""
    asked, rng = [], np.random.default_rng(4)
    scores = planted(setup["y"], rng)

    def outputs(run, opened, specs, prompts, batch_size):
        asked.append(sorted(set().union(*prompts.values())))
        return {s.name: {i: scores[i] for i in prompts[s.name]} for s in specs}

    monkeypatch.setattr(paradigm_eval, "_outputs", outputs)
    (setup["model"] / CALIBRATION_FILE).unlink(missing_ok=True)
    return asked


def by_method(rows):
    return {(r.method, r.metric): r.mean for r in rows if r.task == "sex"}


def test_evaluate_calibrates_on_training_scans_only(setup, plant, tmp_path):
    with pytest.warns(UserWarning, match="has no calibration.json .* fitting it now on its recorded training scans"):
        rows = run_evaluate(setup["model"], setup["cohort"], tmp_path / "r", tasks=["sex"])
    split, y = setup["split"], setup["y"]
    calibrating, testing = plant
    assert set(calibrating) <= set(split.train) and not set(calibrating) & set(split.test)
    assert testing == sorted(split.test)
    by = by_method(rows)
    assert by["fmrilm (uncalibrated)", "accuracy"] == pytest.approx(np.mean(y[list(split.test)] == 1))
    assert by["fmrilm (uncalibrated)", "balanced_accuracy"] == 0.5
    assert by["fmrilm", "accuracy"] == 1.0 and by["fmrilm", "auc"] == by["fmrilm (uncalibrated)", "auc"]
    predictions = read_predictions(tmp_path / "r")
    proba = np.stack(predictions["proba"])
    assert predictions["calibrated"].all() and (predictions["y_pred"] == proba.argmax(1)).all()
    assert (np.stack(predictions["proba_uncalibrated"]).argmax(1) == 1).all()
    record = json.loads((tmp_path / "r" / "evaluate.json").read_text())["runs"][0]["calibration"]
    assert record["source"].startswith("fitted") and record["tasks"]["sex"]["n_scans"] == len(calibrating)
    assert "| fmrilm (uncalibrated) |" in (tmp_path / "r" / "results.md").read_text()


def test_evaluate_uses_the_stored_calibration_and_can_be_switched_off(setup, plant, tmp_path):
    Calibration("bias", {"sex": TaskCalibration(["male", "female"], [-OFFSET / 2, OFFSET / 2], 5)}).save(setup["model"])
    rows = run_evaluate(setup["model"], setup["cohort"], tmp_path / "stored", tasks=["sex"])
    assert len(plant) == 1  # only the test scans were scored: the stored bias was used as is
    assert by_method(rows)["fmrilm", "accuracy"] == 1.0
    runs = json.loads((tmp_path / "stored" / "evaluate.json").read_text())["runs"]
    assert runs[0]["calibration"]["source"] == "stored"
    rows = run_evaluate(setup["model"], setup["cohort"], tmp_path / "off", tasks=["sex"], calibration=False)
    by = by_method(rows)
    assert by["fmrilm", "balanced_accuracy"] == 0.5 and not any(m != "fmrilm" for m, _ in by)
    predictions = read_predictions(tmp_path / "off")
    assert not predictions["calibrated"].any()
    assert np.allclose(np.stack(predictions["proba"]), np.stack(predictions["proba_uncalibrated"]))


def test_calibrate_model_writes_the_training_scans_calibration(setup):
    calibration = calibrate_model(setup["model"], setup["info"], max_scans=8)  # a seeded subset: fast
    loaded = Calibration.load(setup["model"])
    assert loaded == calibration and loaded.method == "bias" and list(loaded.tasks) == ["sex"]
    entry = loaded.get("sex")
    assert entry.classes == ["male", "female"] and len(entry.bias) == 2 and np.isfinite(entry.bias).all()
    assert set(entry.scans) <= set(setup["split"].train) and not set(entry.scans) & set(setup["split"].test)
    assert entry.n_scans == len(entry.scans) == 8 < len(setup["split"].train)
    assert sum(entry.class_counts) == entry.n_scans and entry.cohort == str(setup["cohort"].resolve())
    (setup["model"] / CALIBRATION_FILE).unlink()


def test_instruct_refuses_an_unknown_calibration_method_before_training(setup, tmp_path):
    with pytest.raises(FmrilmError, match="unknown calibration method 'platt'"):
        run_instruct(setup["cohort"], setup["model"], tmp_path / "inst", tasks=["sex"], calibration="platt")


def test_calibration_scans_never_include_a_test_scan(setup):
    split = setup["split"]
    run = paradigm_eval.Run(None, split, True, train_scans=(*split.train[:3], *split.test[:2]))
    assert paradigm_eval.calibration_scans(run) == sorted(split.train[:3])
    run = paradigm_eval.Run(None, split, True)
    assert len(paradigm_eval.calibration_scans(run, max_scans=7)) == 7
    assert set(paradigm_eval.calibration_scans(run, max_scans=7)) <= set(split.train)
