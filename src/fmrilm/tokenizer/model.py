"""The Stage 1 fMRI tokenizer: temporal patches -> Transformer encoder -> quantizer -> light decoder.

A standardized scan x (B, T, N) is cut along time only into W = T / P patches per ROI, giving a grid of
tokens (B, W, N). Whenever the grid is flattened into a sequence it is TIME-MAJOR: sequence position
``w * N + n`` holds patch w of ROI n (all N ROIs of patch 0, then all of patch 1, ...), the order Stage 2's
time-step masks and next-step targets assume. :func:`tokens_to_sequence` and :func:`sequence_to_tokens` are
the only places that flatten or unflatten the grid.

Each token = Linear(P values) + ROI embedding (learned; with gradient positioning half of it is a learned
linear map of the ROI's 3 reference gradient coordinates) + fixed sin-cos embedding of the patch index.
Classes come in dependency order: embedding, quantizer, tokenizer, tokenizer + loss for training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vector_quantize_pytorch import FSQ, VectorQuantize

from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_file, write_json_atomic
from fmrilm.tokenizer.config import TokenizerConfig
from fmrilm.tokenizer.losses import TokenizerLoss

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "fmrilm.tokenizer/1"


# --------------------------------------------------------------------------------- grid <-> sequence
def patchify(x: Tensor, patch_size: int) -> Tensor:
    """Cut (B, T, N) scans along time into (B, W, N, P) patches: ``patches[b, w, n, p] = x[b, w*P + p, n]``."""
    B, T, N = x.shape
    return x.reshape(B, T // patch_size, patch_size, N).transpose(2, 3)  # (B, W, N, P)


def unpatchify(patches: Tensor) -> Tensor:
    """Inverse of :func:`patchify`: (B, W, N, P) -> (B, W*P, N)."""
    B, W, N, P = patches.shape
    return patches.transpose(2, 3).reshape(B, W * P, N)  # (B, T, N)


def tokens_to_sequence(tokens: Tensor) -> Tensor:
    """Flatten a token grid (B, W, N, ...) time-major into (B, W*N, ...): position ``w*N + n`` = (w, n)."""
    return tokens.flatten(1, 2)


def sequence_to_tokens(sequence: Tensor, n_rois: int) -> Tensor:
    """Inverse of :func:`tokens_to_sequence`: (B, W*N, ...) -> (B, W, N, ...)."""
    assert sequence.shape[1] % n_rois == 0, "sequence length is not a multiple of n_rois"
    return sequence.unflatten(1, (sequence.shape[1] // n_rois, n_rois))


def pool_features(features: Tensor, how: str = "mean", networks: Tensor | None = None,
                  n_networks: int | None = None) -> Tensor:
    """(B, W, N, h) encoder features -> one vector per scan, as ``how`` says.

    ``"mean"``: (B, h), the mean over all tokens; ``"roi"``: (B, N * h), each ROI's mean over time, ROI by ROI;
    ``"network"``: (B, K (K + 1) / 2), :func:`network_similarity` with ``networks`` (N,) the network index of each
    ROI in [0, K), K = ``n_networks``.
    """
    if how == "roi":
        return features.mean(dim=1).flatten(1)
    if how == "network":
        assert networks is not None, "network pooling needs the ROIs' networks"
        return network_similarity(features, networks, n_networks)
    return features.mean(dim=(1, 2))


def network_similarity(features: Tensor, networks: Tensor, n_networks: int | None = None) -> Tensor:
    """Mean similarity of encoder features within and between networks: (B, W, N, h) -> (B, K (K + 1) / 2).

    A second-order pooling, the feature-space counterpart of network-pair functional connectivity (what most
    descriptor sentences talk about, and what a mean over tokens cannot express). Each ROI's features are centred
    over time, which removes its ROI embedding and anything else constant in time, flattened to one (W * h) vector
    and L2-normalised; the cosine similarity of two different ROIs is averaged over all ROI pairs of each pair of
    networks (a, b), a <= b, ordered row by row (``torch.triu_indices``); a pair without ROI pairs gives 0.
    ``networks`` (N,) holds each ROI's network index in [0, K); K = ``n_networks`` (default networks.max() + 1).
    Needs W >= 2 patches per ROI (with one, centring leaves nothing).
    """
    centred = features - features.mean(dim=1, keepdim=True)  # (B, W, N, h)
    vectors = F.normalize(centred.transpose(1, 2).flatten(2).float(), dim=-1)  # (B, N, W*h)
    similarity = vectors @ vectors.transpose(1, 2)  # (B, N, N)
    n_networks = int(networks.max()) + 1 if n_networks is None else n_networks
    onehot = F.one_hot(networks.long(), n_networks).to(similarity.dtype)  # (N, K)
    sums = onehot.T @ similarity @ onehot  # (B, K, K): sum over the ROI pairs of each network pair
    sums = sums - torch.diag_embed(torch.diagonal(similarity, dim1=1, dim2=2) @ onehot)  # drop the self-pairs
    sizes = onehot.sum(0)  # (K,)
    pairs = sizes[:, None] * sizes[None, :] - torch.diag(sizes)  # (K, K) ordered ROI pairs, self-pairs excluded
    upper = torch.triu_indices(len(sizes), len(sizes), device=features.device)
    return (sums / pairs.clamp(min=1))[:, upper[0], upper[1]]  # (B, K (K + 1) / 2)


def sincos_embedding(n_positions: int, dim: int) -> Tensor:
    """(n_positions, dim) fixed embedding: sines in the first half, cosines in the second (Vaswani et al.)."""
    frequencies = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))  # (dim/2,)
    angles = torch.arange(n_positions, dtype=torch.float64)[:, None] * frequencies  # (W, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (W, dim)


# ------------------------------------------------------------------------------------------ embedding
class TokenEmbedding(nn.Module):
    """Patch values + ROI embedding + time embedding, for a (B, W, N, P) patch grid."""

    def __init__(self, config: TokenizerConfig, roi_gradients: Tensor | np.ndarray | None = None):
        super().__init__()
        h, N = config.hidden, config.n_rois
        self.patch = nn.Linear(config.patch_size, h)
        self.register_buffer("time", sincos_embedding(config.n_patches, h), persistent=False)  # (W, h)
        learned = h // 2 if config.gradient_positioning else h
        self.roi = nn.Parameter(torch.randn(N, learned) * 0.02)  # (N, h) or (N, h/2)
        self.gradient_proj = nn.Linear(3, h - learned) if config.gradient_positioning else None
        gradients = _check_gradients(roi_gradients, config)
        if gradients is not None:
            self.register_buffer("roi_gradients", gradients)  # (N, 3), saved with the weights

    def roi_embedding(self) -> Tensor:
        """(N, h) ROI embeddings: learned, or [learned half | Linear(standardised gradients) half]."""
        if self.gradient_proj is None:
            return self.roi
        g = self.roi_gradients
        # Standardised per axis so the map sees unit-scale inputs whatever the gradients' own scale.
        g = (g - g.mean(0)) / (g.std(0, unbiased=False) + 1e-6)  # (N, 3)
        return torch.cat([self.roi, self.gradient_proj(g)], dim=1)  # (N, h)

    def positions(self) -> Tensor:
        """(W, N, h) position code of every grid slot: time[w] + roi[n]."""
        return self.time[:, None, :] + self.roi_embedding()[None, :, :]

    def forward(self, patches: Tensor) -> Tensor:
        """(B, W, N, P) patches -> (B, W, N, h) token embeddings."""
        return self.patch(patches) + self.positions()


def _check_gradients(roi_gradients: Tensor | np.ndarray | None, config: TokenizerConfig) -> Tensor | None:
    if roi_gradients is None:
        if config.gradient_positioning:
            raise FmrilmError("gradient_positioning needs roi_gradients, an (n_rois, 3) array of the reference "
                              "cohort's first three gradients; pass them or set gradient_positioning=False")
        return None
    if not config.gradient_positioning:
        raise FmrilmError("roi_gradients were given but gradient_positioning is False; set it to True to use them")
    gradients = torch.as_tensor(np.asarray(roi_gradients, dtype=np.float32) if not torch.is_tensor(roi_gradients)
                                else roi_gradients.detach().float())
    if tuple(gradients.shape) != (config.n_rois, 3) or not torch.isfinite(gradients).all():
        raise FmrilmError(f"roi_gradients must be finite with shape ({config.n_rois}, 3) (n_rois, first three "
                          f"gradients), got shape {tuple(gradients.shape)}")
    return gradients.clone()


def _check_networks(roi_networks: Tensor | np.ndarray | None, config: TokenizerConfig) -> Tensor | None:
    if roi_networks is None:
        if config.contrast_pooling == "network":
            raise FmrilmError("contrast_pooling 'network' needs roi_networks, each ROI's network index (n_rois,); "
                              "pass them or choose contrast_pooling 'mean'")
        return None
    networks = torch.as_tensor(np.array(roi_networks) if not torch.is_tensor(roi_networks) else roi_networks)
    whole = networks.dtype in (torch.int32, torch.int64) or bool((networks == networks.round()).all())
    if tuple(networks.shape) != (config.n_rois,) or not whole or networks.min() < 0 or networks.max() >= config.n_networks:
        values = f" with values {networks.min().item()} to {networks.max().item()}" if networks.numel() else ""
        raise FmrilmError(f"roi_networks must be {config.n_rois} integers (n_rois,) in [0, {config.n_networks}) "
                          f"(n_networks), got shape {tuple(networks.shape)}{values}")
    return networks.long().clone()


def transformer(config: TokenizerConfig, n_layers: int) -> nn.TransformerEncoder:
    """Pre-norm GELU Transformer blocks over (B, L, h) sequences, ending in a LayerNorm."""
    layer = nn.TransformerEncoderLayer(
        config.hidden, config.heads, dim_feedforward=round(config.hidden * config.mlp_ratio),
        dropout=config.dropout, activation="gelu", batch_first=True, norm_first=True,
    )
    # Nested tensors only help with padding masks, which fixed-size scans never have.
    return nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(config.hidden), enable_nested_tensor=False)


# ------------------------------------------------------------------------------------------ quantizer
class Quantizer(nn.Module):
    """VQ or FSQ (vector-quantize-pytorch) behind one interface over (B, L, h) sequences.

    VQ: cosine-similarity codebook updated by EMA, k-means initialised, dead codes restarted; features are
    projected h -> codebook_dim before lookup and back after (the library's project_in / project_out).
    FSQ: h -> len(levels) -> rounded to the levels -> h. Either way the output lives in h space.
    """

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.kind = config.quantizer
        if self.kind == "vq":
            self.vq = VectorQuantize(
                dim=config.hidden, codebook_size=config.codebook_size, codebook_dim=config.codebook_dim,
                use_cosine_sim=True, kmeans_init=config.kmeans_init, kmeans_iters=10, decay=config.ema_decay,
                commitment_weight=1.0, threshold_ema_dead_code=config.dead_code_threshold,
            )  # the loss applies commit_weight, so the library's weight stays 1
        else:
            self.fsq = FSQ(levels=list(config.fsq_levels), dim=config.hidden)

    def forward(self, z: Tensor, update_codebook: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, h) -> (quantized (B, L, h), codes (B, L) long, commitment loss ()).

        ``update_codebook=False`` keeps the VQ codebook's EMA statistics untouched (for inference calls
        made while the module is in training mode).
        """
        if self.kind == "vq":
            quantized, codes, commit = self.vq(z, freeze_codebook=not update_codebook)
            return quantized, codes.long(), commit
        quantized, codes = self.fsq(z)
        return quantized, codes.long(), z.new_zeros(())  # FSQ has no auxiliary loss

    def lookup(self, codes: Tensor) -> Tensor:
        """(B, L) codes -> (B, L, h), the same vectors the forward pass outputs for those codes."""
        if self.kind == "vq":
            return self.vq.get_output_from_indices(codes)
        return self.fsq.indices_to_codes(codes)


# ------------------------------------------------------------------------------------------ tokenizer
class FMRITokenizer(nn.Module):
    """Text-aligned fMRI tokenizer (fMRI-LM Stage 1).

    Parameters
    ----------
    config
        Architecture (see :class:`TokenizerConfig`; presets via :func:`fmrilm.tokenizer.load_preset`).
    roi_gradients
        (N, 3) reference gradient coordinates of each ROI; required with ``config.gradient_positioning``.
    roi_networks
        (N,) network index of each ROI in [0, config.n_networks); required with ``contrast_pooling="network"``.
    """

    def __init__(self, config: TokenizerConfig, roi_gradients: Tensor | np.ndarray | None = None,
                 roi_networks: Tensor | np.ndarray | None = None):
        super().__init__()
        self.config = config
        self.embed = TokenEmbedding(config, roi_gradients)
        networks = _check_networks(roi_networks, config)
        if networks is not None:
            self.register_buffer("roi_networks", networks)  # (N,), saved with the weights
        self.encoder = transformer(config, config.layers)
        self.quantizer = Quantizer(config)
        self.decoder = transformer(config, config.decoder_layers)
        self.head = nn.Linear(config.hidden, config.patch_size)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Encode, quantize and reconstruct ``batch["x"]``.

        Parameters
        ----------
        batch
            ``{"x": (B, T, N) float, ...}``; other keys are ignored here (the loss reads them).

        Returns
        -------
        dict
            ``recon`` (B, T, N); ``codes`` (B, W, N) long; ``features`` (B, W, N, h) continuous encoder
            features before quantization (what Stage 2 feeds to the LLM); ``quantized`` (B, W, N, h);
            ``pooled`` (B, config.pooled_dim), ``features`` pooled as ``config.contrast_pooling`` says
            (:meth:`pool`); ``commit_loss`` () (0 in eval mode and for FSQ).
        """
        features = self.encode_features(batch["x"])  # (B, W, N, h)
        quantized, codes, commit = self.quantizer(tokens_to_sequence(features))  # (B, W*N, h), (B, W*N)
        quantized = sequence_to_tokens(quantized, self.config.n_rois)  # (B, W, N, h)
        return {
            "recon": self._reconstruct(quantized), "codes": sequence_to_tokens(codes, self.config.n_rois),
            "features": features, "quantized": quantized, "pooled": self.pool(features),
            "commit_loss": commit,
        }

    def pool(self, features: Tensor) -> Tensor:
        """(B, W, N, h) encoder features -> (B, config.pooled_dim), as the contrastive loss sees them."""
        return pool_features(features, self.config.contrast_pooling, getattr(self, "roi_networks", None),
                             self.config.n_networks)

    def encode_features(self, x: Tensor) -> Tensor:
        """(B, T, N) scans -> (B, W, N, h) continuous encoder features."""
        tokens = self.embed(patchify(self._check_scans(x), self.config.patch_size))  # (B, W, N, h)
        return sequence_to_tokens(self.encoder(tokens_to_sequence(tokens)), self.config.n_rois)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, N) scans -> (codes (B, W, N) long, features (B, W, N, h)); never updates the codebook."""
        features = self.encode_features(x)  # (B, W, N, h)
        _, codes, _ = self.quantizer(tokens_to_sequence(features), update_codebook=False)  # (B, W*N)
        return sequence_to_tokens(codes, self.config.n_rois), features

    def decode(self, codes: Tensor) -> Tensor:
        """(B, W, N) codes -> (B, T, N) reconstructed scans."""
        W, N = self.config.n_patches, self.config.n_rois
        if codes.ndim != 3 or tuple(codes.shape[1:]) != (W, N):
            raise FmrilmError(f"codes have shape {tuple(codes.shape)}; decode expects (batch, {W}, {N}) "
                              "= (batch, patches, n_rois) as returned by encode")
        quantized = self.quantizer.lookup(tokens_to_sequence(codes.long()))  # (B, W*N, h)
        return self._reconstruct(sequence_to_tokens(quantized, N))

    def tokens_to_sequence(self, tokens: Tensor) -> Tensor:
        """(B, W, N, ...) -> (B, W*N, ...), time-major (see :func:`tokens_to_sequence`)."""
        return tokens_to_sequence(tokens)

    def sequence_to_tokens(self, sequence: Tensor) -> Tensor:
        """(B, W*N, ...) -> (B, W, N, ...) for this tokenizer's N (see :func:`sequence_to_tokens`)."""
        return sequence_to_tokens(sequence, self.config.n_rois)

    def _reconstruct(self, quantized: Tensor) -> Tensor:
        # Quantized vectors carry content only; the decoder gets each slot's position code again.
        hidden = self.decoder(tokens_to_sequence(quantized + self.embed.positions()))  # (B, W*N, h)
        patches = sequence_to_tokens(self.head(hidden), self.config.n_rois)  # (B, W, N, P)
        return unpatchify(patches)  # (B, T, N)

    def _check_scans(self, x: Tensor) -> Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        T, N = self.config.length, self.config.n_rois
        if x.ndim != 3 or tuple(x.shape[1:]) != (T, N):
            raise FmrilmError(f"scans have shape {tuple(x.shape)}; this tokenizer expects (batch, {T}, {N}) = "
                              "(batch, length, n_rois), time-major; check the cohort's atlas and length")
        return x

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Parameter count (the EMA codebook is a buffer, not a trainable parameter)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` (weights, codebook, ROI gradients) to ``directory``.

        Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        with atomic_file(directory / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": FORMAT})
        write_json_atomic(directory / CONFIG_FILE, {"format": FORMAT, "config": self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FMRITokenizer":
        """Load a tokenizer written by :meth:`save_pretrained`, in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise FmrilmError(f"{directory} is not a saved tokenizer (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                              "write one with FMRITokenizer.save_pretrained")
        saved = json.loads((directory / CONFIG_FILE).read_text())
        if saved.get("format") != FORMAT:
            raise FmrilmError(f"{directory / CONFIG_FILE} has format {saved.get('format')!r}, expected {FORMAT!r}")
        state = load_file(str(directory / WEIGHTS_FILE))
        model = cls(TokenizerConfig.from_dict(saved["config"]), roi_gradients=state.get("embed.roi_gradients"),
                    roi_networks=state.get("roi_networks"))
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()[:200]
            raise FmrilmError(f"{directory / WEIGHTS_FILE} does not match its {CONFIG_FILE} ({first}); "
                              "save the tokenizer again") from None
        return model.eval()


class FMRITokenizerForTraining(nn.Module):
    """Tokenizer + :class:`TokenizerLoss`: ``forward(batch)`` returns ``{"loss", "recon_loss", ...}``.

    This is the module the shared Trainer optimises; save ``.tokenizer`` for later stages.
    """

    def __init__(self, config: TokenizerConfig, roi_gradients: Tensor | np.ndarray | None = None,
                 roi_networks: Tensor | np.ndarray | None = None):
        super().__init__()
        self.tokenizer = FMRITokenizer(config, roi_gradients, roi_networks)
        self.criterion = TokenizerLoss(config)

    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Batch (``x`` (B, T, N), optional ``text_features``, ``text_token_embeddings``, ``progress``) -> losses."""
        return self.criterion(self.tokenizer(batch), batch)

    def set_progress(self, progress: float) -> None:
        """Training progress in [0, 1] (step / total steps) for the gradient-reversal ramp."""
        self.criterion.progress = float(progress)
