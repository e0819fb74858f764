"""The three Stage 2 objectives: batch builders and the losses over the model's outputs.

* F2F (fMRI -> fMRI): ``features`` (B, W, N, h) and ``codes`` (B, W, N); the code head on token (w, n)
  predicts the code of (w+1, n), one time STEP (N tokens) ahead.
* F2T (fMRI -> text): ``text_ids`` / ``text_attention`` / ``text_labels`` (B, L), the text after the fMRI
  block; labels are :data:`IGNORE_INDEX` on prompts and padding, so only the description is learnt.
* T2T (text -> text): ``lm_ids`` / ``lm_attention`` (B', L'), plain English that keeps the LLM's language.

Batches are dicts; a batch may hold any mix of the three, and :func:`weighted_loss` sums what is present.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fmrilm.errors import FmrilmError
from fmrilm.lm.constants import IGNORE_INDEX

LOSS_PARTS = ("f2t", "f2f", "t2t")


# ------------------------------------------------------------------------------------------- batches
def f2t_example(tokenizer, text: str, max_len: int, prompt: str | None = None) -> dict[str, Tensor]:
    """Token ids and labels of one F2T text (the words after a scan's fMRI block).

    Parameters
    ----------
    tokenizer
        The LLM tokenizer (from the model, so that ``<fmri>`` / ``</fmri>`` are known).
    text : str
        The target description; its tokens and a final eos carry the loss.
    max_len : int
        Maximum number of tokens, prompt included; a longer text is cut and then gets no eos (it did
        not end there, and the model should not learn to stop mid-sentence).
    prompt : str or None
        Optional instruction between the block and the text; ignored by the loss.

    Returns
    -------
    dict
        ``text_ids`` (L,) long and ``text_labels`` (L,) long, IGNORE_INDEX on the prompt.
    """
    prompt_ids = _ids(tokenizer, prompt) if prompt else []
    answer = _ids(tokenizer, text)
    room = max_len - len(prompt_ids)
    if room < 1 or not answer:
        raise FmrilmError(f"f2t_example needs a non-empty text and max_len ({max_len}) above the prompt's "
                          f"{len(prompt_ids)} tokens; shorten the prompt or raise max_len")
    answer = answer[:room] if len(answer) >= room else answer + [_eos(tokenizer)]
    ids = prompt_ids + answer
    labels = [IGNORE_INDEX] * len(prompt_ids) + answer
    return {"text_ids": torch.tensor(ids), "text_labels": torch.tensor(labels)}


def t2t_batch(tokenizer, paragraphs: Sequence[str], max_len: int) -> dict[str, Tensor]:
    """A right-padded T2T batch of English paragraphs, each ending in eos unless cut at ``max_len``.

    Returns
    -------
    dict
        ``lm_ids`` (B, L) long and ``lm_attention`` (B, L) long (1 = real token), L = longest <= max_len.
    """
    if max_len < 2 or not paragraphs:
        raise FmrilmError(f"t2t_batch needs paragraphs and max_len >= 2, got {len(paragraphs)} and {max_len}")
    rows = []
    for text in paragraphs:
        ids = tokenizer(text).input_ids  # the tokenizer's own special tokens (e.g. bos), as in pretraining
        rows.append(ids[:max_len] if len(ids) >= max_len else ids + [_eos(tokenizer)])
    attention = pad_right([[1] * len(r) for r in rows], 0)
    return {"lm_ids": pad_right(rows, tokenizer.pad_token_id), "lm_attention": attention}


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    """Stack per-scan examples into a batch: ``features`` (W, N, h) and ``codes`` (W, N) are stacked,
    ``text_ids`` / ``text_labels`` (L,) right-padded (pad_id / IGNORE_INDEX) with ``text_attention`` added."""
    keys = set(examples[0]) if examples else set()
    if not examples or any(set(e) != keys for e in examples):
        raise FmrilmError("collate needs a non-empty list of examples that all have the same keys")
    batch = {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in keys & {"features", "codes"}}
    if "text_ids" in keys:
        ids = [torch.as_tensor(e["text_ids"]) for e in examples]
        labels = [torch.as_tensor(e.get("text_labels", e["text_ids"])) for e in examples]
        batch.update(text_ids=pad_right(ids, pad_id), text_labels=pad_right(labels, IGNORE_INDEX),
                     text_attention=pad_right([torch.ones_like(i) for i in ids], 0))
    return batch


def pad_right(rows: Sequence[Sequence[int] | Tensor], value: int) -> Tensor:
    """(B, L) long tensor of variable-length rows padded on the right with ``value``."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return out


def _ids(tokenizer, text: str) -> list[int]:
    # No bos: F2T text continues a sequence that already started with the fMRI block.
    return tokenizer(text, add_special_tokens=False).input_ids


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise FmrilmError("the LLM tokenizer has no eos token; texts need one to mark their end")
    return tokenizer.eos_token_id


# -------------------------------------------------------------------------------------------- losses
def f2f_loss(fmri_logits: Tensor, codes: Tensor) -> dict[str, Tensor]:
    """Next-STEP code prediction: logits of token (w, n) against the code of (w+1, n).

    Parameters
    ----------
    fmri_logits : (B, W, N, K)
        Code-head logits of every block token.
    codes : (B, W, N) long
        The tokenizer's codes of the same scans.

    Returns
    -------
    dict
        ``f2f_loss`` () mean cross-entropy over the B*(W-1)*N targets, ``f2f_accuracy`` () top-1 accuracy.
    """
    B, W, N, K = fmri_logits.shape
    if W < 2:
        raise FmrilmError("F2F needs at least 2 time steps per scan (n_steps >= 2); drop codes from the batch")
    codes = codes.to(fmri_logits.device).long()
    if tuple(codes.shape) != (B, W, N) or codes.min() < 0 or codes.max() >= K:
        raise FmrilmError(f"codes must have shape {(B, W, N)} with values in [0, {K}), got shape "
                          f"{tuple(codes.shape)}; pass the tokenizer's codes of the same scans")
    pred, target = fmri_logits[:, :-1].flatten(0, 2), codes[:, 1:].flatten()  # shift by a step, not a token
    accuracy = (pred.argmax(-1) == target).float().mean()
    return {"f2f_loss": F.cross_entropy(pred.float(), target), "f2f_accuracy": accuracy}


def token_loss(logits: Tensor, labels: Tensor, name: str) -> Tensor:
    """Mean cross-entropy of (B, L, V) logits against ALIGNED (B, L) labels, IGNORE_INDEX skipped."""
    labels = labels.to(logits.device).long()
    if labels.shape != logits.shape[:2]:
        raise FmrilmError(f"{name} have shape {tuple(labels.shape)}, expected {tuple(logits.shape[:2])}")
    scored = labels != IGNORE_INDEX
    if not scored.any():
        raise FmrilmError(f"every entry of {name} is {IGNORE_INDEX} (ignored); the batch has no text to learn")
    if labels[scored].min() < 0 or labels[scored].max() >= logits.shape[-1]:
        raise FmrilmError(f"{name} hold ids outside the LLM vocabulary [0, {logits.shape[-1]}) (delimiter "
                          f"tokens cannot be targets); mask them with {IGNORE_INDEX}")
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def labels_from(ids: Tensor, attention: Tensor | None) -> Tensor:
    """Default labels of a text: the ids, with padding (attention 0) set to IGNORE_INDEX."""
    return ids if attention is None else ids.masked_fill(attention.to(ids.device) == 0, IGNORE_INDEX)


def weighted_loss(outputs: dict[str, Tensor], weights: dict[str, float]) -> Tensor | None:
    """sum of ``weights[p] * outputs[f"{p}_loss"]`` over the parts p present; None when none is."""
    parts = [weights[p] * outputs[f"{p}_loss"] for p in LOSS_PARTS if f"{p}_loss" in outputs]
    return torch.stack(parts).sum() if parts else None
