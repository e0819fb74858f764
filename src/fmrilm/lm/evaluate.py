"""Held-out quality of a Stage 2 (aligned) fMRI-LM: F2F, F2T and T2T metrics with their baselines.

Metrics of :func:`evaluate_alignment` (written by ``fmrilm align`` to ``LM/eval.json``):

``f2f_accuracy``
    Top-1 accuracy of the code head predicting the tokenizer code of step w+1 of every ROI from the block up
    to step w, over all held-out scans, ROIs and steps 0..W-2 (teacher forced, one pass per batch).
``f2f_copy_last_accuracy``
    The same targets predicted by copying step w's code of the same ROI.
``f2f_majority_accuracy``
    The same targets predicted by the most frequent code of that ROI over every step of the training scans
    (per ROI, because ROIs differ in their code use; ties go to the smallest code).
``f2t_loss``
    Teacher-forced cross-entropy of the held-out reference descriptions after their scans (nats per token).
``f2t_field_accuracy``
    Greedy descriptions of up to ``n_generate`` held-out scans (the first ones in cohort order; bounded CPU
    time), read back with :func:`fmrilm.descriptors.text.parse` over the descriptor columns. The truth is the
    parse of the reference the model was trained to write (the scan's text cut to whole sentences within the
    token budget), so every fact in it was reachable. Score = matching (level, direction) pairs / facts in
    the truth, pooled over scans; a fact missing from the generation counts wrong, extra facts are ignored.
``f2t_majority_field_accuracy``
    The same facts answered by each column's most frequent (level, direction) in the training references
    (columns never stated in training get the most frequent answer over all training facts).
``bleu4``, ``rouge_l_f1``
    Corpus BLEU-4 (uniform weights, brevity penalty, add-one smoothing of the 2- to 4-gram precisions as in
    Lin & Och 2004, NLTK's ``method2``) and mean ROUGE-L F1 (longest common subsequence, beta = 1) of the same
    generations against their references, on lower-cased word and punctuation tokens (:func:`words`).
``t2t_perplexity``, ``t2t_perplexity_base``
    exp(mean token negative log-likelihood) of up to ``n_paragraphs`` held-out English paragraphs under the
    aligned model and under the base LLM (LoRA adapters switched off with peft's ``disable_adapter``; a
    freshly loaded base after full fine-tuning; the same LLM when it was frozen).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fmrilm.descriptors.text import parse
from fmrilm.errors import FmrilmError
from fmrilm.lm.constants import IGNORE_INDEX
from fmrilm.lm.objectives import collate, f2t_example, t2t_batch

Fact = tuple[str, "str | None"]  # (level, direction) of one descriptor column
_WORD = re.compile(r"\w+(?:\.\d+)?|[^\w\s]")  # words, decimal numbers kept whole, single punctuation marks


# ------------------------------------------------------------------------------------------- text metrics
def words(text: str) -> list[str]:
    """Lower-cased word, number and punctuation tokens: ``"z = -1.42)."`` -> ``["z", "=", "-", "1.42", ")", "."]``."""
    return _WORD.findall(text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU of hypotheses against one reference each, in [0, 1].

    Clipped n-gram matches and counts are pooled over the corpus for n = 1..max_n; precisions of n >= 2 get
    add-one smoothing (numerator and denominator + 1), the unigram precision none, so a corpus without a
    single shared word scores 0. Brevity penalty exp(1 - r / c) when the hypotheses are shorter (c < r).
    """
    _same_length(references, hypotheses)
    matches, totals = np.zeros(max_n), np.zeros(max_n)
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = words(ref), words(hyp)
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for n in range(1, max_n + 1):
            counts, ref_counts = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, ref_counts[g]) for g, c in counts.items())
            totals[n - 1] += max(len(h) - n + 1, 0)
    if hyp_len == 0 or matches[0] == 0:
        return 0.0
    precisions = [matches[0] / totals[0]] + [(matches[i] + 1) / (totals[i] + 1) for i in range(1, max_n)]
    penalty = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len)
    return float(penalty * math.exp(sum(math.log(p) for p in precisions) / max_n))


def _lcs(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (one row of the dynamic programme at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Mean ROUGE-L F1 (beta = 1) over reference/hypothesis pairs; an empty side scores 0."""
    _same_length(references, hypotheses)
    scores = []
    for ref, hyp in zip(references, hypotheses):
        r, h = words(ref), words(hyp)
        lcs = _lcs(r, h) if r and h else 0
        scores.append(0.0 if lcs == 0 else 2 * lcs / (len(r) + len(h)))  # F1 = 2PR/(P+R) = 2 lcs/(|r|+|h|)
    return float(np.mean(scores)) if scores else 0.0


def _same_length(references: Sequence, hypotheses: Sequence) -> None:
    if len(references) != len(hypotheses) or not references:
        raise FmrilmError(f"need one hypothesis per reference and at least one pair, got {len(references)} "
                          f"references and {len(hypotheses)} hypotheses")


# ------------------------------------------------------------------------------------------ field metrics
def facts(text: str, columns: Sequence[str]) -> dict[str, Fact]:
    """{column: (level, direction)} stated by a description (see :func:`fmrilm.descriptors.text.parse`)."""
    return {c: (v[0], v[1]) for c, v in parse(text, columns).items()}


def field_accuracy(truths: Sequence[dict[str, Fact]], predictions: Sequence[dict[str, Fact]]) -> float | None:
    """Share of the true facts (pooled over scans) that the prediction states identically; None without facts.

    A column missing from a prediction counts wrong; columns only the prediction states are ignored.
    """
    _same_length(truths, predictions)
    total = sum(len(t) for t in truths)
    if total == 0:
        return None
    right = sum(pred.get(c) == fact for truth, pred in zip(truths, predictions) for c, fact in truth.items())
    return right / total


def majority_facts(train_truths: Sequence[dict[str, Fact]]) -> tuple[dict[str, Fact], Fact]:
    """Each column's most frequent training fact, and the most frequent fact overall (the fall-back).

    Ties are broken by the sorted order of the facts (None sorts as ""), so the answer is deterministic.
    """
    per_column: dict[str, Counter] = {}
    overall: Counter = Counter()
    for truth in train_truths:
        for column, fact in truth.items():
            per_column.setdefault(column, Counter())[fact] += 1
            overall[fact] += 1
    if not overall:
        return {}, ("typical", None)

    def top(counter: Counter) -> Fact:
        return min(counter, key=lambda f: (-counter[f], f[0], f[1] or ""))

    return {c: top(counts) for c, counts in per_column.items()}, top(overall)


def majority_predictions(truths: Sequence[dict[str, Fact]], majority: tuple[dict[str, Fact], Fact]) -> list[dict]:
    """The majority answer for every column of every truth."""
    table, fallback = majority
    return [{c: table.get(c, fallback) for c in truth} for truth in truths]


# ------------------------------------------------------------------------------------------- F2F baselines
def copy_last_accuracy(codes: np.ndarray | Tensor) -> float:
    """Accuracy of predicting ``codes[:, w+1, n]`` by ``codes[:, w, n]``; codes (S, W, N), W >= 2."""
    codes = np.asarray(codes)
    _check_codes(codes)
    return float((codes[:, 1:] == codes[:, :-1]).mean())


def majority_codes(train_codes: np.ndarray | Tensor) -> np.ndarray:
    """(N,) most frequent code of each ROI over every step of the training scans (S, W, N); ties -> smallest."""
    codes = np.asarray(train_codes)
    if codes.ndim != 3 or codes.size == 0:
        raise FmrilmError(f"training codes must be a non-empty (scans, steps, ROIs) array, got shape {codes.shape}")
    flat = codes.transpose(2, 0, 1).reshape(codes.shape[2], -1)  # (N, S*W)
    return np.array([np.bincount(row).argmax() for row in flat])


def majority_accuracy(majority: np.ndarray, codes: np.ndarray | Tensor) -> float:
    """Accuracy of predicting every ``codes[:, w+1, n]`` (steps 1..W-1) by ``majority[n]``; codes (S, W, N)."""
    codes = np.asarray(codes)
    _check_codes(codes)
    return float((codes[:, 1:] == np.asarray(majority)[None, None, :]).mean())


def _check_codes(codes: np.ndarray) -> None:
    if codes.ndim != 3 or codes.shape[1] < 2 or codes.shape[0] == 0:
        raise FmrilmError(f"codes must be a (scans, steps >= 2, ROIs) array, got shape {codes.shape}")


# ------------------------------------------------------------------------------------------- model passes
@torch.no_grad()
def teacher_forced(model, features: Sequence | np.ndarray, codes: Sequence | np.ndarray | None,
                   texts: Sequence[str] | None, max_text_tokens: int, batch_size: int = 8) -> dict:
    """F2F accuracy and F2T loss of held-out scans in one pass per batch.

    Parameters
    ----------
    features : (S, W, N, h) array-like; codes : (S, W, N) array-like or None (no F2F)
    texts : S reference descriptions or None (no F2T)

    Returns
    -------
    dict
        ``f2f_accuracy`` (pooled over targets) and ``f2t_loss`` (pooled over text tokens), None when absent.
    """
    hits = targets = 0
    nll, tokens = 0.0, 0
    for start in range(0, len(features), batch_size):
        rows = range(start, min(start + batch_size, len(features)))
        examples = []
        for i in rows:
            ex = {"features": torch.from_numpy(np.array(features[i], dtype=np.float32))}
            if codes is not None:
                ex["codes"] = torch.from_numpy(np.array(codes[i], dtype=np.int64))
            if texts is not None:
                ex.update(f2t_example(model.tokenizer, texts[i], max_text_tokens))
            examples.append(ex)
        batch = collate(examples, model.tokenizer.pad_token_id)
        out = model(batch)
        if codes is not None:  # the outputs are means: weight them by their target counts to pool
            n = batch["codes"][:, 1:].numel()
            hits, targets = hits + float(out["f2f_accuracy"]) * n, targets + n
        if texts is not None:
            n = int((batch["text_labels"] != IGNORE_INDEX).sum())
            nll, tokens = nll + float(out["f2t_loss"]) * n, tokens + n
    return {"f2f_accuracy": hits / targets if targets else None, "f2t_loss": nll / tokens if tokens else None}


@torch.no_grad()
def generate_texts(model, features: Sequence | np.ndarray, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy descriptions (KV cache) of scans given as (S, W, N, h) features, batch by batch."""
    texts: list[str] = []
    for start in range(0, len(features), batch_size):
        rows = range(start, min(start + batch_size, len(features)))
        batch = torch.from_numpy(np.stack([np.asarray(features[i], dtype=np.float32) for i in rows]))
        ids = model.generate(batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts += [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return texts


@torch.no_grad()
def perplexity(logits_fn: Callable[[Tensor, Tensor], Tensor], tokenizer, paragraphs: Sequence[str],
               max_len: int, batch_size: int = 4) -> float:
    """exp(mean NLL per predicted token) of paragraphs; ``logits_fn(ids, attention)`` -> (B, L-1, V) logits
    predicting ``ids[:, 1:]``. Paragraphs are tokenized as in T2T training (tokenizer specials, eos, cut)."""
    nll, count = 0.0, 0
    for start in range(0, len(paragraphs), batch_size):
        batch = t2t_batch(tokenizer, list(paragraphs[start:start + batch_size]), max_len)
        ids, attention = batch["lm_ids"], batch["lm_attention"]
        logits = logits_fn(ids, attention).float()
        labels = ids[:, 1:].masked_fill(attention[:, 1:] == 0, IGNORE_INDEX).to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
        nll, count = nll + float(loss), count + int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise FmrilmError("no held-out English tokens to compute a perplexity on")
    return math.exp(nll / count)


def aligned_logits(model) -> Callable[[Tensor, Tensor], Tensor]:
    """T2T logits of the aligned model (the path T2T training takes)."""
    return lambda ids, attention: model({"lm_ids": ids, "lm_attention": attention})["lm_logits"]


def base_perplexity(model, paragraphs: Sequence[str], max_len: int, batch_size: int = 4) -> float:
    """Perplexity of the base LLM: LoRA switched off, a fresh base after full fine-tuning, else the same LLM."""
    config = model.config
    if config.lora:
        with model.llm.disable_adapter():
            return perplexity(aligned_logits(model), model.tokenizer, paragraphs, max_len, batch_size)
    if not config.full_finetune:
        return perplexity(aligned_logits(model), model.tokenizer, paragraphs, max_len, batch_size)
    from fmrilm.lm.backbone import load_backbone

    base, tokenizer = load_backbone(config.llm)
    return perplexity(lambda ids, att: base(input_ids=ids, attention_mask=att).logits[:, :-1], tokenizer,
                      paragraphs, max_len, batch_size)


# ------------------------------------------------------------------------------------------------ the suite
@dataclass
class HeldOut:
    """What the evaluation reads: held-out scans, their references and the training statistics of baselines.

    ``features`` (S, W, N, h) and ``codes`` (S, W, N) array-likes (memory maps are fine: rows are read as
    needed); ``references`` the S target descriptions; ``columns`` the descriptor columns; ``train_codes``
    (S', W, N) and ``train_references`` for the baselines; ``paragraphs`` held-out English paragraphs.
    """

    features: Sequence | np.ndarray
    codes: Sequence | np.ndarray | None
    references: list[str]
    columns: list[str]
    train_codes: np.ndarray | None
    train_references: list[str]
    paragraphs: list[str]
    scan_ids: list[str] = field(default_factory=list)


def evaluate_alignment(model, held: HeldOut, *, max_new_tokens: int, max_text_tokens: int, n_generate: int = 32,
                       n_paragraphs: int = 32, lm_max_len: int = 128, batch_size: int = 8,
                       base_model_perplexity: float | None = None) -> dict:
    """Every metric of the module docstring for ``model`` (an eval-mode :class:`FMRILanguageModel`).

    Parameters
    ----------
    held : HeldOut
    max_new_tokens : int
        Token budget of each generated description.
    max_text_tokens : int
        Token budget of the teacher-forced references (as in training).
    n_generate, n_paragraphs : int
        Held-out scans described by generation, held-out English paragraphs scored (CPU time bounds).
    base_model_perplexity : float or None
        Known perplexity of the base LLM on the same paragraphs (skips recomputing it).

    Returns
    -------
    dict of floats (None where not computable), counts and three ``examples``.
    """
    model.eval()
    f2f = held.codes is not None and held.train_codes is not None and model.config.n_steps >= 2
    scores = teacher_forced(model, held.features, held.codes if f2f else None, held.references, max_text_tokens,
                            batch_size)
    metrics = {"n_held_out_scans": len(held.references), **scores}
    metrics.update(_f2f_baselines(held) if f2f else {"f2f_copy_last_accuracy": None, "f2f_majority_accuracy": None})
    chosen = list(range(min(n_generate, len(held.references))))
    generated = generate_texts(model, [held.features[i] for i in chosen], max_new_tokens, batch_size)
    references = [held.references[i] for i in chosen]
    metrics.update(_f2t_metrics(references, generated, held))
    paragraphs = held.paragraphs[:n_paragraphs]
    metrics["n_paragraphs"] = len(paragraphs)
    metrics["t2t_perplexity"] = perplexity(aligned_logits(model), model.tokenizer, paragraphs, lm_max_len, batch_size)
    metrics["t2t_perplexity_base"] = (base_model_perplexity if base_model_perplexity is not None
                                      else base_perplexity(model, paragraphs, lm_max_len, batch_size))
    ids = held.scan_ids or [str(i) for i in chosen]
    metrics["examples"] = [{"scan_id": ids[i], "reference": references[i], "generated": generated[i]}
                           for i in range(min(3, len(chosen)))]
    return metrics


def _f2f_baselines(held: HeldOut) -> dict:
    codes = np.stack([np.asarray(held.codes[i]) for i in range(len(held.references))])
    return {"f2f_copy_last_accuracy": copy_last_accuracy(codes),
            "f2f_majority_accuracy": majority_accuracy(majority_codes(held.train_codes), codes)}


def _f2t_metrics(references: list[str], generated: list[str], held: HeldOut) -> dict:
    truths = [facts(r, held.columns) for r in references]
    predictions = [facts(g, held.columns) for g in generated]
    majority = majority_facts([facts(r, held.columns) for r in held.train_references])
    return {"n_generated": len(generated), "n_fields": sum(len(t) for t in truths),
            "f2t_field_accuracy": field_accuracy(truths, predictions),
            "f2t_majority_field_accuracy": field_accuracy(truths, majority_predictions(truths, majority)),
            "bleu4": corpus_bleu(references, generated), "rouge_l_f1": rouge_l(references, generated)}
