"""Stage 1: the text-aligned fMRI tokenizer (scan -> discrete tokens in an LLM's text space).

``config.py`` holds :class:`TokenizerConfig` and the preset registry, ``model.py`` the tokenizer
(patch embedding, encoder, quantizer, decoder; time-major token order), ``losses.py`` the training losses.
"""

from fmrilm.tokenizer.config import TokenizerConfig, list_presets, load_preset
from fmrilm.tokenizer.losses import (
    ContrastiveLoss,
    DomainAdversarialLoss,
    DomainClassifier,
    TokenizerLoss,
    clip_loss,
    grl_lambda,
    reverse_gradient,
    siglip_loss,
)
from fmrilm.tokenizer.model import (
    FMRITokenizer,
    FMRITokenizerForTraining,
    patchify,
    sequence_to_tokens,
    tokens_to_sequence,
    unpatchify,
)

__all__ = [
    "ContrastiveLoss",
    "DomainAdversarialLoss",
    "DomainClassifier",
    "FMRITokenizer",
    "FMRITokenizerForTraining",
    "TokenizerConfig",
    "TokenizerLoss",
    "clip_loss",
    "grl_lambda",
    "list_presets",
    "load_preset",
    "patchify",
    "reverse_gradient",
    "sequence_to_tokens",
    "siglip_loss",
    "tokens_to_sequence",
    "unpatchify",
]
