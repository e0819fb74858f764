"""Stage 3 training and evaluation examples: (prompt, answer) pairs of the three instruction paradigms.

* single question, single answer: :func:`single_example` ("... Answer with male or female." -> "female");
* multi question, multi answer: :func:`multi_example`, 2-3 targets asked in one random order and answered
  as "age group: older; sex: female" in another (so that the parser, not the order, tells them apart);
* open-ended: :func:`open_example`, a templated description stating every target ("This is a 63-year-old
  woman with higher fluid intelligence and no signs of Alzheimer's disease."), scored by
  :func:`fmrilm.instruct.answer.extract_fields`.

Rows are phenotype mappings (a dict or a pandas row) with the task columns and ``dataset``. Classes of cut
tasks (``*_level``, ``age_group``) depend on training-split cuts, so the row must carry them under the task
name (a class code from :func:`fmrilm.evaluate.protocol.targets` or a class word).

A semantic description (``with_semantic=True``) is written only when a target is a cognition or diagnosis
task, as in the paper, and leaves out the fields of EVERY target of the example (their union); the cohort
sentence is chosen to reveal none of them either (:func:`fmrilm.instruct.prompts.cohort_text`).

``rng`` is a :class:`random.Random` or a :class:`numpy.random.Generator`; the same seed gives the same example.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from fmrilm.descriptors.semantic import EXCLUDED_FIELDS, NOTHING, semantic_description
from fmrilm.errors import FmrilmError
from fmrilm.evaluate.protocol import TaskSpec
from fmrilm.instruct.answer import canonical_answer
from fmrilm.instruct.prompts import (
    ANSWER_PREFIX, TASK_TEXT, build_prompt, multi_frames, open_fields, open_frames, paraphrases, resolve, task_label,
)
from fmrilm.lm.objectives import f2t_example

SEMANTIC_COLUMNS = ("fluid_intelligence", "fluid_composite", "flanker", "diagnosis")
OPENERS = ("This is {who}", "The scan comes from {who}", "These data belong to {who}", "The data come from {who}")
GENERIC = ("This participant has {c}.", "The person scanned has {c}.", "This scan shows a participant with {c}.")
LEVEL_PHRASES = {"lower": ("lower {m}", "below-average {m}"), "mean": ("average {m}", "{m} near the mean"),
                 "higher": ("higher {m}", "above-average {m}")}
SCORE_PHRASES = ("a {m} score of {v}", "a {m} score of about {v}")
DIAGNOSIS_PHRASES = (("no signs of {d}", "no diagnosis of {d}"), ("a diagnosis of {d}", "signs of {d}"))


# -------------------------------------------------------------------------------------------- targets
def target_value(row: Mapping, task: str | TaskSpec) -> str | float | None:
    """The canonical answer of ``task`` for a row: a class word, a float (regression) or None (missing)."""
    spec, _ = resolve(task)
    return canonical_answer(spec, row.get(spec.name if spec.cuts else spec.column))


def answer_text(task: str | TaskSpec, value: str | float) -> str:
    """The answer as written: class words as they are, numbers with at most 2 decimals ("63", "97.5")."""
    spec, _ = resolve(task)
    return _number(value) if spec.kind == "regression" else str(value)


def _number(value: float) -> str:
    return f"{float(value):.2f}".rstrip("0").rstrip(".")


def _targets(row: Mapping, tasks: Iterable[str | TaskSpec]) -> tuple[list[TaskSpec], dict[str, object]]:
    """All requested tasks (distinct columns) and the values of those the row has, by task name."""
    specs = [resolve(t)[0] for t in tasks]
    if not specs:
        raise FmrilmError("an example needs at least one target task")
    columns = [s.column for s in specs]
    for i, spec in enumerate(specs):
        if spec.column in columns[:i]:
            raise FmrilmError(f"tasks {specs[columns.index(spec.column)].name} and {spec.name} both predict "
                              f"column {spec.column!r}; ask about it once per example")
    values = {s.name: v for s in specs if (v := target_value(row, s)) is not None}
    if not values:
        wanted = ", ".join(f"{s.name} (row[{(s.name if s.cuts else s.column)!r}])" for s in specs)
        hint = "; cut tasks carry their class from protocol.targets" if any(s.cuts for s in specs) else ""
        raise FmrilmError(f"the row has no usable value for {wanted}{hint}")
    return specs, values


# -------------------------------------------------------------------------------------------- examples
def single_example(row: Mapping, task: str | TaskSpec, rng, paraphrase_pool: Sequence[str] | None = None,
                   with_semantic: bool = False) -> tuple[str, str]:
    """One question about one target. ``paraphrase_pool``: questions to draw from (e.g. the training part of
    :func:`split_paraphrases`); all of ``paraphrases(task, "single")`` by default."""
    specs, values = _targets(row, [task])
    question = _choice(rng, _or_default(paraphrase_pool, paraphrases, specs[0], "single"))
    return _prompt(row, question, specs, rng, with_semantic), answer_text(specs[0], values[specs[0].name])


def multi_example(row: Mapping, tasks: Sequence[str | TaskSpec], rng,
                  pool: Mapping[str, Sequence[str]] | None = None, *, frames: Sequence[str] | None = None,
                  with_semantic: bool = False) -> tuple[str, str]:
    """Several targets in one question and one answer ("sex: female; age group: older").

    ``pool`` maps task names to multi items (default ``paraphrases(task, "multi")``), ``frames`` to
    :func:`multi_frames`. Targets the row lacks are left out; items and answers come in two random orders.
    """
    specs, values = _targets(row, tasks)
    asked = _shuffled(rng, [s for s in specs if s.name in values])
    items = [_choice(rng, _or_default((pool or {}).get(s.name), paraphrases, s, "multi")) for s in asked]
    labels = "; ".join(f"{task_label(s)}: ..." for s in asked)
    question = _choice(rng, _or_default(frames, multi_frames)).format(items="; ".join(items), labels=labels)
    answer = "; ".join(f"{task_label(s)}: {answer_text(s, values[s.name])}" for s in _shuffled(rng, asked))
    return _prompt(row, question, specs, rng, with_semantic), answer


def open_example(row: Mapping, tasks: Sequence[str | TaskSpec], rng, frames: Sequence[str] | None = None, *,
                 with_semantic: bool = False) -> tuple[str, str]:
    """A request for a free description covering the targets, answered by :func:`describe`.
    ``frames``: prompts with a ``{fields}`` placeholder (default :func:`open_frames`)."""
    specs, values = _targets(row, tasks)
    fields = _join([_choice(rng, open_fields(s)) for s in _shuffled(rng, [s for s in specs if s.name in values])])
    question = _choice(rng, _or_default(frames, open_frames)).replace("{fields}", fields)
    return _prompt(row, question, specs, rng, with_semantic), describe(values, rng)


def encode_example(tokenizer, prompt: str, answer: str, max_len: int) -> dict:
    """``text_ids`` / ``text_labels`` (L,) of one example, loss on the answer (and eos) only; the answer is
    tokenized as ``ANSWER_PREFIX + answer``, as constrained decoding scores it."""
    return f2t_example(tokenizer, ANSWER_PREFIX + answer, max_len, prompt=prompt)


# ----------------------------------------------------------------------------------------- prompt parts
def _prompt(row: Mapping, question: str, specs: list[TaskSpec], rng, with_semantic: bool) -> str:
    seed = _below(rng, 2**31)
    semantic = semantic_text(row, specs, seed) if with_semantic else None
    return build_prompt(question, row.get("dataset"), semantic, tasks=specs, seed=seed)


def semantic_text(row: Mapping, tasks: Iterable[str | TaskSpec], seed: int = 0) -> str | None:
    """The semantic description for an example with these targets, without any of their fields (nor the
    cohort: :func:`build_prompt` writes it); None when no target is a cognition or diagnosis task or
    nothing is left to say."""
    specs = [resolve(t)[0] for t in tasks]
    if not any(s.column in SEMANTIC_COLUMNS for s in specs):
        return None
    excluded = set().union(*(EXCLUDED_FIELDS.get(s.column, set()) | {s.column, s.name} for s in specs))
    text = semantic_description(row, None, seed, cohort_sentence=False, derived_from=excluded)
    return None if text == NOTHING else text


def describe(values: Mapping[str, object], rng) -> str:
    """One sentence stating every field, e.g. "This is a 63-year-old woman with higher fluid intelligence and
    no signs of Alzheimer's disease." ``values``: canonical answers by task name (see :func:`target_value`)."""
    by_column = {resolve(t)[0].column: (resolve(t)[0], v) for t, v in values.items() if v is not None}
    sex = by_column.pop("sex", (None, None))[1]
    age_spec, age = by_column.pop("age", (None, None))
    years = age if age_spec is not None and age_spec.kind == "regression" else None
    words = [f"{_number(years)}-year-old"] if years is not None else [age] if age is not None else []
    if sex is not None:
        adult = years is None or years >= 18
        noun = ("woman" if adult else "girl") if sex == "female" else ("man" if adult else "boy")
        words.append(noun if years is not None else f"{sex} participant")
    clauses = [_clause(spec, value, rng) for spec, value in by_column.values()]
    if not words:
        return _choice(rng, GENERIC).format(c=_join(clauses))
    who = _article(" ".join(words + ([] if sex is not None else ["participant"])))
    return _choice(rng, OPENERS).format(who=who) + (f" with {_join(clauses)}" if clauses else "") + "."


def _clause(spec: TaskSpec, value: object, rng) -> str:
    text = TASK_TEXT[spec.name]
    if text["family"] == "level":
        return _choice(rng, LEVEL_PHRASES[value]).format(m=text["m"])
    if text["family"] == "score":
        return _choice(rng, SCORE_PHRASES).format(m=text["m"], v=_number(value))
    positive = text["answers"].index(value) == 1
    return _choice(rng, DIAGNOSIS_PHRASES[positive]).format(d=text["d"])


def _article(phrase: str) -> str:
    """'a' or 'an' by sound: vowels, and numbers read 8..., 11..., 18... ("an 18-year-old")."""
    return ("an " if re.match(r"(?:8|1[18](?:\D|$)|[aeiou])", phrase, re.I) else "a ") + phrase


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------------------------------------ rng
def _below(rng, n: int) -> int:
    """A random int in [0, n) from a random.Random or a numpy Generator."""
    return int(rng.integers(n)) if hasattr(rng, "integers") else rng.randrange(n)


def _or_default(pool: Sequence[str] | None, default, *args) -> Sequence[str]:
    """``pool``, or ``default(*args)`` when it is None; an EMPTY pool is an error (falling back to every
    paraphrase would train on held-out ones)."""
    return default(*args) if pool is None else pool


def _choice(rng, items: Sequence[str]) -> str:
    if len(items) == 0:
        raise FmrilmError("cannot draw from an empty paraphrase pool (or frame list); pass None for the defaults")
    return items[_below(rng, len(items))]


def _shuffled(rng, items: list) -> list:
    items = list(items)
    for i in range(len(items) - 1, 0, -1):  # Fisher-Yates with _below, so both rng kinds work
        j = _below(rng, i + 1)
        items[i], items[j] = items[j], items[i]
    return items
