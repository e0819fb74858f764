"""Stage 1 training losses: reconstruction, commitment, fMRI-text contrastive and domain-adversarial.

:class:`TokenizerLoss` takes the tokenizer's output dict and the batch and returns ``{"loss": total,
"recon_loss": ..., "commit_loss": ..., "contrast_loss": ..., "domain_loss": ...}``. Parts are reported
unweighted; ``loss`` is their weighted sum (weights from :class:`TokenizerConfig`). A text part is left
out, not zeroed, when its batch key is missing or its weight is 0, so scans without text still train.

Batch keys read here: ``x`` (B, T, N); optional ``text_features`` (B, text_dim), the frozen LLM's
last-token state of each scan's descriptor text; optional ``text_token_embeddings`` (B2, llm_embed_dim),
frozen LLM input embeddings of tokens of ordinary English text (any B2); optional ``progress`` in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fmrilm.errors import FmrilmError
from fmrilm.tokenizer.config import TokenizerConfig

FMRI_DOMAIN, TEXT_DOMAIN = 0, 1  # domain classifier labels


# ------------------------------------------------------------------------------------ gradient reversal
def grl_lambda(progress: float) -> float:
    """DANN ramp (Ganin & Lempitsky 2015) of the reversal strength: ``2 / (1 + exp(-10 p)) - 1``.

    0 at the start of training (the classifier learns first), 0.987 at p = 0.5 and 0.99991 at p = 1.
    """
    if not (isinstance(progress, (int, float)) and 0 <= progress <= 1):
        raise FmrilmError(f"training progress must be a number in [0, 1] (step / total steps), got {progress!r}")
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None


def reverse_gradient(x: Tensor, strength: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient by ``-strength`` in the backward pass."""
    return _GradientReversal.apply(x, strength)


class DomainClassifier(nn.Sequential):
    """Linear(h, hidden) - GELU - Linear(hidden, 2): logits of (fMRI, text) for features (..., h)."""

    def __init__(self, dim: int, hidden: int = 256):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2))


class DomainAdversarialLoss(nn.Module):
    """Domain-adversarial alignment of fMRI token features with frozen LLM token embeddings.

    Where the text projection sits: the frozen embeddings (B2, llm_embed_dim) are mapped to h by
    ``text_proj`` so the classifier sees both domains in the same h space. The projection belongs to the
    discriminator side: it receives the ordinary gradient (it helps the classifier), so it cannot collapse
    text onto the fMRI features to make the game trivially won. Only the fMRI features pass through the
    gradient-reversal layer, so the encoder is pushed to make its tokens look like (projected) text.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.text_proj = nn.Linear(config.llm_embed_dim, config.hidden)
        self.classifier = DomainClassifier(config.hidden, config.domain_hidden)

    def forward(self, features: Tensor, text_embeddings: Tensor, strength: float) -> Tensor:
        """Balanced cross-entropy of the two domains.

        Parameters
        ----------
        features
            (B, W, N, h) encoder token features (any leading shape).
        text_embeddings
            (B2, llm_embed_dim) frozen LLM token embeddings of English text.
        strength
            Reversal strength lambda, usually ``grl_lambda(progress)``.
        """
        fmri = reverse_gradient(features.reshape(-1, features.shape[-1]), strength)  # (B*W*N, h)
        text = self.text_proj(_check_width(text_embeddings, self.text_proj.in_features, "text_token_embeddings"))
        fmri_ce = F.cross_entropy(self.classifier(fmri), torch.full_like(fmri[:, 0], FMRI_DOMAIN, dtype=torch.long))
        text_ce = F.cross_entropy(self.classifier(text), torch.full_like(text[:, 0], TEXT_DOMAIN, dtype=torch.long))
        # Averaging per domain keeps the many fMRI tokens (B*W*N) from drowning the few text tokens.
        return 0.5 * (fmri_ce + text_ce)


# ------------------------------------------------------------------------------------------ contrastive
def siglip_loss(fmri: Tensor, text: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """SigLIP sigmoid loss (Zhai et al. 2023) of L2-normalised pairs (B, D), (B, D).

    ``logits = exp(logit_scale) * fmri @ text.T + logit_bias``; labels +1 on the diagonal, -1 elsewhere;
    ``loss = -mean_i sum_j log sigmoid(label_ij * logit_ij)``.
    """
    logits = logit_scale.exp() * fmri @ text.T + logit_bias  # (B, B)
    labels = 2 * torch.eye(len(fmri), device=fmri.device, dtype=fmri.dtype) - 1
    return -F.logsigmoid(labels * logits).sum(dim=1).mean()


def clip_loss(fmri: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE (CLIP) of L2-normalised pairs (B, D), (B, D) at temperature ``exp(-logit_scale)``."""
    logits = logit_scale.exp() * fmri @ text.T  # (B, B)
    target = torch.arange(len(fmri), device=fmri.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


class ContrastiveLoss(nn.Module):
    """Pooled fMRI features vs descriptor-text features, both projected to ``shared_dim`` and normalised."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.kind = config.contrastive
        pooled_dim = config.pooled_dim
        # Pooled fMRI features are standardised per dimension (batch statistics in training, running ones after),
        # like the text side below: a pooled mean is mostly what all scans share, and the L2-normalised projection
        # of (shared + small scan-specific part) starts out nearly the same for every scan.
        self.fmri_norm = nn.BatchNorm1d(pooled_dim, affine=False)
        self.fmri_proj = nn.Linear(pooled_dim, config.shared_dim)
        self.text_proj = nn.Linear(config.text_dim, config.shared_dim)
        # Initial values of the papers: SigLIP t' = log 10, b = -10 (the many negatives start near 0 loss);
        # CLIP temperature 0.07.
        scale = math.log(10.0) if self.kind == "siglip" else math.log(1 / 0.07)
        self.logit_scale = nn.Parameter(torch.tensor(scale))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if self.kind == "siglip" else None
        # Per-dimension standardisation of the text features (identity until set_text_statistics): pooled LLM
        # states of descriptor paragraphs share one large vector (SmolLM2: cosine 0.98-0.996 between any two
        # texts), which a freshly initialised projection passes on, leaving SigLIP nothing to tell apart.
        self.register_buffer("text_shift", torch.zeros(config.text_dim))  # (text_dim,)
        self.register_buffer("text_scale", torch.ones(config.text_dim))  # (text_dim,)

    def init_bias_for_batch(self, batch_size: int) -> None:
        """SigLIP only: start the bias at -log(batch_size - 1), where the pull of a row's one positive and the push
        of its batch - 1 negatives cancel for unrelated embeddings (SigLIP's -10 is about this for its 32k batches). With -10 and a batch of 8, every logit starts
        near or below 0, the negatives have nothing to push, and the positives' gradient only pulls all fMRI and
        text embeddings together; the bias, moving about lr per step, stays there for a whole CPU-sized run."""
        if self.logit_bias is not None:
            with torch.no_grad():
                self.logit_bias.fill_(-math.log(max(1, int(batch_size) - 1)))

    def set_text_statistics(self, text_features: Tensor) -> None:
        """Standardise text features with the mean and std (per dimension) of (S, text_dim) training features."""
        text_features = _check_width(text_features, self.text_proj.in_features, "text_features")
        self.text_shift.copy_(text_features.mean(0))
        self.text_scale.copy_(text_features.std(0, unbiased=False) + 1e-6)

    def project_fmri(self, pooled: Tensor) -> Tensor:
        """(B, config.pooled_dim) pooled fMRI features -> standardised -> (B, shared_dim), L2-normalised."""
        pooled = _check_width(pooled, self.fmri_proj.in_features, "pooled fMRI features")
        norm = self.fmri_norm
        if norm.training and len(pooled) < 2:  # batch statistics need two scans: a last batch of one uses the running
            standardised = F.batch_norm(pooled, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
        else:
            standardised = norm(pooled)
        return F.normalize(self.fmri_proj(standardised), dim=-1)

    def project_text(self, text_features: Tensor) -> Tensor:
        """(B, text_dim) text features -> standardised -> (B, shared_dim), L2-normalised."""
        text_features = _check_width(text_features, self.text_proj.in_features, "text_features")
        return F.normalize(self.text_proj((text_features - self.text_shift) / self.text_scale), dim=-1)

    def forward(self, pooled: Tensor, text_features: Tensor) -> Tensor:
        """Loss of (B, config.pooled_dim) pooled fMRI features against (B, text_dim) text features of the same scans."""
        text = self.project_text(text_features)  # (B, D)
        if len(text) != len(pooled):
            raise FmrilmError(f"text_features has {len(text)} rows for {len(pooled)} scans; "
                              "give one descriptor text feature per scan")
        fmri = self.project_fmri(pooled)  # (B, D)
        if self.kind == "siglip":
            return siglip_loss(fmri, text, self.logit_scale, self.logit_bias)
        # CLIP's clamp (open_clip): a temperature below 1/100 makes the softmax unstable.
        return clip_loss(fmri, text, self.logit_scale.clamp(max=math.log(100.0)))


def _check_width(x: Tensor, width: int, key: str) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    if x.ndim != 2 or x.shape[1] != width:
        raise FmrilmError(f"batch[{key!r}] has shape {tuple(x.shape)}, expected (rows, {width}); "
                          f"set text_dim / llm_embed_dim in the tokenizer config to the LLM's hidden size")
    return x


# ------------------------------------------------------------------------------------------------ total
class TokenizerLoss(nn.Module):
    """Weighted sum of the named Stage 1 loss parts; see the module docstring for the batch keys."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.weights = {"recon_loss": config.recon_weight, "commit_loss": config.commit_weight,
                        "contrast_loss": config.contrast_weight, "domain_loss": config.domain_weight}
        self.contrast = ContrastiveLoss(config)
        self.domain = DomainAdversarialLoss(config)
        self.progress = 0.0  # training progress in [0, 1]; the trainer sets it, or passes batch["progress"]

    def forward(self, output: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """Loss parts and their weighted total.

        Parameters
        ----------
        output
            The tokenizer's output dict (``recon`` (B, T, N), ``features`` (B, W, N, h), ``pooled`` (B, h),
            ``commit_loss``).
        batch
            The batch the output came from (``x`` and the optional keys of the module docstring).
        """
        recon = output["recon"]  # (B, T, N)
        x = torch.as_tensor(batch["x"], dtype=recon.dtype, device=recon.device)  # (B, T, N)
        parts = {"recon_loss": F.mse_loss(recon, x), "commit_loss": output["commit_loss"]}
        if batch.get("text_features") is not None and self.weights["contrast_loss"] > 0:
            parts["contrast_loss"] = self.contrast(output["pooled"], batch["text_features"])
        if batch.get("text_token_embeddings") is not None and self.weights["domain_loss"] > 0:
            strength = grl_lambda(self._progress(batch))
            parts["domain_loss"] = self.domain(output["features"], batch["text_token_embeddings"], strength)
        total = sum(self.weights[name] * value for name, value in parts.items())
        return {"loss": total, **parts}

    def _progress(self, batch: dict) -> float:
        progress = batch.get("progress", self.progress)
        # A collated batch may carry one copy per scan; they are all the same step.
        return float(torch.as_tensor(progress, dtype=torch.float64).mean()) if progress is not None else self.progress
