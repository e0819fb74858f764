"""Instruction prompts of Stage 3: template paraphrases per task and paradigm, and the prompt format.

Format (the paper's)::

    {cohort sentence} {optional semantic description}
    ### Question: {question}
    ### Answer: {answer}

:func:`build_prompt` writes everything up to ``### Answer:``; present context parts are joined by one space
and followed by a newline (no context: the prompt starts at ``### Question:``). The answer is appended with
:data:`ANSWER_PREFIX` (one space) and tokenized on its own, both in training and in constrained decoding.

Paraphrases are built combinatorially from parts (no external LLM), deterministically:

* ``single``: ``{context}{question} {hint}``: 11 contexts x 5 questions x 5 subjects x 5 hints; the hint lists
  the allowed answers ("Answer with male or female.") or asks for a number.
* ``multi``: one item per task (``{wrapper}`` x noun x subject x short hint, e.g. "sex: the sex of the
  participant (male or female)"); :func:`multi_frames` joins 2-3 items and asks for ``label: answer`` pairs.
* ``open``: :func:`open_frames` ("Describe the participant, mentioning {fields}.") filled with the task's
  field phrases ("their sex").

Canonical answer words (:data:`TASK_TEXT` ``answers``, in the class-code order of
:data:`fmrilm.evaluate.protocol.TASKS`) are also the candidates of constrained decoding: male / female;
younger / middle-aged / older; lower / mean / higher; the long diagnosis forms "cognitively normal" /
"Alzheimer's disease", and control / ADHD, control / autism (long forms carry the LLM's prior knowledge).
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterable, Sequence

from fmrilm.descriptors.semantic import cohort_sentence
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import TaskSpec, get_task

PARADIGMS = ("single", "multi", "open")
ANSWER_PREFIX = " "  # between "### Answer:" and the answer; part of the answer's tokens
LEVELS = ("lower", "mean", "higher")

# Per registry task: template family, label in multi answers, canonical answers (class-code order; empty for
# regression), {m} cognition measure or {d} disorder. A TaskSpec with another name has no templates.
TASK_TEXT: dict[str, dict] = {
    "sex": dict(family="sex", label="sex", answers=("male", "female")),
    "age": dict(family="age", label="age"),
    "age_group": dict(family="age_group", label="age group", answers=("younger", "middle-aged", "older")),
    "fluid_intelligence": dict(family="score", label="fluid intelligence score", m="fluid intelligence"),
    "fluid_intelligence_level": dict(family="level", label="fluid intelligence", m="fluid intelligence",
                                     answers=LEVELS),
    "fluid_composite": dict(family="score", label="fluid cognition score", m="fluid cognition"),
    "fluid_composite_level": dict(family="level", label="fluid cognition", m="fluid cognition", answers=LEVELS),
    "flanker": dict(family="score", label="flanker score", m="flanker inhibitory control"),
    "flanker_level": dict(family="level", label="flanker", m="flanker inhibitory control", answers=LEVELS),
    "ad_vs_cn": dict(family="diagnosis", label="diagnosis", d="Alzheimer's disease",
                     answers=("cognitively normal", "Alzheimer's disease")),
    "adhd_vs_control": dict(family="diagnosis", label="diagnosis", d="ADHD", answers=("control", "ADHD")),
    "asd_vs_control": dict(family="diagnosis", label="diagnosis", d="autism spectrum disorder",
                           answers=("control", "autism")),
}

CONTEXTS = ("", "Based on this scan, ", "Looking at this fMRI scan, ", "From the brain activity above, ",
            "Given this resting-state scan, ", "Judging from the fMRI data, ", "Using the resting-state recording, ",
            "According to this brain scan, ", "From these fMRI tokens, ", "On the basis of this scan, ",
            "Considering the functional connectivity shown, ")
SUBJECTS = ("the participant", "this person", "the subject", "the scanned individual", "the person in this scan")
HINTS = ("Answer with {or_}.", "Reply with one of: {comma}.", "Choose one of {or_}.", "Respond with {or_} only.",
         "Your answer should be {or_}.")
SHORT_HINTS = ("({or_})", "(one of {comma})", "(answer {or_})", "[{slash}]")
NUMBER_HINTS = {
    "age": ("Answer with a number of years.", "Reply with the age in years.", "Give a single number.",
            "Respond with a number only.", "State the age as a number."),
    "score": ("Answer with a number.", "Reply with the score only.", "Give a single number.",
              "Respond with a number only.", "State the score as a number."),
}
SHORT_NUMBER_HINTS = {"age": ("(in years)", "(a number of years)", "(number)", "(years)"),
                      "score": ("(a number)", "(the score)", "(number)", "(numeric)")}
WRAPPERS = ("{noun} {hint}", "{label}: {noun} {hint}", "{noun} {hint}, labelled '{label}'",
            "'{label}' - {noun} {hint}", "under '{label}', {noun} {hint}")

# questions: single paradigm; nouns: multi items; fields: open prompts; aliases: extra label names to parse.
FAMILIES: dict[str, dict[str, tuple[str, ...]]] = {
    "sex": dict(
        questions=("what is the sex of {s}?", "is {s} male or female?", "what sex is {s}?",
                   "which sex does {s} have?", "what is the biological sex of {s}?"),
        nouns=("the sex of {s}", "the biological sex of {s}", "whether {s} is male or female", "which sex {s} is"),
        fields=("their sex", "their biological sex"), aliases=("gender", "biological sex")),
    "age": dict(
        questions=("how old is {s}?", "what is the age of {s}?", "what age is {s}?", "estimate the age of {s}.",
                   "how many years old is {s}?"),
        nouns=("the age of {s}", "how old {s} is", "the age in years of {s}", "the estimated age of {s}"),
        fields=("their age", "how old they are"), aliases=("age in years", "estimated age")),
    "age_group": dict(
        questions=("which age group does {s} belong to?", "what is the age group of {s}?",
                   "how old is {s} relative to the rest of the cohort?", "classify {s} by age group.",
                   "which age tertile of the cohort does {s} fall into?"),
        nouns=("the age group of {s}", "which age group {s} belongs to", "how old {s} is relative to the cohort",
               "the age tertile of {s}"),
        fields=("their age group", "their age relative to the cohort"),
        aliases=("age category", "age tertile", "age bracket")),
    "level": dict(
        questions=("how does the {m} of {s} compare with the cohort?", "what is the {m} level of {s}?",
                   "is the {m} of {s} below, near or above the cohort mean?", "where does {s} stand on {m}?",
                   "rate the {m} of {s} relative to other participants."),
        nouns=("the {m} level of {s}", "how the {m} of {s} compares with the cohort", "where {s} stands on {m}",
               "the {m} of {s} relative to the cohort mean"),
        fields=("their {m} level", "how their {m} compares with the cohort"), aliases=("{m} level",)),
    "score": dict(
        questions=("what is the {m} score of {s}?", "estimate the {m} score of {s}.",
                   "what {m} score did {s} obtain?", "predict the {m} score of {s}.",
                   "how high is the {m} score of {s}?"),
        nouns=("the {m} score of {s}", "which {m} score {s} obtained", "the expected {m} score of {s}",
               "how high the {m} score of {s} is"),
        fields=("their {m} score", "their expected {m} score"), aliases=("{m}",)),
    "diagnosis": dict(
        questions=("does {s} have {d}?", "what is the diagnosis of {s}?",
                   "which diagnostic group does {s} belong to?", "is there evidence of {d} in {s}?",
                   "is {s} diagnosed with {d}?"),
        nouns=("the diagnosis of {s}", "whether {s} has {d}", "the diagnostic group of {s}",
               "whether there is evidence of {d} in {s}"),
        fields=("their diagnosis", "whether they have {d}"),
        aliases=("diagnostic group", "diagnostic status", "clinical status", "dx")),
}

MULTI_OPENERS = ("Based on this scan, report the following:", "From this fMRI scan, determine:",
                 "Answer several questions about the person behind this scan:",
                 "Looking at the brain activity above, estimate:",
                 "Please predict these properties of the participant:", "Using this resting-state scan, give:",
                 "For this scan, infer:", "Several questions about this participant:")
MULTI_FORMATS = ("Answer in the form '{labels}'.",
                 "Reply with 'label: answer' pairs separated by semicolons ({labels}).",
                 "Give each answer as '{labels}'.", "Use the format '{labels}', in any order.",
                 "Write your answers as '{labels}'.", "Respond with one pair per item, like '{labels}'.")
OPEN_VERBS = ("Describe", "Write a short description of", "Give a brief profile of",
              "Summarise what this scan suggests about", "Characterise", "Tell me about")
OPEN_SCOPES = ("", " in one sentence", " in a few words")
OPEN_COVERS = ("mentioning", "including", "stating", "covering")


# ------------------------------------------------------------------------------------------------ tasks
def resolve(task: str | TaskSpec) -> tuple[TaskSpec, dict]:
    """The registry :class:`TaskSpec` and its :data:`TASK_TEXT` entry (a TaskSpec is looked up by name)."""
    spec = get_task(task)
    text = TASK_TEXT.get(spec.name)
    if text is None:
        raise FmrilmError(f"no instruction templates for task {spec.name!r}; known tasks: {', '.join(TASK_TEXT)}")
    answers = text.get("answers", ())
    if len(answers) != len(spec.classes):  # a TaskSpec reusing a registry name with other classes
        raise FmrilmError(f"task {spec.name!r} has classes {list(spec.classes)} but the templates answer "
                          f"{list(answers)}; use the registry task")
    return spec, text


def answer_words(task: str | TaskSpec) -> tuple[str, ...]:
    """Canonical answers in class-code order (``answer_words(t)[y]`` for class code y); () for regression."""
    return resolve(task)[1].get("answers", ())


def task_label(task: str | TaskSpec) -> str:
    """Name of the task in multi-question answers ("age group")."""
    return resolve(task)[1]["label"]


def label_aliases(task: str | TaskSpec) -> tuple[str, ...]:
    """The label and its synonyms, filled ("fluid intelligence level"), for parsing answers."""
    _, text = resolve(task)
    return (text["label"], *(_fill(a, text) for a in FAMILIES[text["family"]]["aliases"]))


def open_fields(task: str | TaskSpec) -> tuple[str, ...]:
    """Phrases naming the task in open prompts ("their sex", "how old they are")."""
    _, text = resolve(task)
    return tuple(_fill(f, text) for f in FAMILIES[text["family"]]["fields"])


def _fill(template: str, text: dict, subject: str = "") -> str:
    return template.format(s=subject, m=text.get("m", ""), d=text.get("d", ""))


def _options(answers: Sequence[str]) -> dict[str, str]:
    """{or_} "lower, mean or higher", {comma} "lower, mean, higher", {slash} "lower/mean/higher"."""
    or_ = f"{', '.join(answers[:-1])} or {answers[-1]}"
    return {"or_": or_, "comma": ", ".join(answers), "slash": "/".join(answers)}


def _hints(text: dict, short: bool) -> tuple[str, ...]:
    answers = text.get("answers", ())
    if not answers:
        kind = "age" if text["family"] == "age" else "score"
        return (SHORT_NUMBER_HINTS if short else NUMBER_HINTS)[kind]
    return tuple(h.format(**_options(answers)) for h in (SHORT_HINTS if short else HINTS))


def answer_hint(task: str | TaskSpec) -> str:
    """The first answer hint the training paraphrases append to a question, e.g. "Answer with male or female."."""
    return _hints(resolve(task)[1], short=False)[0]


# ------------------------------------------------------------------------------------------ paraphrases
def paraphrases(task: str | TaskSpec, paradigm: str, limit: int | None = None) -> list[str]:
    """Distinct paraphrases of a task for one paradigm, in a fixed order.

    Parameters
    ----------
    task : registry task name or TaskSpec.
    paradigm : "single" (whole questions), "multi" (items for :func:`multi_frames`) or "open" (whole prompts).
    limit : keep a seeded random subset of this size (order kept), e.g. the paper's 200; None keeps all.

    Returns
    -------
    list of str, at least 200 distinct entries for every registry task and paradigm.
    """
    if paradigm not in PARADIGMS:
        raise FmrilmError(f"unknown paradigm {paradigm!r}; choose one of {', '.join(PARADIGMS)}")
    items = list(_paraphrases(resolve(task)[0].name, paradigm))
    if limit is not None and limit < len(items):
        keep = set(random.Random(f"{resolve(task)[0].name}:{paradigm}").sample(range(len(items)), limit))
        items = [p for i, p in enumerate(items) if i in keep]
    return items


@functools.lru_cache(maxsize=None)
def _paraphrases(name: str, paradigm: str) -> tuple[str, ...]:
    text = TASK_TEXT[name]
    family = FAMILIES[text["family"]]
    if paradigm == "single":
        parts = itertools.product(CONTEXTS, family["questions"], SUBJECTS, _hints(text, short=False))
        out = (_sentence(c, _fill(q, text, s)) + " " + h for c, q, s, h in parts)
    elif paradigm == "multi":
        parts = itertools.product(WRAPPERS, family["nouns"], SUBJECTS, _hints(text, short=True))
        out = (w.format(noun=_fill(n, text, s), hint=h, label=text["label"]) for w, n, s, h in parts)
    else:
        fields = [_fill(f, text) for f in family["fields"]]
        out = (frame.replace("{fields}", f) for frame in open_frames() for f in fields)
    return tuple(dict.fromkeys(out))  # distinct, first occurrence order


def _sentence(context: str, question: str) -> str:
    return context + question if context else question[0].upper() + question[1:]


def multi_frames() -> list[str]:
    """Frames of multi-question prompts with ``{items}`` (items joined by "; ") and ``{labels}`` placeholders."""
    return [f"{o} {{items}}. {f}" for o, f in itertools.product(MULTI_OPENERS, MULTI_FORMATS)]


def open_frames() -> list[str]:
    """Frames of open-ended prompts with a ``{fields}`` placeholder ("their sex and their age"); 360 of them."""
    parts = itertools.product(OPEN_VERBS, SUBJECTS, OPEN_SCOPES, OPEN_COVERS)
    return [f"{v} {s}{scope}, {c} {{fields}}." for v, s, scope, c in parts]


def split_paraphrases(items: Sequence[str], held_out_fraction: float = 0.2,
                      seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint (train, held_out) lists of distinct paraphrases; a seeded ``held_out_fraction`` is held out
    (at least one when the fraction is > 0), both in the input order."""
    unique = list(dict.fromkeys(items))
    if not 0 <= held_out_fraction < 1 or len(unique) < 2:
        raise FmrilmError(f"split_paraphrases needs >= 2 distinct paraphrases and held_out_fraction in [0, 1), "
                          f"got {len(unique)} and {held_out_fraction}")
    n_held = max(1, round(held_out_fraction * len(unique))) if held_out_fraction > 0 else 0
    held = set(random.Random(seed).sample(range(len(unique)), n_held))
    return ([p for i, p in enumerate(unique) if i not in held], [p for i, p in enumerate(unique) if i in held])


# --------------------------------------------------------------------------------------------- prompts
def build_prompt(question: str, dataset: object = None, semantic: str | None = None, *,
                 tasks: Iterable[str | TaskSpec] = (), seed: int = 0) -> str:
    """``"{cohort} {semantic}\\n### Question: {question}\\n### Answer:"``, without absent context parts.

    Parameters
    ----------
    question : the instruction.
    dataset : cohort name for :func:`cohort_text` (None or "": no cohort sentence).
    semantic : optional semantic description (written without its own cohort sentence).
    tasks : the example's target tasks; the cohort sentence never reveals them.
    seed : chooses the cohort sentence's wording.
    """
    cohort = cohort_text(dataset, tasks, seed) if dataset is not None and str(dataset).strip() else None
    context = " ".join(part.strip() for part in (cohort, semantic) if part and part.strip())
    return (context + "\n" if context else "") + f"### Question: {question}\n### Answer:"


def cohort_text(dataset: object, tasks: Iterable[str | TaskSpec] = (), seed: int = 0) -> str:
    """A cohort sentence revealing none of ``tasks``' targets.

    :func:`cohort_sentence` hides one task's target (age: no age range; diagnosis: no disorder words). With
    several targets we take the most restrictive task's sentence and keep it only if every other target's
    sentence starts with the same cohort name (the same seed gives the same template), i.e. that name was
    judged safe for each; otherwise the cohort is written as "a research dataset".
    """
    kinds = {_restriction(get_task(t)) for t in tasks} - {None}
    if not kinds:
        return cohort_sentence(dataset, seed)
    ordered = sorted(kinds, key=("age", "diagnosis", "sex").index)
    sentences = [cohort_sentence(dataset, seed, task=kind) for kind in ordered]
    name = sentences[0].rstrip(".")
    if all(s.startswith(name) and not s[len(name):len(name) + 1].isalnum() for s in sentences[1:]):
        return sentences[0]
    return cohort_sentence("custom", seed)  # a placeholder name: "a research dataset"


def _restriction(spec: TaskSpec) -> str | None:
    """The semantic-module task whose revealing words a cohort sentence must avoid for ``spec``."""
    if spec.column in ("sex", "age"):
        return spec.column
    return "diagnosis" if spec.column == "diagnosis" else None
