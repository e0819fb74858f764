"""Stage 3 evaluation: fmrilm evaluate on tiny models, its splits, prompts, metrics, paradigms, probe, CLI, errors.

A 30-scan, 38-ROI cohort (sex, age and a fluid intelligence column no model is trained on), a tiny random
tokenizer and a tiny-llama model saved in the layout of an ``fmrilm align`` output, instruction-tuned twice
(seeds 0 and 1, sex + age); the two models evaluated together (single paradigm) are shared by the module.
The models are barely trained: these tests check the mechanics, not the accuracy.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, mean_absolute_error, roc_auc_score

from test_describe import make_cohort
from test_lm_pipeline import save_tokenizer
from fmrilm.data.cohort import load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import Split, get_task, make_splits
from fmrilm.instruct import paradigm_eval
from fmrilm.instruct.answer import extract_fields
from fmrilm.instruct.calibration import Calibration
from fmrilm.instruct.data import paraphrase_pools, question_task
from fmrilm.instruct.evaluate import load_model, run_evaluate
from fmrilm.instruct.paradigm_eval import last_prompt_states
from fmrilm.instruct.paradigms import describe
from fmrilm.instruct.pipeline import run_instruct
from fmrilm.instruct.probe import LinearProbe
from fmrilm.io import write_json_atomic
from fmrilm.lm.model import FMRILanguageModel, FMRILMConfig
from fmrilm.lm.pipeline import _copy_tokenizer, _preprocess_record
from fmrilm.tokenizer.model import FMRITokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
INSTRUCT = dict(tasks=["sex", "age"], train={"epochs": 1, "batch_size": 4, "log_every": 1}, max_text_tokens=384)


def with_column(cohort, **columns):
    """Add phenotype columns to a cohort in place (before any model sees it)."""
    path = cohort / "phenotypes.parquet"
    table = pd.read_parquet(path)
    for name, values in columns.items():
        table[name] = values
    table.to_parquet(path)
    return cohort


def save_align_layout(root, cohort):
    """A random tiny-llama fMRI-LM in the layout of an 'fmrilm align' output (no Stage 2 training)."""
    save_tokenizer(root / "tok", cohort)
    config = FMRILMConfig.from_tokenizer(FMRITokenizer.from_pretrained(root / "tok").config, llm="tiny-llama",
                                         lora_dropout=0.0)
    torch.manual_seed(0)
    FMRILanguageModel(config).save_pretrained(root / "lm")
    with load_cohort(cohort) as opened:
        write_json_atomic(root / "lm" / "preprocess.json", _preprocess_record(opened))
    _copy_tokenizer(root / "tok", root / "lm" / "tokenizer")
    write_json_atomic(root / "lm" / "align_meta.json", {"max_text_tokens": 64})
    return root / "lm"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    cohort = with_column(make_cohort(root / "cohort", n_scans=30), fluid_intelligence=np.arange(30.0) % 13)
    other = make_cohort(root / "other", n_scans=20, seed=1)
    lm = save_align_layout(root, cohort)
    insts = [root / f"inst{s}" for s in (0, 1)]
    infos = [run_instruct(cohort, lm, inst, seed=s, **INSTRUCT) for s, inst in enumerate(insts)]
    rows = run_evaluate(insts, cohort, root / "single", tasks=["sex", "age"])
    return {"root": root, "cohort": cohort, "other": other, "lm": lm, "insts": insts, "infos": infos,
            "rows": rows, "single": root / "single"}


def read_predictions(out):
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(line) for line in lines])


def subjects_of(cohort, indices):
    with load_cohort(cohort) as opened:
        return set(opened.scans["subject_id"].astype(str).iloc[list(indices)])


def question_of(prompt):
    return re.search(r"### Question: (.*)\n### Answer:$", prompt, re.S).group(1)


# ------------------------------------------------------------------------------------------ single, end to end
def test_single_writes_rows_tables_predictions_and_settings(data):
    out, rows = data["single"], data["rows"]
    saved = json.loads((out / "results.json").read_text())["rows"]
    assert len(saved) == len(rows) and {r["task"] for r in saved} == {"sex", "age_group", "age"}
    by = {(r.task, r.metric): r for r in rows if r.method == "fmrilm"}
    for task in ("sex", "age_group"):
        for metric in ("accuracy", "balanced_accuracy", "f1"):
            assert by[task, metric].n_seeds == 2 and by[task, metric].setting == "full" and by[task, metric].shots is None
    assert set(m for t, m in by if t == "age") == {"mae", "pearson_r"} and by["age", "mae"].n_seeds == 2
    assert "## custom · single · full · all training subjects" in (out / "results.md").read_text()
    predictions = read_predictions(out)
    assert set(predictions["head"]) == {"constrained", "probe"}
    sex = predictions[predictions.task == "sex"]
    assert np.allclose(np.stack(sex["proba"]).sum(1), 1.0, atol=1e-5)
    assert (sex["y_pred"] == np.stack(sex["proba"]).argmax(1)).all()
    settings = json.loads((out / "evaluate.json").read_text())
    assert settings["paradigm"] == "single" and len(settings["runs"]) == 2


def test_test_subjects_are_the_recorded_test_split_and_never_training_subjects(data):
    runs = json.loads((data["single"] / "evaluate.json").read_text())["runs"]
    predictions = read_predictions(data["single"])
    for inst, info, run in zip(data["insts"], data["infos"], runs):
        split = Split.from_dict(info["cohorts"][0]["split"])
        test, train = subjects_of(data["cohort"], split.test), subjects_of(data["cohort"], split.train)
        assert run["model"] == str(inst) and set(run["test_subjects"]) == test and not test & train
        assert set(predictions[predictions.model == str(inst)]["subject_id"]) <= test
    assert runs[0]["test_subjects"] != runs[1]["test_subjects"]  # two seeds, two splits


def test_metrics_equal_scikit_learn_on_the_saved_predictions(data):
    predictions = read_predictions(data["single"])
    by = {(r.task, r.metric): r for r in data["rows"] if r.method == "fmrilm"}  # decided on calibrated proba
    per_model = {}
    for model, part in predictions.groupby("model"):
        sex, bins, age = (part[part.task == t] for t in ("sex", "age_group", "age"))
        proba = np.stack(sex["proba"])
        per_model[model] = {
            ("sex", "accuracy"): accuracy_score(sex.y_true, sex.y_pred),
            ("sex", "balanced_accuracy"): balanced_accuracy_score(sex.y_true, sex.y_pred),
            ("sex", "auc"): roc_auc_score(sex.y_true, proba[:, 1]), ("sex", "f1"): f1_score(sex.y_true, sex.y_pred),
            ("age_group", "accuracy"): accuracy_score(bins.y_true, bins.y_pred),
            ("age_group", "f1"): f1_score(bins.y_true, bins.y_pred, average="macro"),
            ("age", "mae"): mean_absolute_error(age.y_true, age.y_pred),
            ("age", "pearson_r"): pearsonr(age.y_true, age.y_pred)[0]}
    for key in per_model[str(data["insts"][0])]:
        values = [m[key] for m in per_model.values()]
        assert by[key].mean == pytest.approx(np.mean(values)), key
        assert by[key].std == pytest.approx(np.std(values, ddof=1)), key


def test_only_held_out_paraphrases_are_asked(data):
    predictions = read_predictions(data["single"])
    for info in data["infos"]:
        held = info["held_out_paraphrases"]["single"]
        train, _ = paraphrase_pools([question_task(t) for t in ("sex", "age")], ["single"])
        for task, prompt in predictions[["task", "prompt"]].itertuples(index=False):
            asked = question_task(task).name
            assert question_of(prompt) in held[asked] and question_of(prompt) not in train["single"][asked]
    assert predictions["prompt"].nunique() > 3  # one paraphrase drawn per scan, not one for all


def test_probe_states_do_not_depend_on_padding_or_batch(data):
    model = load_model(data["insts"][0]).model
    torch.manual_seed(0)
    features = torch.randn(2, model.config.n_steps, model.config.n_rois, model.config.feature_dim)
    prompts = ["### Question: short?\n### Answer:", "A much longer cohort sentence here.\n### Question: how old?"
               "\n### Answer:"]
    both = last_prompt_states(model, features, prompts)
    alone = np.concatenate([last_prompt_states(model, features[i:i + 1], prompts[i:i + 1]) for i in (0, 1)])
    assert both.shape[0] == 2 and np.isfinite(both).all()
    np.testing.assert_allclose(both, alone, atol=1e-4)


def test_instruct_stores_a_calibration_fitted_on_training_scans_used_by_evaluate(data):
    for inst, info in zip(data["insts"], data["infos"]):
        calibration, cohort = Calibration.load(inst), info["cohorts"][0]
        assert set(calibration.tasks) == {"sex", "age_group"}  # the question tasks (age: its bins)
        for entry in calibration.tasks.values():
            assert set(entry.scans) <= set(cohort["train_scans"])
            assert not set(entry.scans) & set(cohort["split"]["test"])
            assert entry.n_scans == len(entry.scans) > 0 and np.isfinite(entry.bias).all()
    runs = json.loads((data["single"] / "evaluate.json").read_text())["runs"]
    assert all(run["calibration"]["source"] == "stored" for run in runs)
    predictions = read_predictions(data["single"])
    assert predictions[predictions["head"] == "constrained"]["calibrated"].all()
    methods = {(r.method, r.task) for r in data["rows"]}
    assert {("fmrilm (uncalibrated)", "sex"), ("fmrilm (uncalibrated)", "age_group")} <= methods
    assert ("fmrilm (uncalibrated)", "age") not in methods  # the probe is not calibrated


# ------------------------------------------------------------------------------------------ multi and open
def fake_answers(monkeypatch, answers):
    """Replace generation by the given answers, consumed in the (sorted) order the test scans are asked."""
    queue, asked = list(answers), []

    def generate(model, features, prompts, max_new_tokens):
        asked.extend(prompts)
        return [queue.pop(0) for _ in prompts]

    monkeypatch.setattr(paradigm_eval, "generate_answers", generate)
    return asked


def scans_under_test(data, model=0):
    info = data["infos"][model]["cohorts"][0]
    with load_cohort(data["cohort"]) as opened:
        table = opened.scan_phenotypes()
    test = sorted(info["split"]["test"])
    groups = np.searchsorted(info["cuts"]["age_group"], table["age"].to_numpy(), side="right")
    return table.iloc[test], groups[test]


def test_multi_answers_are_parsed_in_any_order_and_unparsed_ones_are_wrong(data, monkeypatch, tmp_path):
    table, groups = scans_under_test(data)
    words = {"M": "male", "F": "woman"}
    group_words = ("younger", "middle-aged", "older")
    answers = [f"sex: {words[s]}; age group: {group_words[g]}" if i % 2 else
               f"Age group - {group_words[g]}. Sex: {words[s]}" for i, (s, g) in enumerate(zip(table.sex, groups))]
    answers[0] = "I cannot tell."
    asked = fake_answers(monkeypatch, answers)
    rows = run_evaluate(data["insts"][0], data["cohort"], tmp_path / "multi", tasks=["sex", "age"], paradigm="multi")
    by = {(r.task, r.metric): r.mean for r in rows}
    n = len(answers)
    for task in ("sex", "age_group"):  # age is asked as its bins, as trained
        assert by[task, "accuracy"] == pytest.approx((n - 1) / n) and by[task, "parse_rate"] == pytest.approx((n - 1) / n)
    held = data["infos"][0]["held_out_paraphrases"]["multi"]
    for prompt in asked:
        assert any(f.split("{items}")[0] in prompt for f in held["frames"])
        assert any(item in prompt for item in held["sex"]) and any(item in prompt for item in held["age_group"])


def test_open_descriptions_are_scored_per_field_and_overall(data, monkeypatch, tmp_path):
    table, _ = scans_under_test(data)
    answers = [describe({"sex": "male" if s == "M" else "female", "age": a}, random.Random(i))
               for i, (s, a) in enumerate(zip(table.sex, table.age))]
    answers[1] = answers[1].replace(f"{table.age.iloc[1]:.0f}-year-old", f"{table.age.iloc[1] + 20:.0f}-year-old")
    asked = fake_answers(monkeypatch, answers)
    # an installed sentence encoder adds "similarity" of each answer to a reference description of the truth
    monkeypatch.setattr(paradigm_eval, "sentence_similarity", lambda answer, reference: 0.25)
    rows = run_evaluate(data["insts"][0], data["cohort"], tmp_path / "open", tasks=["sex", "age"], paradigm="open")
    by = {(r.task, r.metric): r.mean for r in rows}
    n = len(answers)
    assert by["sex", "accuracy"] == 1.0 and by["age", "accuracy"] == pytest.approx((n - 1) / n)
    assert by["overall", "accuracy"] == pytest.approx((n - 1) / n)
    assert by["overall", "similarity"] == 0.25
    predictions = read_predictions(tmp_path / "open")
    for reference, truth in predictions[predictions.task == "age"][["reference", "y_true"]].itertuples(index=False):
        assert extract_fields(reference, ["age"])["age"] == truth
    held = data["infos"][0]["held_out_paraphrases"]["open"]["frames"]
    assert all(any(question_of(p).startswith(f.split("{fields}")[0]) for f in held) for p in asked)


# ------------------------------------------------------------------------------------------ settings and seeds
def test_new_cohort_new_task_and_untrained_model_settings(data, tmp_path):
    rows = run_evaluate(data["insts"][0], data["other"], tmp_path / "new", tasks=["sex"], seeds=[0, 1])
    assert {(r.setting, r.shots) for r in rows} == {("new-cohort", 0)} and max(r.n_seeds for r in rows) == 2
    runs = json.loads((tmp_path / "new" / "evaluate.json").read_text())["runs"]
    for run, split in zip(runs, make_splits(data["other"], "sex", [0, 1])):
        assert set(run["test_subjects"]) == subjects_of(data["other"], split.test)
    rows = run_evaluate(data["insts"][0], data["cohort"], tmp_path / "task", tasks=["fluid_intelligence_level"])
    assert {(r.setting, r.shots) for r in rows} == {("new-task", 0)}
    rows = run_evaluate(data["lm"], data["other"], tmp_path / "none", tasks=["sex"])
    assert {(r.setting, r.shots, r.n_seeds) for r in rows if r.metric == "accuracy"} == {("new-task-new-cohort", 0, 1)}


def test_k_shot_runs_fine_tune_on_k_balanced_training_scans_and_draw_a_curve(data, tmp_path):
    rows = run_evaluate(data["insts"][0], data["other"], tmp_path / "fs", tasks=["sex"], shots=[0, 2],
                        budget_steps=2)
    assert {(r.setting, r.shots) for r in rows} == {("new-cohort", 0), ("new-cohort", 2)}
    runs = json.loads((tmp_path / "fs" / "evaluate.json").read_text())["runs"]
    split = make_splits(data["other"], "sex", [0])[0]
    shot = runs[1]
    assert shot["shots"] == 2 and len(shot["shot_scans"]) == 2 and set(shot["shot_scans"]) <= set(split.train)
    with load_cohort(data["other"]) as opened:
        assert set(opened.scan_phenotypes()["sex"].iloc[shot["shot_scans"]]) == {"M", "F"}  # balanced by label
    assert shot["test_subjects"] == runs[0]["test_subjects"] == sorted(subjects_of(data["other"], split.test))
    markdown = (tmp_path / "fs" / "results.md").read_text()
    curve = markdown.split("## custom · single · new-cohort · few-shot curve")[1]
    assert "| Method | Task | Metric | 0-shot | 2-shot |" in curve and "| fmrilm | sex | ACC |" in curve


def test_k_shot_on_the_training_cohort_draws_examples_per_seed(data, tmp_path):
    rows = run_evaluate(data["insts"][0], data["cohort"], tmp_path / "fs", tasks=["fluid_intelligence_level"],
                        shots=[3], seeds=[0, 1], budget_steps=1)
    assert {(r.setting, r.shots, r.n_seeds) for r in rows if r.metric == "accuracy"} == {("new-task", 3, 2)}
    runs = json.loads((tmp_path / "fs" / "evaluate.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and runs[0]["test_subjects"] == runs[1]["test_subjects"]
    assert runs[0]["shot_scans"] != runs[1]["shot_scans"]


# ------------------------------------------------------------------------------------------ probe
def test_probe_learns_a_planted_linear_signal_and_nothing_from_noise():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 48)) * rng.uniform(0.1, 30, 48) + rng.uniform(-50, 50, 48)  # unscaled states
    y = 60 + 3 * (x[:, :5] / x[:, :5].std(0)).sum(1) + rng.standard_normal(300)
    probe = LinearProbe(48).fit(x[:200], y[:200])
    pred = probe.predict(x[200:])
    assert pearsonr(y[200:], pred)[0] > 0.95 and mean_absolute_error(y[200:], pred) < 2.0
    assert isinstance(probe.norm, torch.nn.BatchNorm1d) and not probe.norm.affine
    noise = LinearProbe(48).fit(x[:200], rng.standard_normal(200))
    assert abs(pearsonr(rng.standard_normal(100), noise.predict(x[200:]))[0]) < 0.3


def test_probe_errors():
    with pytest.raises(FmrilmError, match="not fitted"):
        LinearProbe(4).predict(np.zeros((2, 4)))
    with pytest.raises(FmrilmError, match=r"states \(n, 4\)"):
        LinearProbe(4).fit(np.zeros((5, 3)), np.arange(5.0))
    with pytest.raises(FmrilmError, match="not all equal"):
        LinearProbe(4).fit(np.zeros((5, 4)), np.ones(5))


# ------------------------------------------------------------------------------------------ CLI and errors
def test_cli_evaluate(data, tmp_path, capsys):
    from fmrilm.cli import main

    out = tmp_path / "cli"
    code = main(["evaluate", "--model", str(data["insts"][0]), "--cohort", str(data["cohort"]), "--tasks", "sex",
                 "--out", str(out)])
    assert code == 0 and (out / "results.json").is_file() and (out / "predictions.jsonl").is_file()
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and re.search(r"sex\s+accuracy\s+\d\.\d{3} ± 0\.000", printed)
    code = main(["evaluate", "--model", str(data["insts"][0]), "--cohort", str(data["cohort"]), "--tasks", "sex",
                 "--out", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("narrow") / "cohort", n_scans=6, networks=["Vis"] * 10 + ["Default"] * 20)


@pytest.mark.parametrize("case, message", [
    ("task", "unknown task 'handedness'"),
    ("paradigm", "unknown paradigm 'essay'"),
    ("column", "task flanker needs phenotype column 'flanker'.*choose other --tasks"),
    ("grid", "has 30 ROIs x 160 time points .* but the model .* expects 38 x 160"),
    ("exists", "already exists; choose another --out or pass --overwrite"),
    ("not_a_model", "is not an 'fmrilm align' output"),
    ("same_column", "tasks age and age_group both predict column 'age'"),
    ("shots", "shots must be numbers of labelled scans >= 0"),
])
def test_errors(data, narrow, tmp_path, case, message):
    model, cohort, kwargs = data["insts"][0], data["cohort"], {"tasks": ["sex"]}
    out = tmp_path / "out"
    if case == "task":
        kwargs["tasks"] = ["handedness"]
    elif case == "paradigm":
        kwargs["paradigm"] = "essay"
    elif case == "column":
        kwargs["tasks"] = ["flanker"]
    elif case == "grid":
        cohort = narrow
    elif case == "exists":
        out.mkdir()
    elif case == "not_a_model":
        model = tmp_path
    elif case == "same_column":
        kwargs.update(tasks=["age", "age_group"], paradigm="open")
    elif case == "shots":
        kwargs["shots"] = [-1]
    with pytest.raises(FmrilmError, match=message):
        run_evaluate(model, cohort, out, **kwargs)


def test_probe_needs_three_labelled_training_scans():
    states = {i: np.full(4, float(i)) for i in range(4)}
    with pytest.raises(FmrilmError, match="task age: 2 labelled training scans; the linear probe needs >= 3"):
        paradigm_eval._probe(get_task("age"), np.arange(4.0), states, test={2, 3})
