"""Stage 2 of fMRI-LM: a pretrained causal LLM that reads fMRI token grids and writes text.

A scan's token grid comes from the FROZEN Stage 1 tokenizer's encoder as continuous features (B, W, N, h).
Each token becomes ``projector(feature) + roi_embedding[n]`` (width d of the LLM) and the grid is laid out
TIME-MAJOR (token ``w*N + n``) in front of the text, optionally between ``<fmri>`` and ``</fmri>``::

    [<fmri>] (w=0: n=0..N-1) (w=1: ...) ... (w=W-1: ...) [</fmri>] text...

Positions: every ROI of step w shares one position id (w, or w+1 after ``<fmri>`` at 0); every other token
has its own, counting on after the block (text from W; with delimiters ``</fmri>`` at W+1, text from W+2). The attention rule "query i sees key j iff key j is a real token and
pos_j <= pos_i" therefore gives exactly the paper's mask: causal BY TIME STEP inside the block (the ROIs of
a step see each other and every earlier step), causal text that sees the whole block, padded keys hidden.
It is passed to the LLM as a float 4D mask, which transformers 5 applies unchanged (no causal mask of its
own on top) for GPT-2, Llama and Qwen3, eager and sdpa alike (tests/test_lm_model.py checks it).
The delimiters are special tokens of the LLM tokenizer whose embeddings live in this module, not in new
vocabulary rows: they are inputs only, and LoRA keeps the vocabulary frozen.

Objectives (weights in :class:`FMRILMConfig`): F2F, the codebook head on the hidden state of token (w, n)
predicts the code of (w+1, n), one STEP = N tokens ahead; F2T, text after the block, loss on the text only;
T2T, plain language modelling that keeps the LLM's English.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_output_dir, write_json_atomic
from fmrilm.lm.backbone import (
    DEFAULT_BACKBONE, _unwrap, backbone_info, default_lora_rank, default_lora_targets, load_backbone,
)
from fmrilm.lm.constants import DELIMITERS
from fmrilm.lm.objectives import LOSS_PARTS, f2f_loss, labels_from, token_loss, weighted_loss
from fmrilm.tokenizer.model import sequence_to_tokens, tokens_to_sequence

FORMAT = "fmrilm.lm/1"
CONFIG_FILE = "config.json"
FMRI_FILE = "fmri_modules.safetensors"
LLM_DIR = "llm"  # LoRA adapters (peft files) or, after full fine-tuning, the whole LLM's weights
LLM_WEIGHTS = "model.safetensors"
PROJECTORS = ("mlp", "linear")


@dataclass
class FMRILMConfig:
    """Settings of :class:`FMRILanguageModel`; saved as ``config.json`` with every saved model."""

    llm: str = DEFAULT_BACKBONE  # base causal LM for load_backbone (name, directory or hub id); never copied
    tokenizer_dir: str | None = None  # the Stage 1 tokenizer whose frozen encoder gives the features (provenance)
    n_rois: int = 450  # N, ROI tokens per time step
    n_steps: int = 5  # W, time steps (patches) per scan: tokenizer length / patch_size
    feature_dim: int = 384  # h, width of the tokenizer's encoder features
    codebook_size: int = 8192  # K, number of tokenizer codes (the F2F head's classes)
    projector: str = "mlp"  # "mlp" (Linear-GELU-Linear, LLaVA's mlp2x_gelu) or "linear"
    use_delimiters: bool = True  # put <fmri> ... </fmri> around the block (two trained embeddings)
    lora: bool = True  # adapt the LLM with LoRA (peft); lora=False and full_finetune=False freeze it
    lora_r: int | None = None  # LoRA rank; None: per-architecture default (default_lora_rank)
    lora_alpha: float | None = None  # LoRA scale numerator; None: per-architecture default
    lora_targets: list[str] | None = None  # adapted module names; None: every attention and MLP projection
    lora_dropout: float = 0.05  # dropout on the LoRA branch input
    full_finetune: bool = False  # train every LLM weight instead (excludes lora)
    f2t_weight: float = 1.0  # weight of the fMRI -> text loss
    f2f_weight: float = 0.1  # weight of the next-step fMRI code loss
    t2t_weight: float = 0.5  # weight of the plain language-modelling loss

    def __post_init__(self) -> None:
        self.tokenizer_dir = None if self.tokenizer_dir is None else str(self.tokenizer_dir)
        if isinstance(self.lora_targets, (tuple, list)):
            self.lora_targets = list(self.lora_targets)
        _require(isinstance(self.llm, str) and self.llm.strip() != "", f"llm must be a model name, got {self.llm!r}")
        for name in ("n_rois", "n_steps", "feature_dim", "codebook_size"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _require(self.codebook_size >= 2, f"codebook_size must be >= 2, got {self.codebook_size}")
        _require(self.projector in PROJECTORS,
                 f"projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        for name in ("use_delimiters", "lora", "full_finetune"):
            value = getattr(self, name)
            _require(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        _require(not (self.lora and self.full_finetune), "lora and full_finetune exclude each other; set one false")
        self._check_lora()
        for name in (f"{part}_weight" for part in LOSS_PARTS):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            _require(ok and value >= 0, f"{name} must be a finite number >= 0, got {value!r}")

    def _check_lora(self) -> None:
        r, alpha, targets = self.lora_r, self.lora_alpha, self.lora_targets
        _require(r is None or (_is_int(r) and r >= 1), f"lora_r must be an integer >= 1 or null, got {r!r}")
        ok = alpha is None or (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0)
        _require(ok, f"lora_alpha must be a number > 0 or null, got {alpha!r}")
        ok = targets is None or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))
        _require(ok, f"lora_targets must be a non-empty list of module names or null, got {targets!r}")
        _require(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FMRILMConfig":
        """Build from a dict like :meth:`to_dict`'s; unknown keys are refused, missing keys take defaults."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise FmrilmError(f"unknown fMRI-LM settings {unknown}; known settings: {', '.join(known)}")
        return cls(**data)

    @classmethod
    def from_tokenizer(cls, tokenizer_config, tokenizer_dir: str | os.PathLike | None = None,
                       **kwargs) -> "FMRILMConfig":
        """Config whose grid sizes (N, W, h, K) are those of a Stage 1 :class:`TokenizerConfig`."""
        c = tokenizer_config
        sizes = dict(n_rois=c.n_rois, n_steps=c.n_patches, feature_dim=c.hidden, codebook_size=c.vocab_size)
        return cls(tokenizer_dir=tokenizer_dir, **sizes, **kwargs)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise FmrilmError(f"fMRI-LM config: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def build_projector(config: FMRILMConfig, hidden_size: int) -> nn.Module:
    """The (B, ..., h) -> (B, ..., d) map from tokenizer features to LLM input embeddings."""
    h = config.feature_dim
    if config.projector == "linear":
        return nn.Linear(h, hidden_size)
    if config.projector == "mlp":
        return nn.Sequential(nn.Linear(h, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
    raise FmrilmError(f"unknown projector {config.projector!r}; choose one of {', '.join(PROJECTORS)}")


def attention_bias(query_pos: Tensor, key_pos: Tensor, key_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive mask (B, 1, Q, K): 0 where query i may see key j (key real and pos_j <= pos_i), else dtype min.

    Because the ROIs of a step share a position and every other token has its own, this one rule is the
    block-causal fMRI mask, the causal text mask and the padding mask at once, with or without a KV cache.
    """
    allowed = (key_pos[:, None, :] <= query_pos[:, :, None]) & key_valid[:, None, :].bool()  # (B, Q, K)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class FMRIModules(nn.Module):
    """The new weights around the LLM: projector, ROI embedding, codebook head, delimiter embeddings."""

    def __init__(self, config: FMRILMConfig, hidden_size: int, token_embeddings: Tensor):
        super().__init__()
        self.projector = build_projector(config, hidden_size)
        self.roi = nn.Parameter(torch.randn(config.n_rois, hidden_size) * 0.02)  # (N, d)
        self.head = nn.Linear(hidden_size, config.codebook_size)
        self.delimiters = None
        if config.use_delimiters:
            # Kept here rather than as new rows of the LLM's vocabulary: they are inputs only (never predicted),
            # and a separate (2, d) parameter stays trainable under LoRA without unfreezing the vocabulary.
            mean = token_embeddings.detach().float().mean(0)
            self.delimiters = nn.Parameter(mean + 0.02 * torch.randn(2, hidden_size))  # (2, d)

    def embed(self, features: Tensor) -> Tensor:
        """(B, W, N, h) features -> (B, W*N, d) time-major token embeddings."""
        return tokens_to_sequence(self.projector(features) + self.roi)


class FMRILanguageModel(nn.Module):
    """fMRI-LM Stage 2: LLM (LoRA, fully trainable or frozen) + fMRI projector, ROI embedding and code head.

    Parameters
    ----------
    config
        Sizes, adaptation mode and loss weights (see :class:`FMRILMConfig`).
    llm, tokenizer
        A causal LM and its tokenizer from :func:`load_backbone`; loaded from ``config.llm`` when omitted.
        The model takes ownership: LoRA layers are injected into ``llm`` and delimiters added to ``tokenizer``.
    """

    def __init__(self, config: FMRILMConfig, llm=None, tokenizer=None):
        super().__init__()
        if (llm is None) != (tokenizer is None):
            raise FmrilmError("pass both llm and tokenizer (from load_backbone), or neither to load config.llm")
        if llm is None:
            llm, tokenizer = load_backbone(config.llm)
        self.config = _resolve_lora(config, llm)
        self.tokenizer = tokenizer
        ids = _add_delimiters(tokenizer) if config.use_delimiters else []
        self.register_buffer("delimiter_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        token_embeddings = _unwrap(llm).get_input_embeddings().weight
        self.fmri = FMRIModules(self.config, backbone_info(llm)["hidden_size"], token_embeddings)
        self.llm = _prepare_llm(llm, self.config)

    @property
    def core(self):
        """The transformers ``*ForCausalLM`` (inside the peft wrapper when LoRA is on)."""
        return _unwrap(self.llm)

    # -- inputs -------------------------------------------------------------------------------------------
    def embed_text(self, ids: Tensor) -> Tensor:
        """(B, L) token ids -> (B, L, d) input embeddings; delimiter ids take the trained delimiter vectors."""
        table = self.core.get_input_embeddings()
        if self.fmri.delimiters is None:
            return table(ids)
        is_delim = ids[..., None] == self.delimiter_ids  # (B, L, 2)
        hit = is_delim.any(-1, keepdim=True)  # (B, L, 1)
        base = table(ids.masked_fill(hit[..., 0], 0))
        return torch.where(hit, is_delim.to(base.dtype) @ self.fmri.delimiters.to(base.dtype), base)

    def build_inputs(self, features: Tensor | None, text_ids: Tensor | None = None,
                     text_attention: Tensor | None = None) -> dict:
        """LLM inputs for ``[<fmri>] block [</fmri>] text`` (either part may be absent).

        Parameters
        ----------
        features : (B, W, N, h) float or None
            Frozen tokenizer encoder features.
        text_ids : (B, L) long or None
            Text after the block, right-padded.
        text_attention : (B, L) or None
            1 for real text tokens, 0 for padding; all ones when omitted.

        Returns
        -------
        dict
            ``inputs_embeds`` (B, S, d); ``attention_mask`` (B, 1, S, S) float, 0 = visible, dtype min =
            hidden; ``position_ids`` (B, S); ``token_mask`` (B, S) bool, True for real tokens;
            ``fmri_slice`` and ``text_slice``, the block's and the text's places in the sequence.
        """
        if features is None and text_ids is None:
            raise FmrilmError("build_inputs needs features, text_ids or both")
        embeds, positions = [], []
        if features is not None:
            block, block_pos = self._fmri_block(features)  # (B, S_f, d), (S_f,)
            embeds.append(block)
            positions.append(block_pos)
        start = sum(e.shape[1] for e in embeds)
        n_text = 0 if text_ids is None else text_ids.shape[1]
        if text_ids is not None:
            text_ids = text_ids.to(self.fmri.roi.device)
            embeds.append(self.embed_text(text_ids))
            first = int(positions[0][-1]) + 1 if positions else 0
            positions.append(torch.arange(first, first + n_text, device=text_ids.device))
        x = torch.cat(embeds, dim=1)  # (B, S, d)
        pos = torch.cat(positions).expand(x.shape[0], -1)  # (B, S)
        valid = torch.ones(pos.shape, dtype=torch.bool, device=x.device)
        if text_attention is not None:
            valid[:, start:] = text_attention.to(x.device).bool()
        first_roi = int(self.fmri.delimiters is not None)
        return {
            "inputs_embeds": x, "attention_mask": attention_bias(pos, pos, valid, x.dtype), "position_ids": pos,
            "token_mask": valid, "text_slice": slice(start, start + n_text),
            "fmri_slice": slice(first_roi, first_roi + self._n_tokens) if features is not None else slice(0, 0),
        }

    @property
    def _n_tokens(self) -> int:
        return self.config.n_steps * self.config.n_rois

    def _fmri_block(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """(B, W, N, h) -> block embeddings (B, W*N [+2], d) and their positions (W*N [+2],)."""
        c = self.config
        if features.ndim != 4 or tuple(features.shape[1:]) != (c.n_steps, c.n_rois, c.feature_dim):
            raise FmrilmError(f"features have shape {tuple(features.shape)}; expected (batch, {c.n_steps}, "
                              f"{c.n_rois}, {c.feature_dim}) = (batch, steps W, ROIs N, tokenizer hidden h)")
        block = self.fmri.embed(features.to(self.fmri.roi))  # (B, W*N, d)
        step = torch.arange(c.n_steps, device=block.device).repeat_interleave(c.n_rois)  # (W*N,)
        if self.fmri.delimiters is None:
            return block, step
        start, end = self.fmri.delimiters.to(block.dtype).expand(block.shape[0], -1, -1).split(1, dim=1)
        last = torch.tensor([c.n_steps + 1], device=block.device)
        return torch.cat([start, block, end], 1), torch.cat([step.new_zeros(1), step + 1, last])

    def _run(self, inputs: dict, past=None, use_cache: bool = False) -> tuple[Tensor, object]:
        """Final hidden states (B, S, d) of the LLM body (no vocabulary logits) and its KV cache."""
        out = self.core.base_model(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], past_key_values=past, use_cache=use_cache,
        )
        return out.last_hidden_state, out.past_key_values

    def _vocab_logits(self, hidden: Tensor) -> Tensor:
        return self.core.get_output_embeddings()(hidden)

    # -- training -----------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict[str, Tensor]:
        """Run the objectives whose inputs the batch holds and sum their weighted losses.

        Parameters
        ----------
        batch : dict
            ``features`` (B, W, N, h); ``codes`` (B, W, N) long, F2F targets; ``text_ids``, ``text_attention``,
            ``text_labels`` (B, L), F2T text after the block (labels default to the ids, padding ignored);
            ``lm_ids``, ``lm_attention``, ``lm_labels`` (B', L'), T2T text without fMRI.

        Returns
        -------
        dict
            ``loss`` (sum over the parts present of weight * part; absent when no part has targets),
            ``f2f_loss``, ``f2f_accuracy``, ``f2t_loss``, ``t2t_loss``; ``fmri_hidden`` (B, W, N, d);
            ``fmri_logits`` (B, W, N, K) with codes; ``text_logits`` (B, L, V) where entry i predicts text
            token i; ``lm_logits`` (B', L'-1, V) predicting ``lm_ids[:, 1:]``.
        """
        out: dict[str, Tensor] = {}
        if "features" in batch:
            out.update(self._fmri_and_text(batch))
        elif "text_ids" in batch:
            raise FmrilmError("batch has text_ids but no features; F2T text follows a scan, use lm_ids for text alone")
        if "lm_ids" in batch:
            out.update(self._t2t(batch["lm_ids"], batch.get("lm_attention"), batch.get("lm_labels")))
        loss = weighted_loss(out, {p: getattr(self.config, f"{p}_weight") for p in LOSS_PARTS})
        return out if loss is None else {"loss": loss, **out}

    def _fmri_and_text(self, batch: dict) -> dict[str, Tensor]:
        """One LLM pass over block + text: F2F from the block's states, F2T from the text's."""
        ids, attention = batch.get("text_ids"), batch.get("text_attention")
        inputs = self.build_inputs(batch["features"], ids, attention)
        hidden, _ = self._run(inputs)
        fmri_hidden = sequence_to_tokens(hidden[:, inputs["fmri_slice"]], self.config.n_rois)  # (B, W, N, d)
        out = {"fmri_hidden": fmri_hidden}
        if "codes" in batch:
            out["fmri_logits"] = self.fmri.head(fmri_hidden)  # (B, W, N, K)
            out.update(f2f_loss(out["fmri_logits"], batch["codes"]))
        if ids is not None:
            text = inputs["text_slice"]  # the state just before each text token predicts it
            logits = self._vocab_logits(hidden[:, text.start - 1 : text.stop - 1])  # (B, L, V)
            labels = batch.get("text_labels", labels_from(ids, attention))
            out.update(text_logits=logits, f2t_loss=token_loss(logits, labels, "text_labels"))
        return out

    def _t2t(self, ids: Tensor, attention: Tensor | None, labels: Tensor | None) -> dict[str, Tensor]:
        hidden, _ = self._run(self.build_inputs(None, ids, attention))
        logits = self._vocab_logits(hidden[:, :-1])  # (B, L-1, V), entry i predicts token i+1
        labels = (labels_from(ids, attention) if labels is None else labels)[:, 1:]
        return {"lm_logits": logits, "t2t_loss": token_loss(logits, labels, "lm_labels")}

    # -- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, features: Tensor, prompt_ids: Tensor | None = None, prompt_attention: Tensor | None = None,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, eos_token_id: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue ``[<fmri>] block [</fmri>] prompt`` with text, for a batch of scans.

        Parameters
        ----------
        features : (B, W, N, h)
            Tokenizer encoder features.
        prompt_ids, prompt_attention : (B, Lp) or None
            Right-padded prompts after the block (each row continues after its own last real token).
        max_new_tokens, do_sample, temperature, top_k, generator
            Greedy decoding by default; sampling from softmax(logits / temperature) over the top_k ids.
        eos_token_id : int or None
            Rows stop after it (tokenizer's eos by default); later entries hold the pad token.
        use_cache : bool
            Reuse the KV cache (one new token per step); False reruns the whole sequence each step.

        Returns
        -------
        (B, n) long, n <= max_new_tokens: the new tokens only.
        """
        if max_new_tokens < 1 or (do_sample and not temperature > 0):
            raise FmrilmError(f"generate needs max_new_tokens >= 1 and, when sampling, temperature > 0; got "
                              f"{max_new_tokens} and {temperature}")
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        inputs = self.build_inputs(features, prompt_ids, prompt_attention)
        embeds, pos, valid = inputs["inputs_embeds"], inputs["position_ids"], inputs["token_mask"]
        rows = torch.arange(embeds.shape[0], device=embeds.device)
        last = (valid * torch.arange(valid.shape[1], device=valid.device)).argmax(1)  # last real token per row
        hidden, past = self._run(inputs, use_cache=use_cache)
        state, next_pos = hidden[rows, last], pos[rows, last] + 1  # (B, d), (B,)
        done = torch.zeros_like(rows, dtype=torch.bool)
        tokens = []
        for _ in range(max_new_tokens):
            token = _pick(self._vocab_logits(state), do_sample, temperature, top_k, generator)
            tokens.append(token.masked_fill(done, self.tokenizer.pad_token_id))
            done |= token == eos
            if done.all() or len(tokens) == max_new_tokens:
                break
            pos, valid = torch.cat([pos, next_pos[:, None]], 1), torch.cat([valid, valid.new_ones(len(rows), 1)], 1)
            hidden, past, embeds = self._decode_step(self.embed_text(tokens[-1][:, None]), embeds, pos, valid, past)
            state, next_pos = hidden[:, -1], next_pos + 1
        return torch.stack(tokens, 1)

    def _decode_step(self, new: Tensor, embeds: Tensor, pos: Tensor, valid: Tensor, past) -> tuple:
        """Hidden states after appending ``new`` (B, 1, d): one query row against the KV cache ``past``, or
        (no cache) a rerun of the whole sequence. ``pos`` and ``valid`` (B, S) already include the new token."""
        if past is not None:
            step = {"inputs_embeds": new, "position_ids": pos[:, -1:],
                    "attention_mask": attention_bias(pos[:, -1:], pos, valid, new.dtype)}
            hidden, past = self._run(step, past, use_cache=True)
            return hidden, past, embeds
        embeds = torch.cat([embeds, new], 1)
        mask = attention_bias(pos, pos, valid, new.dtype)
        return self._run({"inputs_embeds": embeds, "position_ids": pos, "attention_mask": mask})[0], None, embeds

    # -- parameters and persistence ---------------------------------------------------------------------
    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameter counts: ``llm`` (LoRA adapters, all or none), ``projector``, ``roi_embedding``,
        ``fmri_head``, ``delimiters``, their ``trainable`` sum and the ``total`` of all parameters."""
        groups = {"llm": "llm.", "projector": "fmri.projector.", "roi_embedding": "fmri.roi",
                  "fmri_head": "fmri.head.", "delimiters": "fmri.delimiters"}
        named = list(self.named_parameters())  # tied weights appear once
        counts = {key: sum(p.numel() for n, p in named if p.requires_grad and n.startswith(prefix))
                  for key, prefix in groups.items()}
        counts["trainable"] = sum(p.numel() for _, p in named if p.requires_grad)
        counts["total"] = sum(p.numel() for _, p in named)
        return counts

    def save_pretrained(self, directory: str | os.PathLike, overwrite: bool = True) -> None:
        """Write ``config.json``, ``fmri_modules.safetensors`` and, for LoRA, ``llm/adapter_*`` (peft) or,
        after full fine-tuning, ``llm/model.safetensors``. A frozen base LLM is referenced by name only.

        The directory is built under a temporary name and renamed, so it appears complete or not at all.
        """
        from safetensors.torch import save_file, save_model

        with atomic_output_dir(directory, overwrite=overwrite) as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.fmri.state_dict().items()}
            save_file(state, str(tmp / FMRI_FILE), metadata={"format": FORMAT})
            if self.config.lora:
                # The vocabulary is never resized, so peft need not fetch the base config to check it.
                self.llm.save_pretrained(str(tmp / LLM_DIR), save_embedding_layers=False)
            elif self.config.full_finetune:
                (tmp / LLM_DIR).mkdir()
                save_model(self.core, str(tmp / LLM_DIR / LLM_WEIGHTS))  # tied weights stored once
            meta = {"format": FORMAT, "base_llm": self.config.llm, "backbone": backbone_info(self.llm)}
            write_json_atomic(tmp / CONFIG_FILE, {**meta, "config": self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FMRILanguageModel":
        """Rebuild a model saved by :meth:`save_pretrained` (base LLM from ``config.llm``), in eval mode."""
        from safetensors.torch import load_file, load_model

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / FMRI_FILE).is_file():
            raise FmrilmError(f"{directory} is not a saved fMRI-LM (needs {CONFIG_FILE} and {FMRI_FILE}); "
                              "write one with FMRILanguageModel.save_pretrained")
        saved = json.loads((directory / CONFIG_FILE).read_text())
        if saved.get("format") != FORMAT:
            raise FmrilmError(f"{directory / CONFIG_FILE} has format {saved.get('format')!r}, expected {FORMAT!r}")
        model = cls(FMRILMConfig.from_dict(saved["config"]))
        _load_strict(model.fmri, load_file(str(directory / FMRI_FILE)), directory / FMRI_FILE)
        if model.config.lora:
            _load_adapters(model.llm, directory / LLM_DIR)
        elif model.config.full_finetune:
            load_model(model.core, str(directory / LLM_DIR / LLM_WEIGHTS))
        return model.eval()


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, generator) -> Tensor:
    """(B, V) logits -> (B,) next ids: argmax, or a sample from the temperature-scaled top-k."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _resolve_lora(config: FMRILMConfig, llm) -> FMRILMConfig:
    """A copy of ``config`` with the per-architecture LoRA defaults filled in (the saved config is explicit)."""
    if not config.lora:
        return config
    r, alpha = default_lora_rank(llm)
    targets = config.lora_targets if config.lora_targets is not None else default_lora_targets(llm)
    return replace(config, lora_r=config.lora_r or r, lora_alpha=config.lora_alpha or alpha, lora_targets=list(targets))


def _add_delimiters(tokenizer) -> list[int]:
    """Register <fmri> and </fmri> as special tokens (idempotent) and return their ids."""
    tokenizer.add_tokens(list(DELIMITERS), special_tokens=True)
    return tokenizer.convert_tokens_to_ids(list(DELIMITERS))


def _prepare_llm(llm, config: FMRILMConfig):
    """Wrap with LoRA (base frozen), unfreeze everything (full fine-tune) or freeze the LLM."""
    if not config.lora:
        return llm.requires_grad_(config.full_finetune)
    from peft import LoraConfig, get_peft_model

    targets = set(config.lora_targets)
    matched = [m for name, m in llm.named_modules() if name.rsplit(".", 1)[-1] in targets]
    if not matched:
        raise FmrilmError(f"lora_targets {config.lora_targets} match no module of {type(llm).__name__}; "
                          "use names from model.named_modules() or null for the defaults")
    # GPT-2 stores its projections as Conv1D with transposed (in, out) weights; peft must know.
    transposed = all(type(m).__name__ == "Conv1D" for m in matched)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=sorted(targets),
                      lora_dropout=config.lora_dropout, fan_in_fan_out=transposed, bias="none")
    return get_peft_model(llm, lora)


def _load_adapters(llm, folder: Path) -> None:
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    if not (folder / "adapter_model.safetensors").is_file():
        raise FmrilmError(f"{folder} holds no adapter_model.safetensors; save the model again")
    result = set_peft_model_state_dict(llm, load_peft_weights(str(folder), device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise FmrilmError(f"LoRA adapters in {folder} do not fit the model (unexpected "
                          f"{list(result.unexpected_keys)[:3]}, missing {missing[:3]}); save the model again")


def _load_strict(module: nn.Module, state: dict, path: Path) -> None:
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()[:200]
        raise FmrilmError(f"{path} does not match its {CONFIG_FILE} ({first}); save the model again") from None
