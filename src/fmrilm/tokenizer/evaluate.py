"""Held-out quality of a Stage 1 tokenizer: reconstruction, codebook use, domain confusion, fMRI-text retrieval.

Metrics of :func:`evaluate_tokenizer` (all on the held-out scans given):

``reconstruction_mse``
    Mean squared error of ``decode(encode(x))`` against x over every (scan, time, ROI) value.
``reconstruction_r2``
    ``1 - SSE / SST`` where SST is taken around the per-ROI mean of the held-out scans themselves (pooled over
    scans and time): the gain over predicting each ROI's mean signal. The cohort's scans are z-scored per
    ROI, so that mean is close to 0 and SST close to the sum of squares; using the held-out mean (not the
    training mean) keeps the metric a property of the evaluated scans alone.
``codebook_usage``, ``n_codes_used``, ``codebook_perplexity``
    Fraction (and count) of the ``vocab_size`` codes that occur in the held-out codes, and ``exp`` of the
    entropy (nats) of the code frequencies: the effective number of codes in use.
``domain_accuracy``
    Balanced accuracy (mean of the two per-domain accuracies) of the trained domain classifier telling
    held-out fMRI token features from held-out English token embeddings; 0.5 means the encoder's tokens
    are indistinguishable from text tokens to it (alignment working), 1.0 that they are fully separable.
``retrieval_f2t_top1``, ``retrieval_t2f_top1``, ``retrieval_chance_top1``
    Top-1 accuracy of finding each held-out scan's own descriptor text among all held-out texts from its
    pooled fMRI projection (cosine similarity in the contrastive shared space), the reverse direction, and
    chance, ``1 / n_held_out``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fmrilm.data.cohort import Cohort, load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.tokenizer.losses import FMRI_DOMAIN, TEXT_DOMAIN, TokenizerLoss
from fmrilm.tokenizer.model import FMRITokenizer, FMRITokenizerForTraining

METRICS = ("n_held_out", "reconstruction_mse", "reconstruction_r2", "codebook_usage", "n_codes_used",
           "codebook_perplexity", "domain_accuracy", "retrieval_f2t_top1", "retrieval_t2f_top1",
           "retrieval_chance_top1")


def evaluate_tokenizer(
    tokenizer: FMRITokenizerForTraining | FMRITokenizer,
    cohort: Cohort | str | Path,
    indices: Sequence[int] | np.ndarray,
    text_features: Tensor | np.ndarray | None = None,
    token_embeddings_sample: Tensor | np.ndarray | None = None,
    batch_size: int = 8,
) -> dict:
    """Held-out metrics of a tokenizer (see the module docstring for their definitions).

    Parameters
    ----------
    tokenizer
        The training module (its loss heads hold the contrastive projections and the domain classifier), or a
        bare :class:`FMRITokenizer`, which gives the reconstruction and codebook metrics only.
    cohort
        The prepared cohort (or its path) the scans are read from.
    indices
        (n,) held-out scan indices into the cohort.
    text_features
        (n, text_dim) descriptor-text features of those scans, same order; None skips retrieval.
    token_embeddings_sample
        (m, llm_embed_dim) frozen LLM embeddings of held-out English tokens; None skips domain accuracy.
    batch_size
        Scans per forward pass (the VQ lookup's distance matrix is B x W x N x codebook floats: 0.6 GB at 8 scans of
        450 ROIs, P = 32 and 8,192 codes; batch 32 peaked at 9.8 GB). Results do not depend on it.

    Returns
    -------
    dict
        Every key of ``METRICS``; a metric that cannot be computed (no loss heads, no text given) is None.
        The module's train/eval mode is restored afterwards.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0:
        raise FmrilmError("no held-out scans to evaluate the tokenizer on; hold out at least one subject")
    model, heads = _parts(tokenizer)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with torch.no_grad():
            stats = _pass_over_scans(model, heads, cohort, indices, batch_size)
            metrics = {"n_held_out": int(indices.size), **_reconstruction(stats), **_codebook(stats["counts"])}
            metrics["domain_accuracy"] = _domain_accuracy(heads, stats, token_embeddings_sample)
            metrics.update(_retrieval(heads, stats["pooled"], text_features))
    finally:
        tokenizer.train(was_training)
    return {key: metrics.get(key) for key in METRICS}


def _parts(tokenizer: nn.Module) -> tuple[FMRITokenizer, TokenizerLoss | None]:
    if isinstance(tokenizer, FMRITokenizerForTraining):
        return tokenizer.tokenizer, tokenizer.criterion
    if isinstance(tokenizer, FMRITokenizer):
        return tokenizer, None
    raise FmrilmError(f"evaluate_tokenizer needs an FMRITokenizer or FMRITokenizerForTraining, "
                      f"got {type(tokenizer).__name__}")


def scan_batches(cohort: Cohort | str | Path, indices: np.ndarray, batch_size: int) -> Iterator[Tensor]:
    """(B, T, N) float32 batches of the given scans, read lazily in the given order."""
    opened = cohort if isinstance(cohort, Cohort) else load_cohort(cohort)
    try:
        for start in range(0, len(indices), batch_size):
            rows = indices[start:start + batch_size]
            yield torch.from_numpy(np.stack([opened.scan(int(i)) for i in rows]))
    finally:
        if opened is not cohort:
            opened.close()


def _pass_over_scans(model: FMRITokenizer, heads: TokenizerLoss | None, cohort, indices, batch_size) -> dict:
    """One pass: reconstruction sums, code counts, pooled features and fMRI-side domain hits, streamed."""
    n_rois = model.config.n_rois
    stats = {"sse": 0.0, "sum": torch.zeros(n_rois, dtype=torch.float64), "sumsq": torch.zeros(n_rois, dtype=torch.float64),
             "count": 0, "counts": torch.zeros(model.config.vocab_size, dtype=torch.int64),
             "pooled": [], "fmri_hits": 0, "fmri_tokens": 0}
    device = next(model.parameters()).device
    for x in scan_batches(cohort, indices, batch_size):
        x = x.to(device)
        codes, features = model.encode(x)  # (B, W, N), (B, W, N, h)
        recon = model.decode(codes)  # (B, T, N)
        x64 = x.double()
        stats["sse"] += float((recon.double() - x64).pow(2).sum())
        stats["sum"] += x64.sum(dim=(0, 1)).cpu()
        stats["sumsq"] += x64.pow(2).sum(dim=(0, 1)).cpu()
        stats["count"] += x.shape[0] * x.shape[1]
        stats["counts"] += torch.bincount(codes.reshape(-1).cpu(), minlength=model.config.vocab_size)
        stats["pooled"].append(model.pool(features).cpu())  # as in training
        if heads is not None:
            predicted = heads.domain.classifier(features.reshape(-1, features.shape[-1])).argmax(-1)
            stats["fmri_hits"] += int((predicted == FMRI_DOMAIN).sum())
            stats["fmri_tokens"] += predicted.numel()
    stats["pooled"] = torch.cat(stats["pooled"])  # (n, pooled_dim)
    return stats


def _reconstruction(stats: dict) -> dict:
    n_values = stats["count"] * len(stats["sum"])
    # SST around each ROI's held-out mean: sum(x^2) - (sum x)^2 / count, per ROI
    sst = float((stats["sumsq"] - stats["sum"].pow(2) / stats["count"]).sum())
    r2 = 1.0 - stats["sse"] / sst if sst > 0 else None
    return {"reconstruction_mse": stats["sse"] / n_values, "reconstruction_r2": r2}


def _codebook(counts: Tensor) -> dict:
    used = int((counts > 0).sum())
    freq = counts[counts > 0].double() / counts.sum()
    entropy = float(-(freq * freq.log()).sum())
    return {"codebook_usage": used / len(counts), "n_codes_used": used, "codebook_perplexity": math.exp(entropy)}


def _domain_accuracy(heads: TokenizerLoss | None, stats: dict, tokens: Tensor | np.ndarray | None) -> float | None:
    if heads is None or tokens is None or stats["fmri_tokens"] == 0:
        return None
    device = next(heads.parameters()).device
    tokens = torch.as_tensor(tokens, dtype=torch.float32, device=device)  # (m, llm_embed_dim)
    predicted = heads.domain.classifier(heads.domain.text_proj(tokens)).argmax(-1)
    text_accuracy = float((predicted == TEXT_DOMAIN).float().mean())
    # balanced: the many fMRI tokens and the few text tokens weigh the same
    return 0.5 * (stats["fmri_hits"] / stats["fmri_tokens"] + text_accuracy)


def _retrieval(heads: TokenizerLoss | None, pooled: Tensor, text_features: Tensor | np.ndarray | None) -> dict:
    n = len(pooled)
    chance = {"retrieval_chance_top1": 1.0 / n}
    if heads is None or text_features is None:
        return chance
    device = next(heads.parameters()).device
    text_features = torch.as_tensor(text_features, dtype=torch.float32, device=device)
    if text_features.ndim != 2 or len(text_features) != n:
        raise FmrilmError(f"text_features has shape {tuple(text_features.shape)}; evaluate_tokenizer needs one row "
                          f"per held-out scan ({n}, text_dim), in the order of indices")
    fmri = heads.contrast.project_fmri(pooled.to(device))  # (n, D)
    text = heads.contrast.project_text(text_features)  # (n, D)
    similarity = fmri @ text.T  # (n, n), row = scan, column = text
    truth = torch.arange(n, device=device)
    return {**chance, "retrieval_f2t_top1": float((similarity.argmax(1) == truth).float().mean()),
            "retrieval_t2f_top1": float((similarity.argmax(0) == truth).float().mean())}
