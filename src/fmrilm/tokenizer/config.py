"""Configuration of the Stage 1 tokenizer and its presets.

:class:`TokenizerConfig` holds every architecture and loss setting; it is validated when built, saved as
JSON inside every saved tokenizer and rebuilt from it by ``from_dict`` (which refuses unknown keys, so a
typo never silently falls back to a default). Presets are JSON files in ``fmrilm/presets/tokenizer``:
``{"description": ..., "config": {field: value, ...}}``; fields a preset leaves out keep their defaults.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fmrilm.constants import TARGET_LENGTH
from fmrilm.errors import FmrilmError

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "tokenizer"
QUANTIZERS = ("vq", "fsq")
CONTRASTIVE = ("siglip", "clip")
CONTRAST_POOLINGS = ("mean", "roi", "network")


@dataclass
class TokenizerConfig:
    """Settings of :class:`fmrilm.tokenizer.FMRITokenizer` and of its training losses."""

    # -- input: a standardized scan x of shape (T, N) is cut into W = length // patch_size patches per ROI
    n_rois: int = 450  # N, ROIs per scan (450 = Schaefer-400 + Tian S3, the paper's atlas)
    length: int = TARGET_LENGTH  # T, time points per scan; must be a multiple of patch_size (no padding)
    patch_size: int = 32  # P, time points per token (patches run along time only); P = length gives W = 1
    # -- encoder
    hidden: int = 384  # h, width of every token feature (even: half of it carries sin, half cos time codes)
    layers: int = 12  # encoder Transformer blocks (pre-norm, GELU)
    heads: int = 6  # attention heads per block; must divide hidden
    mlp_ratio: float = 4.0  # width of each block's MLP as a multiple of hidden
    dropout: float = 0.0  # dropout inside the Transformer blocks (encoder and decoder)
    gradient_positioning: bool = False  # Brain-JEPA: half of each ROI embedding = Linear(ROI's 3 gradient coords)
    # -- quantizer (vector-quantize-pytorch)
    quantizer: str = "vq"  # "vq" (cosine-similarity codebook, EMA updates) or "fsq" (finite scalar quantization)
    codebook_size: int = 8192  # VQ: number of codes (FSQ: the product of fsq_levels instead)
    codebook_dim: int = 128  # VQ: code width; features are projected hidden -> codebook_dim -> hidden around it
    ema_decay: float = 0.99  # VQ: decay of the exponential moving averages that update the codebook
    kmeans_init: bool = True  # VQ: initialise the codebook by k-means on the first batch's features
    dead_code_threshold: float = 2.0  # VQ: codes whose EMA usage falls below this are restarted (0 = never)
    fsq_levels: tuple[int, ...] = (8, 8, 8, 6, 5)  # FSQ: levels per code dimension (FSQ paper's choice near 2^14)
    # -- decoder
    decoder_layers: int = 2  # Transformer blocks of the light decoder that rebuilds each token's P values
    # -- alignment heads (used by the training losses only; the saved tokenizer does not need them)
    text_dim: int = 768  # width of descriptor-text features, the frozen LLM's last-token state (GPT-2: 768)
    llm_embed_dim: int = 768  # width of the frozen LLM's input token embeddings (the "text" domain)
    shared_dim: int = 512  # width of the shared space of the contrastive loss
    contrastive: str = "siglip"  # "siglip" (sigmoid loss, Zhai et al. 2023) or "clip" (symmetric InfoNCE)
    # what the contrastive loss sees of a scan: "mean" over all tokens (h,); "roi", each ROI's mean over time
    # side by side (N * h,), which keeps where in the brain a feature is (on 300 simulated scans it fit the training
    # pairs but not held-out ones, see README); or "network", the mean cosine similarity of the ROIs' time-centred
    # features within and between networks (K (K + 1) / 2,), a learned analogue of network-pair connectivity
    contrast_pooling: str = "mean"
    n_networks: int = 1  # K, networks the ROIs belong to (from the cohort's ROI table; used by "network" pooling)
    domain_hidden: int = 256  # hidden width of the domain classifier Linear(h, .)-GELU-Linear(., 2)
    # -- loss weights (0 switches a part off)
    recon_weight: float = 1.0  # reconstruction MSE
    commit_weight: float = 1.0  # VQ commitment
    contrast_weight: float = 1.0  # fMRI <-> descriptor text contrastive loss
    domain_weight: float = 0.5  # domain-adversarial loss (the paper's 0.5)

    def __post_init__(self) -> None:
        self.fsq_levels = tuple(self.fsq_levels) if isinstance(self.fsq_levels, (list, tuple)) else self.fsq_levels
        self._check_types()
        self._check_shapes()
        self._check_quantizer()
        _require(self.contrastive in CONTRASTIVE, f"contrastive must be one of {', '.join(CONTRASTIVE)}, "
                 f"got {self.contrastive!r}")
        _require(self.contrast_pooling in CONTRAST_POOLINGS,
                 f"contrast_pooling must be one of {', '.join(CONTRAST_POOLINGS)}, got {self.contrast_pooling!r}")
        _require(self.contrast_pooling != "network" or self.n_patches >= 2,
                 f"contrast_pooling 'network' needs at least 2 patches per ROI (length / patch_size), got "
                 f"{self.n_patches}; choose a smaller patch_size or another pooling")
        _require(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        _require(self.mlp_ratio > 0, f"mlp_ratio must be > 0, got {self.mlp_ratio}; 4.0 is usual")

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                _require(_is_int(value) and value >= 1, f"{f.name} must be an integer >= 1, got {value!r}")
            elif f.type == "float":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                _require(ok and value >= 0, f"{f.name} must be a finite number >= 0, got {value!r}")
            elif f.type == "bool":
                _require(isinstance(value, bool), f"{f.name} must be true or false, got {value!r}")

    def _check_shapes(self) -> None:
        _require(self.length % self.patch_size == 0,
                 f"length {self.length} is not a multiple of patch_size {self.patch_size}; scans are not padded, "
                 f"so choose a patch_size that divides it (e.g. {_divisors(self.length)})")
        _require(self.hidden % 2 == 0, f"hidden must be even (sin-cos time embedding), got {self.hidden}")
        _require(self.hidden % self.heads == 0,
                 f"hidden {self.hidden} is not divisible by heads {self.heads}; choose heads dividing hidden")

    def _check_quantizer(self) -> None:
        _require(self.quantizer in QUANTIZERS,
                 f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}")
        _require(self.codebook_size >= 2, f"codebook_size must be >= 2, got {self.codebook_size}")
        _require(0 < self.ema_decay < 1, f"ema_decay must be in (0, 1), got {self.ema_decay}; 0.99 is the paper's")
        levels = self.fsq_levels
        ok = isinstance(levels, tuple) and len(levels) > 0 and all(_is_int(v) and v >= 3 for v in levels)
        # Level 2 needs the library's symmetry-preserving mode, which this tokenizer does not expose.
        _require(ok, f"fsq_levels must be a non-empty list of integers >= 3, got {levels!r}; e.g. [8, 5, 5, 5]")

    # -- derived sizes ---------------------------------------------------------------------------------
    @property
    def n_patches(self) -> int:
        """W, patches per ROI (time steps of the token grid)."""
        return self.length // self.patch_size

    @property
    def n_tokens(self) -> int:
        """W * N, tokens per scan."""
        return self.n_patches * self.n_rois

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled features the contrastive loss sees (see ``contrast_pooling``)."""
        return {"mean": self.hidden, "roi": self.n_rois * self.hidden,
                "network": self.n_networks * (self.n_networks + 1) // 2}[self.contrast_pooling]

    @property
    def vocab_size(self) -> int:
        """Number of distinct codes: codebook_size for VQ, the product of fsq_levels for FSQ."""
        return self.codebook_size if self.quantizer == "vq" else math.prod(self.fsq_levels)

    # -- JSON ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        data = asdict(self)
        data["fsq_levels"] = list(self.fsq_levels)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TokenizerConfig":
        """Build from a dict like :meth:`to_dict`'s; unknown keys are refused, missing keys take defaults."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FmrilmError(f"unknown tokenizer settings {unknown}; known settings: {', '.join(known)}")
        return cls(**data)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FmrilmError(f"tokenizer config: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d > 1)


# ----------------------------------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """Names accepted by :func:`load_preset`: the JSON files in ``presets/tokenizer``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str | os.PathLike, **overrides: object) -> TokenizerConfig:
    """Config of a preset by name (``quick``, ``tiny``, ``S``, ``B``, ``L``; any case) or from a JSON file path.

    Parameters
    ----------
    name
        A name from :func:`list_presets` or a path to a preset JSON file.
    **overrides
        Fields replacing the preset's, e.g. ``n_rois=116`` for another atlas.
    """
    path = Path(name)
    if path.suffix != ".json":
        matches = [p for p in list_presets() if p.lower() == str(name).lower()]
        if not matches:
            raise FmrilmError(f"unknown tokenizer preset {str(name)!r}; choose one of {', '.join(list_presets())}")
        path = PRESET_DIR / f"{matches[0]}.json"
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FmrilmError(f"tokenizer preset {path} is not readable JSON ({exc.__class__.__name__})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise FmrilmError(f"tokenizer preset {path} needs a \"config\" object of TokenizerConfig fields")
    return TokenizerConfig.from_dict({**spec["config"], **overrides})
