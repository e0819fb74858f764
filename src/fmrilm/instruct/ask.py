"""``fmrilm ask``: answer one question about the person behind one scan, with the answer's probability.

``ask(model, scan, "Is this subject male or female?")`` reads the scan (any file ``prepare`` accepts,
standardized with the cohort's saved statistics by :func:`fmrilm.lm.pipeline.read_scan`), encodes it with the
model's frozen Stage 1 tokenizer, and answers in four steps:

1. **Task.** ``task=`` wins; otherwise :func:`match_task` maps the question to a registry task (below).
2. **Classes.** A classification task is answered over its own classes; a regression task over its ordinal
   bins (:func:`answer_task`: age -> ``age_group``, ``flanker`` -> ``flanker_level``...), as Stage 3 trains them.
3. **Prompt.** The training format of :func:`fmrilm.instruct.prompts.build_prompt`: the cohort sentence (hiding
   the target), then ``### Question: {question}\\n### Answer:``. Training questions always end with a hint
   naming the allowed answers ("Answer with male or female."); a question that does not name all of them gets
   that hint appended.
4. **Answer.** Constrained scoring over the allowed answers
   (:func:`fmrilm.instruct.answer.class_log_probabilities`): the answer is the most probable class and its
   probability the softmax over the classes' whole-answer log-probabilities, after subtracting the model's
   class-prior bias of that task (``calibration.json``, fitted on training scans at the end of ``fmrilm instruct``,
   :mod:`fmrilm.instruct.calibration`) when it has one and ``calibrate`` is left on (``--no-calibration``).

Matching a question to a task
-----------------------------
Deterministic token overlap with the paraphrase bank. A task's vocabulary is the words of its
single-question paraphrases (:func:`paraphrases`), its answer words, label, label synonyms and open-ended
field phrases. A word weighs ``log(T / df)``, df the number of the T registry tasks whose vocabulary holds
it, so words of every task ("what", "the", "participant", "scan") weigh 0 and "male" or "ADHD" the most.
A task's score is the summed weight of the question's distinct words in its vocabulary; a few user words
are mapped to the bank's first (:data:`SYNONYMS`: "woman" -> female, "dementia" -> Alzheimer...).
The registry tasks scoring within :data:`MARGIN` of the best are the candidates; tasks answered by the same
classes (``age`` and ``age_group``) count as one. The question is refused - one line listing the tasks - when
the best score is below :data:`MIN_SCORE` (the weight of one word shared by three tasks), when
the candidates the model knows are answered by different classes (ambiguous: "What is the diagnosis?"
with three diagnosis tasks), or when the model knows none of them. With ``generate=True`` (``--generate``)
an unmatched question is answered by free generation instead, and the answer says so (no probability).

The model is an ``fmrilm instruct`` output (loaded with :class:`fmrilm.instruct.pipeline.InstructedModel`):
the ``tasks`` of its ``instruct.json`` are the tasks it answers and its first cohort's ``name`` the cohort of
the prompt. An ``fmrilm align`` output (:class:`fmrilm.lm.pipeline.AlignedModel`, no ``instruct.json``) is
accepted too: every registry task is allowed, no cohort sentence is written and a warning says that the
model is not instruction-tuned.
"""

from __future__ import annotations

import functools
import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fmrilm.errors import FmrilmError, FmrilmWarning
from fmrilm.evaluate.protocol import TaskSpec
from fmrilm.instruct.answer import class_log_probabilities, encode_prompt
from fmrilm.instruct.calibration import Calibration, apply_bias
from fmrilm.instruct.data import question_task
from fmrilm.instruct.prompts import (
    TASK_TEXT, answer_hint, answer_words, build_prompt, label_aliases, open_fields, paraphrases, resolve,
)

MIN_SCORE = math.log(len(TASK_TEXT) / 3)  # what one word shared by three tasks weighs ("diagnosis")
MARGIN = 0.5  # score gap under which two tasks are equally likely (a generic word weighs ~0.4)
MAX_NEW_TOKENS = 48  # budget of a free-text answer
# user words -> the bank's words (the bank never says "woman", "dementia" or "IQ")
SYNONYMS = {"man": "male", "men": "male", "boy": "male", "woman": "female", "women": "female", "girl": "female",
            "gender": "sex", "young": "younger", "elderly": "older", "aged": "age", "alzheimers": "alzheimer",
            "dementia": "alzheimer", "autistic": "autism", "asd": "autism", "iq": "intelligence", "low": "lower",
            "average": "mean", "hyperactivity": "adhd", "diagnosed": "diagnosis"}


@dataclass(frozen=True)
class Answer:
    """One answer of :func:`ask`; ``str(answer)`` is the CLI line ("female (p = 0.83)")."""

    task: str | None  # the task whose classes were scored; None for a free-text answer
    answer: str  # the most probable class word, or the generated text
    probability: float | None  # probability of ``answer`` among the allowed answers; None when generated
    probabilities: dict[str, float] = field(default_factory=dict)  # every allowed answer, class-code order
    matched: str | None = None  # the registry task the question was matched to (a regression task: its bins)
    prompt: str = ""  # what the model read after the fMRI block
    method: str = "scored"  # "scored" (constrained over the allowed answers) or "generated"
    calibrated: bool = False  # probabilities corrected by the model's class-prior calibration of the task

    def __str__(self) -> str:
        if self.method == "generated":
            return f"{self.answer} (free generation: no task matched the question)"
        return f"{self.answer} (p = {self.probability:.2f})"

    def to_dict(self) -> dict:
        """JSON-ready fields."""
        return asdict(self)


# ------------------------------------------------------------------------------------------ matching
def answer_task(task: str | TaskSpec) -> str:
    """The task whose classes answer ``task``: itself for a classification task, its ordinal bins (the registry
    task cutting the same column) for a regression task - the question task Stage 3 trains."""
    return question_task(resolve(task)[0]).name


def words(text: str) -> list[str]:
    """Lower-case words of ``text`` without possessive 's, with :data:`SYNONYMS` applied."""
    text = re.sub(r"['\u2019]s\b", "", text.lower())
    return [SYNONYMS.get(w, w) for w in re.findall(r"[a-z0-9]+", text)]


@functools.lru_cache(maxsize=None)
def vocabulary(task: str) -> frozenset[str]:
    """The words a question about ``task`` may use (module docstring)."""
    texts = [*paraphrases(task, "single"), *answer_words(task), *label_aliases(task), *open_fields(task)]
    return frozenset(w for t in texts for w in words(t))


@functools.lru_cache(maxsize=None)
def _weights() -> dict[str, float]:
    """log(T / df) of every vocabulary word over the T registry tasks with templates."""
    counts: dict[str, int] = {}
    for task in TASK_TEXT:
        for w in vocabulary(task):
            counts[w] = counts.get(w, 0) + 1
    return {w: math.log(len(TASK_TEXT) / n) for w, n in counts.items()}


def task_scores(question: str) -> dict[str, float]:
    """Score of every registry task for ``question`` (summed weight of its distinct words in the task's
    vocabulary), in registry order."""
    asked, weight = set(words(question)), _weights()
    return {task: sum(weight[w] for w in asked & vocabulary(task)) for task in TASK_TEXT}


def match_task(question: str, tasks: list[str] | tuple[str, ...] | None = None) -> str:
    """The registry task a question is about, among the model's ``tasks`` (default: every registry task).

    Returns
    -------
    str
        The best-scoring task (a regression task is answered by :func:`answer_task`).

    Raises
    ------
    FmrilmError
        No task matches with confidence, the question is ambiguous, or it is about a task not in ``tasks``.
    """
    known = list(TASK_TEXT) if tasks is None else [resolve(t)[0].name for t in tasks]
    scores = task_scores(question)
    best = max(scores.values())
    listed = ", ".join(known)
    if best < MIN_SCORE:
        raise FmrilmError(f"the question {question!r} matches no task; name one with --task ({listed}) or pass "
                          "--generate for a free-text answer")
    near = [t for t, s in scores.items() if s >= best - MARGIN]
    served = {answer_task(t) for t in known}
    usable = [t for t in near if answer_task(t) in served]
    if not usable:
        raise FmrilmError(f"the question {question!r} is about {' or '.join(near)}, which this model was not "
                          f"trained for; its tasks: {listed}")
    if len({answer_task(t) for t in usable}) > 1:
        raise FmrilmError(f"the question {question!r} could be about {' or '.join(usable)}; name one with --task")
    return max(usable, key=lambda t: scores[t])  # the first of equal scores (registry order)


# ------------------------------------------------------------------------------------------ prompts
def question_with_hint(question: str, task: str) -> str:
    """``question`` followed by the training hint naming ``task``'s answers, unless it names all of them."""
    said = question.lower()
    if all(w.lower() in said for w in answer_words(task)):
        return question.strip()
    return f"{question.strip()} {answer_hint(task)}"


def model_info(loaded) -> dict:
    """``instruct.json`` of a loaded model (its ``info``: an InstructedModel), or {} (an align output)."""
    return dict(getattr(loaded, "info", None) or {})


def _cohort_name(info: dict) -> str | None:
    cohorts = info.get("cohorts") or []
    return cohorts[0].get("name") if cohorts and isinstance(cohorts[0], dict) else None


# ------------------------------------------------------------------------------------------ ask
def ask(model_dir, scan_file: str | os.PathLike, question: str, *, task: str | None = None,
        tr: float | None = None, site: str | None = None, mat_key: str | None = None, transpose: bool = False,
        dataset: str | None = None, generate: bool = False, seed: int = 0, calibrate: bool = True) -> Answer:
    """Answer one question about one scan (module docstring).

    Parameters
    ----------
    model_dir
        An ``fmrilm instruct`` or ``fmrilm align`` output directory, or a model already loaded from one
        (:class:`~fmrilm.instruct.pipeline.InstructedModel` or :class:`~fmrilm.lm.pipeline.AlignedModel`).
    scan_file
        One scan in any format prepare accepts: ROI time series (T, N) or, with ``transpose``, (N, T), or a 4D
        NIfTI parcellated with the cohort's atlas (see :func:`fmrilm.lm.pipeline.read_scan`).
    question
        The question in English ("Is this subject male or female?").
    task
        Registry task to answer (skips matching; must be one the model was trained for when it says so).
    tr, site, mat_key, transpose
        Native TR in seconds (required unless a NIfTI header gives it), acquisition site, MATLAB variable
        name, whether time runs along columns.
    dataset
        Cohort name of the prompt's cohort sentence; default the model's first training cohort.
    generate
        Answer an unmatched question by free (greedy) generation instead of refusing it.
    seed
        Chooses the cohort sentence's wording.
    calibrate
        Correct the class probabilities with the model's stored class-prior calibration of the task, when it has
        one (``Answer.calibrated`` says whether it did); False: the raw probabilities.

    Returns
    -------
    Answer
    """
    loaded = _load(model_dir)
    info = model_info(loaded)
    tasks = info.get("tasks") or None
    dataset = dataset if dataset is not None else _cohort_name(info)
    matched = _resolve_task(question, task, tasks, generate)
    features = _features(loaded, scan_file, tr=tr, site=site, mat_key=mat_key, transpose=transpose)  # (1, W, N, h)
    if matched is None:
        return _generated(loaded.model, features, build_prompt(question.strip(), dataset, seed=seed))
    target = answer_task(matched)
    prompt = build_prompt(question_with_hint(question, target), dataset, tasks=[matched], seed=seed)
    logp = class_log_probabilities(loaded.model, features, prompt, target).numpy()  # (1, C)
    entry = _calibration(loaded, target) if calibrate else None
    probs = apply_bias(logp, None if entry is None else entry.bias)[0].tolist()
    table = dict(zip(answer_words(target), probs))
    best = max(table, key=table.get)
    return Answer(target, best, table[best], table, matched, prompt, calibrated=entry is not None)


def _calibration(loaded, task: str):
    """The model's stored calibration of ``task`` (a TaskCalibration), or None."""
    directory = getattr(loaded, "directory", None)
    calibration = Calibration.load(directory) if directory is not None else None
    return None if calibration is None else calibration.get(task)


def _load(model_dir):
    """A loaded model as is; an instruct output as an InstructedModel; an align output with a warning."""
    if hasattr(model_dir, "model") and hasattr(model_dir, "preprocess"):
        return model_dir
    from fmrilm.instruct.pipeline import INFO_FILE, InstructedModel
    from fmrilm.lm.pipeline import AlignedModel

    if (Path(model_dir) / INFO_FILE).is_file():
        return InstructedModel(model_dir)
    loaded = AlignedModel(model_dir)
    warnings.warn(f"{model_dir} has no {INFO_FILE}: it is not instruction-tuned ('fmrilm instruct'), so its "
                  "answers are untrained guesses", FmrilmWarning, stacklevel=3)
    return loaded


def _resolve_task(question: str, task: str | None, tasks: list[str] | None, generate: bool) -> str | None:
    """The task to answer: ``task`` (checked against the model's), the matched one, or None to generate."""
    if not question or not question.strip():
        raise FmrilmError("the question is empty; ask e.g. \"Is this subject male or female?\"")
    if task is not None:
        name = resolve(task)[0].name
        if tasks is not None and answer_task(name) not in {answer_task(t) for t in tasks}:
            raise FmrilmError(f"task {name!r} is not one this model was trained for; its tasks: {', '.join(tasks)}")
        return name
    try:
        return match_task(question, tasks)
    except FmrilmError:
        if generate:
            return None
        raise


def _features(loaded, scan_file, **read) -> torch.Tensor:
    """(1, W, N, h) tokenizer encoder features of one standardized scan."""
    from fmrilm.lm.pipeline import read_scan

    scan = read_scan(scan_file, loaded.preprocess, **read)  # (T, N)
    with torch.no_grad():
        return loaded.tokenizer.encode(torch.from_numpy(scan[None]))[1]


def _generated(model, features: torch.Tensor, prompt: str) -> Answer:
    ids = torch.tensor([encode_prompt(model.tokenizer, prompt)])
    model.eval()
    new = model.generate(features, ids, torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS)[0]
    text = model.tokenizer.decode(new, skip_special_tokens=True).strip()
    return Answer(None, text, None, {}, None, prompt, "generated")
