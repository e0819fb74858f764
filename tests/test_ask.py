"""fmrilm ask: question -> task matching over the paraphrase bank, constrained answers with probabilities, CLI, errors.

The model is a tiny untrained align-style directory (tiny-llama backbone, a random 38-ROI tokenizer, the cohort's
preprocessing record): the answers are guesses, but the mechanics - prompt, scoring, probabilities - are the real
ones. An ``instruct.json`` beside a copy of it stands for an ``fmrilm instruct`` output.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ar1_scan
from test_describe import make_cohort
from test_lm_pipeline import save_tokenizer
from fmrilm.data.cohort import load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import TASKS
from fmrilm.instruct.answer import class_probabilities
from fmrilm.instruct.ask import Answer, answer_task, ask, match_task, question_with_hint, task_scores
from fmrilm.instruct.calibration import CALIBRATION_FILE, Calibration, TaskCalibration
from fmrilm.instruct.pipeline import INFO_FILE, InstructedModel
from fmrilm.instruct.prompts import TASK_TEXT, answer_words, build_prompt, paraphrases, split_paraphrases
from fmrilm.lm.model import FMRILanguageModel, FMRILMConfig
from fmrilm.lm.pipeline import _copy_tokenizer, _preprocess_record, read_scan
from fmrilm.tokenizer.model import FMRITokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
SEX = "Is this subject male or female?"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``lm``: an align-style directory with an untrained model; ``inst``: the same plus instruct.json."""
    root = tmp_path_factory.mktemp("ask")
    cohort = make_cohort(root / "cohort", n_scans=8)
    save_tokenizer(root / "tok", cohort)
    torch.manual_seed(0)
    config = FMRILMConfig.from_tokenizer(FMRITokenizer.from_pretrained(root / "tok").config,
                                         tokenizer_dir=str(root / "tok"), llm="tiny-llama", lora_dropout=0.0)
    FMRILanguageModel(config).save_pretrained(root / "lm")
    with load_cohort(cohort) as opened:
        (root / "lm" / "preprocess.json").write_text(json.dumps(_preprocess_record(opened)))
    _copy_tokenizer(root / "tok", root / "lm" / "tokenizer")
    shutil.copytree(root / "lm", root / "inst")
    info = {"tasks": ["sex", "age", "adhd_vs_control"], "cohorts": [{"name": "ukb", "path": str(cohort)}],
            "max_text_tokens": 192}
    (root / "inst" / INFO_FILE).write_text(json.dumps(info))
    return {"root": root, "lm": root / "lm", "inst": root / "inst", "loaded": InstructedModel(root / "inst")}


@pytest.fixture
def scan(tmp_path):
    path = tmp_path / "scan.npy"
    np.save(path, ar1_scan(np.random.default_rng(3), 170, n_rois=38))
    return path


# ------------------------------------------------------------------------------------------ matching
def test_every_held_out_paraphrase_matches_its_own_task():
    """Single questions are in the matcher's vocabulary; multi items ("the sex of the participant (male or
    female)") are not (the vocabulary comes from single questions), so they test wording it never saw."""
    for task in TASK_TEXT:
        for paradigm in ("single", "multi"):
            _, held_out = split_paraphrases(paraphrases(task, paradigm))
            wrong = [q for q in held_out if match_task(q) != task]
            assert not wrong, (task, paradigm, wrong[:3])


@pytest.mark.parametrize("question, task", [
    (SEX, "sex"), ("Is this a man or a woman?", "sex"), ("What is the gender of this participant?", "sex"),
    ("How old is this person?", "age"), ("Is the participant young or old?", "age_group"),
    ("Which age group is this person in?", "age_group"), ("Does this person have ADHD?", "adhd_vs_control"),
    ("Does the participant have Alzheimer's disease?", "ad_vs_cn"), ("Does this person have dementia?", "ad_vs_cn"),
    ("Is this person autistic?", "asd_vs_control"), ("What is this person's IQ?", "fluid_intelligence"),
    ("How does their flanker performance compare with the cohort?", "flanker_level"),
    ("What fluid cognition score did this participant obtain?", "fluid_composite"),
])
def test_user_questions_match(question, task):
    assert match_task(question) == task


@pytest.mark.parametrize("question, match", [
    ("What is the weather today?", r"matches no task; name one with --task \(sex, age, .*\) or pass --generate"),
    ("How tall is this person?", "matches no task"),
    ("Tell me about this scan.", "matches no task"),
    ("What is the diagnosis?", "could be about ad_vs_cn or adhd_vs_control or asd_vs_control; name one with --task"),
    ("How high is the score?", "could be about fluid_intelligence or fluid_composite or flanker"),
])
def test_vague_or_foreign_questions_are_refused(question, match):
    with pytest.raises(FmrilmError, match=match):
        match_task(question)


def test_matching_is_restricted_to_the_models_tasks():
    assert match_task("What is the diagnosis?", ["sex", "adhd_vs_control"]) == "adhd_vs_control"
    assert match_task("Which age group is this person in?", ["age"]) == "age_group"  # answered by the same bins
    with pytest.raises(FmrilmError, match=r"is about adhd_vs_control, which this model was not trained for; its "
                                          r"tasks: sex, age"):
        match_task("Does this person have ADHD?", ["sex", "age"])


def test_generic_words_weigh_nothing_and_answer_words_most():
    scores = task_scores("What is the scan of the participant?")
    assert all(s == 0 for s in scores.values())
    scores = task_scores(SEX)
    assert max(scores, key=scores.get) == "sex" and scores["sex"] > 3 * max(v for k, v in scores.items() if k != "sex")


def test_regression_tasks_are_answered_by_their_ordinal_bins():
    assert [answer_task(t) for t in ("sex", "age", "fluid_intelligence", "fluid_composite", "flanker")] == [
        "sex", "age_group", "fluid_intelligence_level", "fluid_composite_level", "flanker_level"]
    assert all(TASKS[answer_task(t)].is_classification for t in TASK_TEXT)


def test_question_gets_the_training_hint_unless_it_names_every_answer():
    assert question_with_hint(SEX, "sex") == SEX
    assert question_with_hint(" How old is this person? ", "age_group") == (
        "How old is this person? Answer with younger, middle-aged or older.")
    assert question_with_hint("Does this person have ADHD?", "adhd_vs_control").endswith("Answer with control or ADHD.")


# ------------------------------------------------------------------------------------------ answers
def test_probabilities_are_constrained_scores_of_the_training_prompt(models, scan):
    loaded = models["loaded"]
    answer = ask(loaded, scan, SEX, tr=2.0)
    prompt = build_prompt(SEX, "ukb", tasks=["sex"])
    assert answer.prompt == prompt and prompt.startswith("This resting-state scan is part of the UK Biobank")
    assert answer.task == answer.matched == "sex" and list(answer.probabilities) == ["male", "female"]
    x = read_scan(scan, loaded.preprocess, tr=2.0)
    _, features = loaded.tokenizer.encode(torch.from_numpy(x[None]))
    expected = class_probabilities(loaded.model, features, prompt, "sex")[0]
    assert list(answer.probabilities.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert answer.answer == max(answer.probabilities, key=answer.probabilities.get)
    assert answer.probability == answer.probabilities[answer.answer] >= 0.5
    assert str(answer) == f"{answer.answer} (p = {answer.probability:.2f})"
    other = ask(loaded, scan, SEX, tr=2.0, dataset="hcp")  # --cohort names another cohort in the prompt
    assert other.prompt == build_prompt(SEX, "hcp", tasks=["sex"]) and "Human Connectome" in other.prompt


def test_regression_question_is_answered_over_the_bins(models, scan):
    answer = ask(models["loaded"], scan, "How old is this person?", tr=2.0)
    assert (answer.task, answer.matched) == ("age_group", "age")
    assert list(answer.probabilities) == list(answer_words("age_group"))
    assert sum(answer.probabilities.values()) == pytest.approx(1.0, abs=1e-6)
    assert "### Question: How old is this person? Answer with younger, middle-aged or older.\n### Answer:" in answer.prompt
    assert answer.prompt.startswith("This resting-state scan is part of the UK Biobank.\n")  # no age range


def test_task_option_wins_and_is_checked_against_the_model(models, scan):
    answer = ask(models["loaded"], scan, "What about this one?", task="adhd_vs_control", tr=2.0)
    assert answer.task == "adhd_vs_control" and list(answer.probabilities) == ["control", "ADHD"]
    with pytest.raises(FmrilmError, match=r"task 'flanker' is not one this model was trained for; its tasks: sex, "
                                          r"age, adhd_vs_control"):
        ask(models["loaded"], scan, SEX, task="flanker", tr=2.0)
    with pytest.raises(FmrilmError, match=r"is about asd_vs_control, which this model was not trained for"):
        ask(models["loaded"], scan, "Is this person autistic?", tr=2.0)


def test_align_output_without_instruct_json_allows_every_task_and_warns(models, scan):
    with pytest.warns(UserWarning, match="is not instruction-tuned"):
        answer = ask(models["lm"], scan, "Is this person autistic?", tr=2.0)
    assert answer.task == "asd_vs_control" and answer.prompt.startswith("### Question:")  # no cohort sentence


def test_unmatched_question_is_generated_only_when_asked(models, scan):
    with pytest.raises(FmrilmError, match="matches no task"):
        ask(models["loaded"], scan, "Tell me about this scan.", tr=2.0)
    answer = ask(models["loaded"], scan, "Tell me about this scan.", tr=2.0, generate=True)
    assert answer.method == "generated" and answer.task is None and answer.probability is None
    assert isinstance(answer.answer, str) and str(answer).endswith("(free generation: no task matched the question)")
    assert answer.prompt.endswith("### Question: Tell me about this scan.\n### Answer:")


def test_stored_calibration_corrects_the_probabilities_unless_switched_off(models, scan, capsys):
    """A bias of +-5 nats against "male" in the model's calibration.json: the answer becomes "female" with the
    calibrated probability; calibrate=False (--no-calibration) gives the raw probabilities back."""
    from fmrilm.cli import main

    loaded = models["loaded"]
    raw = ask(loaded, scan, SEX, tr=2.0)
    Calibration("bias", {"sex": TaskCalibration(["male", "female"], [5.0, -5.0], 10)}).save(models["inst"])
    try:
        calibrated = ask(loaded, scan, SEX, tr=2.0)
        off = ask(loaded, scan, SEX, tr=2.0, calibrate=False)
        argv = ["ask", SEX, "--model", str(models["inst"]), "--scan", str(scan), "--tr", "2", "--json"]
        assert main(argv) == 0 and json.loads(capsys.readouterr().out)["calibrated"] is True
        assert main([*argv, "--no-calibration"]) == 0
        assert json.loads(capsys.readouterr().out)["probabilities"] == pytest.approx(raw.probabilities)
    finally:
        (models["inst"] / CALIBRATION_FILE).unlink()
    logits = np.log(list(raw.probabilities.values())) - np.array([5.0, -5.0])
    expected = np.exp(logits) / np.exp(logits).sum()
    assert calibrated.calibrated and not raw.calibrated and not off.calibrated
    assert calibrated.answer == "female" and list(calibrated.probabilities.values()) == pytest.approx(expected)
    assert off.probabilities == pytest.approx(raw.probabilities)
    answer = ask(loaded, scan, "How old is this person?", tr=2.0)  # no calibration for age_group: raw
    assert not answer.calibrated


def test_cli_prints_the_answer_with_its_probability(models, scan, capsys):
    from fmrilm.cli import main

    argv = ["ask", SEX, "--model", str(models["inst"]), "--scan", str(scan), "--tr", "2"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line == str(ask(models["loaded"], scan, SEX, tr=2.0))
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["task"] == "sex" and line == f"{record['answer']} (p = {record['probability']:.2f})"
    assert main(["ask", "What is the diagnosis?", "--model", str(models["inst"]), "--scan", str(scan), "--tr", "2",
                 "--task", "nonsense"]) == 2
    assert "unknown task 'nonsense'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ errors
def test_bad_inputs_are_one_line_errors(models, scan, tmp_path):
    loaded = models["loaded"]
    np.save(tmp_path / "narrow.npy", ar1_scan(np.random.default_rng(4), 170, n_rois=37))
    (tmp_path / "scan.xyz").write_text("1 2 3\n")
    with pytest.raises(FmrilmError, match=r"unknown task 'height'; use one of sex, age"):
        ask(loaded, scan, SEX, task="height", tr=2.0)
    with pytest.raises(FmrilmError, match=r"missing\.npy: file does not exist"):
        ask(loaded, tmp_path / "missing.npy", SEX, tr=2.0)
    with pytest.raises(FmrilmError, match=r"unsupported extension '\.xyz'"):
        ask(loaded, tmp_path / "scan.xyz", SEX, tr=2.0)
    with pytest.raises(FmrilmError, match="37 ROI columns but the atlas has 38 ROIs"):
        ask(loaded, tmp_path / "narrow.npy", SEX, tr=2.0)
    with pytest.raises(FmrilmError, match="unknown TR; pass --tr SECONDS"):
        ask(loaded, scan, SEX)
    with pytest.raises(FmrilmError, match="is not an 'fmrilm align' output"):
        ask(tmp_path, scan, SEX, tr=2.0)
    with pytest.raises(FmrilmError, match="the question is empty"):
        ask(loaded, scan, "  ", tr=2.0)


def test_answer_round_trips_through_json():
    answer = Answer("sex", "female", 0.8, {"male": 0.2, "female": 0.8}, "sex", "### Question: q\n### Answer:")
    assert Answer(**json.loads(json.dumps(answer.to_dict()))) == answer
