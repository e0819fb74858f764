"""One evaluation run of a Stage 3 model: prompts, model calls and the scoring of each paradigm.

:func:`evaluate_single` and :func:`evaluate_generated` take a :class:`Run` (a model and the split it is tested
on) and return ``({task: {metric: value}}, [prediction records])``; :mod:`fmrilm.instruct.evaluate` aggregates
runs into result rows. See that module's docstring for what each paradigm measures.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from fmrilm.errors import FmrilmError
from fmrilm.evaluate.metrics import accuracy, balanced_accuracy, classification_metrics, f1, regression_metrics
from fmrilm.evaluate.protocol import TASKS, Split, TaskSpec, targets
from fmrilm.instruct.answer import (
    class_log_probabilities, encode_prompt, extract_fields, parse_multi, score_open, sentence_similarity,
)
from fmrilm.instruct.calibration import MAX_SCANS, Calibration, TaskCalibration, apply_bias, task_calibration
from fmrilm.instruct.data import FRAMES, paraphrase_pools, question_task
from fmrilm.instruct.paradigms import describe, multi_example, open_example, single_example, target_value
from fmrilm.instruct.pipeline import HELD_OUT_FRACTION
from fmrilm.instruct.probe import LinearProbe
from fmrilm.instruct.prompts import answer_words
from fmrilm.lm.objectives import pad_right

TOKENS_PER_TASK = {"multi": 12, "open": 24}  # generation budget: per task asked, plus 8
UNCALIBRATED = "uncalibrated"  # key of a calibrated task's raw metrics in evaluate_single's results


def held_out_pool(info: dict, task: TaskSpec | None, paradigm: str) -> list[str]:
    """Held-out paraphrases of a question task (``task=None``: the frames of multi / open prompts): those in
    ``instruct.json``, else the held-out part that :func:`paraphrase_pools` gives with the model's fraction."""
    key = FRAMES if task is None else task.name
    recorded = info.get("held_out_paraphrases", {}).get(paradigm, {})
    if key in recorded:
        return list(recorded[key])
    fraction = info.get("held_out_fraction", HELD_OUT_FRACTION)
    return paraphrase_pools([task or TASKS["sex"]], [paradigm], fraction)[1][paradigm][key]


@dataclass
class Run:
    """One model on one split: one value per metric, later aggregated over runs."""

    model: object  # load_model's result: .model, .tokenizer, .info, .directory
    split: Split
    trained: bool  # the model was trained on this cohort (the split is its recorded one)
    cuts: dict = field(default_factory=dict)  # recorded ordinal cuts by task name
    train_scans: tuple[int, ...] | None = None  # scans the model was trained on (few-shot: k), else split.train
    base_cohort: bool = False  # the base model (before any k-shot fine-tuning) was trained on this cohort
    base_columns: frozenset = frozenset()  # phenotype columns the base model was trained on
    shots: int | None = None  # k of a k-shot fine-tuned model, None otherwise

    @property
    def fit_scans(self) -> tuple[int, ...]:
        """Labelled scans the probe may be fitted on: those the model trained on, else the training part."""
        return self.split.train if self.train_scans is None else self.train_scans

    @property
    def model_label(self) -> str:
        """The model as reported: its directory, or for a k-shot model its source and k."""
        return f"{self.model.info['source_model']} ({self.shots}-shot)" if self.shots else str(self.model.directory)

    @property
    def seed(self) -> int:
        return self.split.seed


def _single_tasks(specs: list[TaskSpec]) -> list[TaskSpec]:
    """Requested tasks plus the ordinal-bin task of each regression task."""
    out = []
    for spec in specs:
        out += [question_task(spec), spec] if spec.kind == "regression" else [spec]
    return list(dict.fromkeys(out))


def _labels(run: Run, table: pd.DataFrame, spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """Targets (S,) and availability (S,) of a task; cut tasks use the run's recorded cuts or its training part."""
    if spec.cuts and spec.name in run.cuts:
        values = pd.to_numeric(table[spec.column], errors="coerce").to_numpy(np.float64)
        mask = np.isfinite(values)
        return np.where(mask, np.searchsorted(np.asarray(run.cuts[spec.name]), values, side="right"), -1), mask
    return targets(table, spec, train=list(run.split.train))


def _scan_rows(table: pd.DataFrame, labels: dict) -> list[dict]:
    """Phenotype rows with each cut task's class code under the task's name (what the paradigms read); missing
    values are None, as in training rows."""
    frame = table.copy()
    for name, (y, _) in labels.items():
        if TASKS[name].cuts:
            frame[name] = y
    return frame.astype(object).where(frame.notna(), None).to_dict("records")


# ------------------------------------------------------------------------------------------------ model calls
def _encoded(run: Run, opened, indices: Sequence[int], batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(scan indices, tokenizer features (B, W, N, h)) batch by batch, in increasing scan order."""
    indices = sorted(int(i) for i in indices)
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        with torch.no_grad():
            _, features = run.model.tokenizer.encode(torch.from_numpy(np.asarray(opened.timeseries[chunk])))
        yield chunk, features


def last_prompt_states(model, features: torch.Tensor, prompts: Sequence[str]) -> np.ndarray:
    """LLM hidden states (B, d) of the last prompt token after each scan's block ("### Answer:")."""
    ids = [encode_prompt(model.tokenizer, p) for p in prompts]
    attention = pad_right([[1] * len(r) for r in ids], 0)
    was_training = model.training
    with torch.no_grad():
        inputs = model.eval().build_inputs(features, pad_right(ids, model.tokenizer.pad_token_id), attention)
        hidden, _ = model._run(inputs)  # (B, S, d)
    model.train(was_training)
    last = inputs["text_slice"].start + torch.tensor([len(r) for r in ids]) - 1
    return hidden[torch.arange(len(ids)), last].float().numpy()


def generate_answers(model, features: torch.Tensor, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers (KV cache) to one prompt per scan, decoded without special tokens."""
    ids = [encode_prompt(model.tokenizer, p) for p in prompts]
    tokens = model.eval().generate(features, pad_right(ids, model.tokenizer.pad_token_id),
                                   pad_right([[1] * len(r) for r in ids], 0), max_new_tokens=max_new_tokens)
    return [t.strip() for t in model.tokenizer.batch_decode(tokens, skip_special_tokens=True)]


def _rng(run: Run, paradigm: str, task: str, scan_id: str) -> random.Random:
    return random.Random(f"{run.seed}:{paradigm}:{task}:{scan_id}")  # one prompt per scan, whatever the batch


def _record(run: Run, paradigm: str, task: str, row: dict, index: int, **values) -> dict:
    return {"model": run.model_label, "seed": run.seed, "shots": run.shots, "paradigm": paradigm, "task": task,
            "scan_index": index, "scan_id": str(row["scan_id"]), "subject_id": str(row["subject_id"]), **values}


# ------------------------------------------------------------------------------------------------ paradigms
def evaluate_single(run: Run, opened, table: pd.DataFrame, specs: list[TaskSpec], batch_size: int,
                    calibration: Calibration | None = None):
    """Constrained class probabilities per class task, a linear probe per regression task. The probe reads the
    state after the question the model was trained to answer: its ordinal-bin question (same held-out prompt).
    A task in ``calibration`` is decided on its calibrated probabilities; its metrics then carry the raw ones
    under ``"uncalibrated"``."""
    specs = _single_tasks(specs)
    labels = {s.name: _labels(run, table, s) for s in specs}
    rows, test = _scan_rows(table, labels), set(run.split.test)
    prompts = {}
    for spec in specs:
        scans = run.split.test if spec.kind != "regression" else sorted({*run.fit_scans, *run.split.test})
        prompts[spec.name] = {i: _single_prompt(run, rows[i], question_task(spec)) for i in scans
                              if labels[spec.name][1][i]}
    outputs = _outputs(run, opened, specs, prompts, batch_size)
    results, records = {}, []
    for spec in (s for s in specs if test & set(outputs[s.name])):  # a task no test scan has is not scored
        if spec.kind == "regression":
            results[spec.name], recs = _probe(spec, labels[spec.name][0], outputs[spec.name], test)
        else:
            entry = calibration.get(spec.name) if calibration is not None else None
            results[spec.name], recs = _classes(spec, labels[spec.name][0], outputs[spec.name], entry)
        records += [_record(run, "single", spec.name, rows[i], i, prompt=prompts[spec.name][i], **r)
                    for i, r in recs.items()]
    return results, records


def _outputs(run: Run, opened, specs: list[TaskSpec], prompts: dict, batch_size: int) -> dict[str, dict]:
    """``{task: {scan index: head output}}`` of the scans in ``prompts[task]`` (:func:`_head`)."""
    outputs: dict[str, dict[int, np.ndarray]] = {s.name: {} for s in specs}
    for chunk, features in _encoded(run, opened, set().union(*prompts.values()), batch_size):
        for spec in specs:
            sel = [j for j, i in enumerate(chunk) if i in prompts[spec.name]]
            if sel:
                texts = [prompts[spec.name][chunk[j]] for j in sel]
                outputs[spec.name].update(zip([chunk[j] for j in sel], _head(run, spec, features[sel], texts)))
    return outputs


def _single_prompt(run: Run, row: dict, spec: TaskSpec, pool: list[str] | None = None, key: str = "single") -> str:
    rng = _rng(run, key, spec.name, row["scan_id"])
    return single_example(row, spec, rng, pool or held_out_pool(run.model.info, spec, "single"))[0]


def _head(run: Run, spec: TaskSpec, features: torch.Tensor, prompts: list[str]) -> np.ndarray:
    """(B, d) last-prompt states for a regression task, (B, C) class log-probabilities otherwise."""
    if spec.kind == "regression":
        return last_prompt_states(run.model.model, features, prompts)
    return class_log_probabilities(run.model.model, features, prompts, spec).numpy()


def _classes(spec: TaskSpec, y: np.ndarray, log_probs: dict, calibration: TaskCalibration | None):
    """Metrics and records of the constrained answers of the test scans (``log_probs``: test scans only),
    decided on the calibrated probabilities when ``calibration`` is given."""
    index = sorted(log_probs)
    scores = np.stack([log_probs[i] for i in index])  # (n, C)
    raw = apply_bias(scores, None)
    proba = raw if calibration is None else calibration.apply(scores)
    pred = proba.argmax(1)
    metrics = classification_metrics(y[index], pred, proba)
    if calibration is not None:
        metrics[UNCALIBRATED] = classification_metrics(y[index], raw.argmax(1), raw)
    words = answer_words(spec)
    return metrics, {i: {"head": "constrained", "y_true": int(y[i]), "y_pred": int(p), "answer": words[p],
                         "proba": [float(v) for v in q], "calibrated": calibration is not None,
                         "proba_uncalibrated": [float(v) for v in r]} for i, p, q, r in zip(index, pred, proba, raw)}


def fit_calibration(run: Run, opened, table: pd.DataFrame, specs: list[TaskSpec], batch_size: int,
                    method: str = "bias", max_scans: int = MAX_SCANS) -> Calibration:
    """Class-prior calibration of the run's model on its training side (:mod:`fmrilm.instruct.calibration`).

    Each class question task (a regression task: its bins) is asked, with a TRAINING paraphrase, of at most
    ``max_scans`` of the scans the model was trained on (a k-shot model: its k shots; a seeded subset), never a
    test scan; the per-class bias is fitted on their answer log-probabilities and labels.
    """
    tasks = [t for t in dict.fromkeys(question_task(s) for s in specs) if t.kind != "regression"]
    labels = {s.name: _labels(run, table, s) for s in tasks}
    rows, scans = _scan_rows(table, labels), calibration_scans(run, max_scans)
    pools = paraphrase_pools(tasks, ["single"], run.model.info.get("held_out_fraction", HELD_OUT_FRACTION))[0]
    prompts = {s.name: {i: _single_prompt(run, rows[i], s, pools["single"][s.name], "calibration") for i in scans
                        if labels[s.name][1][i]} for s in tasks}
    outputs = _outputs(run, opened, tasks, prompts, batch_size)
    fitted = {}
    for spec in (s for s in tasks if outputs[s.name]):
        index = sorted(outputs[spec.name])
        fitted[spec.name] = task_calibration(answer_words(spec), np.stack([outputs[spec.name][i] for i in index]),
                                             labels[spec.name][0][index], method, cohort=str(opened.path),
                                             scans=index)
    return Calibration(method, fitted)


def calibration_scans(run: Run, max_scans: int = MAX_SCANS) -> list[int]:
    """Scans that may calibrate a run: its fit scans (never a test scan), a seeded subset of ``max_scans``."""
    test = set(run.split.test)
    scans = sorted(int(i) for i in run.fit_scans if int(i) not in test)
    if len(scans) > max_scans:
        scans = sorted(random.Random(f"{run.seed}:calibration").sample(scans, max_scans))
    return scans


def _probe(spec: TaskSpec, y: np.ndarray, states: dict, test: set):
    """A linear probe fitted on the states of the non-test scans, scored on the test scans."""
    train = [i for i in sorted(states) if i not in test]
    index = [i for i in sorted(states) if i in test]
    if len(train) < 3:
        raise FmrilmError(f"task {spec.name}: {len(train)} labelled training scans; the linear probe needs >= 3")
    probe = LinearProbe(next(iter(states.values())).shape[0]).fit(np.stack([states[i] for i in train]), y[train])
    pred = probe.predict(np.stack([states[i] for i in index]))
    return regression_metrics(y[index], pred), {i: {"head": "probe", "y_true": float(y[i]), "y_pred": float(p),
                                                    "probe_alpha": probe.alpha_} for i, p in zip(index, pred)}


def evaluate_generated(run: Run, opened, table: pd.DataFrame, specs: list[TaskSpec], batch_size: int,
                        paradigm: str):
    """Multi or open: one prompt per test scan about every task it has a target for, answered by generation."""
    labels = {s.name: _labels(run, table, s) for s in specs}
    rows = _scan_rows(table, labels)
    test = [i for i in run.split.test if any(m[i] for _, m in labels.values())]
    prompts, answers = {i: _generated_prompt(run, rows[i], specs, paradigm) for i in test}, {}
    budget = 8 + TOKENS_PER_TASK[paradigm] * len(specs)
    for chunk, features in _encoded(run, opened, test, batch_size):
        answers.update(zip(chunk, generate_answers(run.model.model, features, [prompts[i] for i in chunk], budget)))
    score = _score_multi if paradigm == "multi" else _score_open
    return score(run, rows, labels, specs, prompts, answers)


def _generated_prompt(run: Run, row: dict, specs: list[TaskSpec], paradigm: str) -> str:
    rng, info = _rng(run, paradigm, "+".join(s.name for s in specs), row["scan_id"]), run.model.info
    if paradigm == "multi":
        pool = {s.name: held_out_pool(info, s, "multi") for s in specs}
        return multi_example(row, specs, rng, pool, frames=held_out_pool(info, None, "multi"))[0]
    return open_example(row, specs, rng, frames=held_out_pool(info, None, "open"))[0]


def _score_multi(run: Run, rows: list[dict], labels: dict, specs: list[TaskSpec], prompts: dict, answers: dict):
    """Per task accuracy, balanced accuracy, F1 and parse rate of the parsed "label: answer" pairs."""
    parsed = {i: parse_multi(text, specs) for i, text in answers.items()}
    results, records = {}, []
    for spec in specs:
        y, mask = labels[spec.name]
        index = [i for i in sorted(answers) if mask[i]]
        if not index:
            continue
        guesses = [parsed[i][spec.name] for i in index]
        words = answer_words(spec)  # multi asks question tasks: always classes
        pred = np.array([-1 if g is None else words.index(g) for g in guesses], np.int64)
        truth = y[index]
        metrics = {"accuracy": accuracy(truth, pred), "balanced_accuracy": balanced_accuracy(truth, pred),
                   "f1": f1(truth, pred, binary=len(words) == 2)}
        results[spec.name] = {**metrics, "parse_rate": float(np.mean([g is not None for g in guesses]))}
        records += [_record(run, "multi", spec.name, rows[i], i, head="generate", y_true=_plain(y[i]),
                            y_pred=_plain(p), parsed=g is not None, prompt=prompts[i], answer=answers[i])
                    for i, p, g in zip(index, pred, guesses)]
    return results, records


def _score_open(run: Run, rows: list[dict], labels: dict, specs: list[TaskSpec], prompts: dict, answers: dict):
    """Per field and overall accuracy of the extracted fields; mean similarity to the reference when available."""
    scores, records, similarity = {}, [], []
    for i, text in sorted(answers.items()):
        truth = {s.name: target_value(rows[i], s) for s in specs}
        fields = extract_fields(text, specs)
        marks = score_open(fields, truth)
        reference = describe({k: v for k, v in truth.items() if v is not None}, _rng(run, "open", "reference", rows[i]["scan_id"]))
        sim = sentence_similarity(text, reference)
        if sim is not None:
            similarity.append(sim)
        for name, right in marks.items():
            scores.setdefault(name, []).append(right)
            records.append(_record(run, "open", name, rows[i], i, head="generate", correct=bool(right),
                                   y_true=_plain(truth.get(name)), y_pred=_plain(fields.get(name)),
                                   prompt=prompts[i], answer=text, reference=reference))
    results = {name: {"accuracy": float(np.mean(v))} for name, v in scores.items()}
    if similarity:
        results.setdefault("overall", {})["similarity"] = float(np.mean(similarity))
    return results, records


def _plain(value):
    """A JSON-ready scalar (numpy numbers as Python ones; NaN as None)."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    return None if isinstance(value, float) and not np.isfinite(value) else value
