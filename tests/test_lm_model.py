"""Stage 2 model: inputs, positions and masks, objectives, LoRA counts, persistence and generation.

Tiny random GPT-2 / Llama / Qwen3 backbones with an N=7 ROI, W=3 step, h=16, K=32 fMRI grid. Perturbations
are random vectors, never constant shifts: GPT-2's LayerNorm removes a constant added to every feature of a
token, which would make a visible token look invisible.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from fmrilm.errors import FmrilmError
from fmrilm.lm.constants import DELIMITERS, IGNORE_INDEX
from fmrilm.lm.model import FMRILanguageModel, FMRILMConfig, attention_bias, build_projector
from fmrilm.lm.objectives import collate, f2f_loss, f2t_example, t2t_batch
from fmrilm.tokenizer.config import load_preset
from fmrilm.tokenizer.model import FMRITokenizer

ARCHS = ("gpt2", "llama", "qwen3")
N, W, H, K = 7, 3, 16, 32
TEXTS = ["The default mode network is strongly connected at rest.", "Weak visual coupling."]

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def make_model(arch: str, perturb: bool = True, **kwargs) -> FMRILanguageModel:
    """A seeded model; trainable weights nudged so that LoRA's zero-initialised B matrices matter."""
    torch.manual_seed(0)
    config = FMRILMConfig(llm=f"tiny-{arch}", n_rois=N, n_steps=W, feature_dim=H, codebook_size=K, **kwargs)
    model = FMRILanguageModel(config).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return model


def features(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, W, N, H, generator=torch.Generator().manual_seed(seed))


def text_batch(model: FMRILanguageModel) -> dict:
    """Two descriptions of unequal length, right-padded, with a prompt the loss ignores."""
    examples = [f2t_example(model.tokenizer, t, max_len=24, prompt="Describe:") for t in TEXTS]
    for e, seed in zip(examples, (2, 3)):
        codes = torch.randint(0, K, (W, N), generator=torch.Generator().manual_seed(seed))
        e.update(features=features(1, seed)[0], codes=codes)
    return collate(examples, model.tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(projector="conv"), "projector must be one of mlp, linear, got 'conv'"),
        (dict(lora=True, full_finetune=True), "lora and full_finetune exclude each other"),
        (dict(n_rois=0), "n_rois must be an integer >= 1"),
        (dict(codebook_size=1), "codebook_size must be >= 2"),
        (dict(f2f_weight=-1.0), "f2f_weight must be a finite number >= 0"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(lora_targets=[]), "lora_targets must be a non-empty list"),
        (dict(lora_r=0), "lora_r must be an integer >= 1"),
        (dict(use_delimiters="yes"), "use_delimiters must be true or false"),
        (dict(llm=""), "llm must be a model name"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(FmrilmError, match=match):
        FMRILMConfig(**kwargs)


def test_config_round_trip_and_projector_dispatch():
    config = FMRILMConfig(llm="tiny-llama", n_rois=N, n_steps=W, feature_dim=H, codebook_size=K,
                          lora_targets=("q_proj",))
    assert FMRILMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(FmrilmError, match="unknown fMRI-LM settings \\['colour'\\]"):
        FMRILMConfig.from_dict({**config.to_dict(), "colour": 1})
    assert isinstance(build_projector(config, 48), torch.nn.Sequential)
    config.projector = "conv"  # bypasses validation, as a hand-edited object would
    with pytest.raises(FmrilmError, match="unknown projector 'conv'"):
        build_projector(config, 48)
    tok = load_preset("tiny", n_rois=N, length=24, patch_size=8, hidden=H, heads=4, codebook_size=K)
    derived = FMRILMConfig.from_tokenizer(tok, "runs/tok", llm="tiny-gpt2")
    assert (derived.n_rois, derived.n_steps, derived.feature_dim, derived.codebook_size) == (N, W, H, K)
    assert derived.tokenizer_dir == "runs/tok"


def test_bad_inputs_are_refused():
    model = make_model("llama", perturb=False)
    batch = text_batch(model)
    with pytest.raises(FmrilmError, match=r"features have shape \(2, 3, 6, 16\); expected \(batch, 3, 7, 16\)"):
        model({"features": torch.zeros(2, W, N - 1, H)})
    with pytest.raises(FmrilmError, match="text_ids but no features"):
        model({"text_ids": batch["text_ids"]})
    with pytest.raises(FmrilmError, match=r"codes must have shape \(2, 3, 7\) with values in \[0, 32\)"):
        model({"features": batch["features"], "codes": batch["codes"] + K})
    with pytest.raises(FmrilmError, match="the batch has no text to learn"):
        model({**batch, "text_labels": torch.full_like(batch["text_ids"], IGNORE_INDEX)})
    with pytest.raises(FmrilmError, match="match no module"):
        make_model("llama", lora_targets=["c_attn"])
    with pytest.raises(FmrilmError, match="generate needs max_new_tokens >= 1"):
        model.generate(batch["features"], max_new_tokens=0)


# ------------------------------------------------------------------------------------ inputs and masks
@pytest.mark.parametrize("delimiters", [False, True])
@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_position_ids(arch, delimiters):
    model = make_model(arch, use_delimiters=delimiters)
    batch = text_batch(model)
    L = batch["text_ids"].shape[1]
    inputs = model.build_inputs(batch["features"], batch["text_ids"], batch["text_attention"])
    d = model.core.config.get_text_config().hidden_size
    extra = 2 if delimiters else 0
    S = W * N + extra + L
    assert inputs["inputs_embeds"].shape == (2, S, d) and inputs["attention_mask"].shape == (2, 1, S, S)
    pos = inputs["position_ids"]
    block = pos[:, inputs["fmri_slice"]].reshape(2, W, N)  # time-major: token w*N + n is (w, n)
    first_step = 1 if delimiters else 0
    assert torch.equal(block, (torch.arange(W)[:, None] + first_step).expand(2, W, N))  # a step shares one id
    text = inputs["text_slice"]
    assert text.stop == S and pos[0, text.start] == (W + 2 if delimiters else W)
    assert torch.equal(pos[:, text], (torch.arange(L) + pos[0, text.start]).expand(2, L))
    if delimiters:  # <fmri> at 0, </fmri> right after the last step at W + 1
        assert pos[0, 0] == 0 and pos[0, W * N + 1] == W + 1
    out = model(batch)
    assert out["fmri_hidden"].shape == (2, W, N, d) and out["fmri_logits"].shape == (2, W, N, K)
    assert out["text_logits"].shape == (2, L, 512) and out["loss"].ndim == 0


@pytest.mark.parametrize("delimiters", [False, True])
def test_mask_values(delimiters):
    model = make_model("llama", use_delimiters=delimiters)
    batch = text_batch(model)
    inputs = model.build_inputs(batch["features"], batch["text_ids"], batch["text_attention"])
    kinds = [("start", 0)] if delimiters else []
    kinds += [("fmri", w) for w in range(W) for _ in range(N)] + ([("end", 0)] if delimiters else [])
    kinds += [("text", t) for t in range(batch["text_ids"].shape[1])]
    valid = torch.cat([torch.ones(2, len(kinds) - batch["text_ids"].shape[1]), batch["text_attention"]], 1).bool()

    def sees(query, key) -> bool:  # the paper's rule, written out per kind of token
        (qk, qi), (kk, ki) = query, key
        if kk == "start" or qk == "text":
            return kk != "text" or ki <= qi
        if qk == "fmri":
            return kk == "fmri" and ki <= qi
        return qk == "end" and kk != "text"

    allowed = torch.tensor([[sees(q, k) for k in kinds] for q in kinds])
    expected = allowed[None] & valid[:, None, :]
    mask = inputs["attention_mask"][:, 0]
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert torch.equal(mask == 0, expected)
    assert not (mask[1] == 0)[:, ~valid[1]].any() and (~valid[1]).sum() > 0  # padded keys hidden from all


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mask_is_applied_by_the_llm(arch, impl):
    model = make_model(arch)
    model.core.set_attn_implementation(impl)
    batch = text_batch(model)
    base = model(batch)
    noise = torch.randn(2, N, H)

    later = dict(batch, features=batch["features"].clone())
    later["features"][:, 2] += noise  # step 2 changes
    out = model(later)
    assert torch.allclose(out["fmri_hidden"][:, :2], base["fmri_hidden"][:, :2], atol=1e-6)  # earlier steps blind
    assert not torch.allclose(out["fmri_hidden"][:, 2], base["fmri_hidden"][:, 2])
    assert not torch.allclose(out["text_logits"], base["text_logits"])  # text reads the whole block

    within = dict(batch, features=batch["features"].clone())
    within["features"][:, 1, 4] += noise[:, 0]  # ROI 4 of step 1 changes
    out = model(within)
    assert not torch.allclose(out["fmri_hidden"][:, 1, 0], base["fmri_hidden"][:, 1, 0])  # ROI 0 sees ROI 4 (all archs)
    assert torch.allclose(out["fmri_hidden"][:, 0], base["fmri_hidden"][:, 0], atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_text_is_causal_and_padding_is_invisible(arch):
    model = make_model(arch)
    batch = text_batch(model)
    base = model(batch)
    changed = dict(batch, text_ids=batch["text_ids"].clone())
    changed["text_ids"][:, 2] = 100  # entry i of text_logits predicts token i from the tokens before it
    out = model(changed)
    assert torch.allclose(out["text_logits"][:, :3], base["text_logits"][:, :3], atol=1e-5)
    assert not torch.allclose(out["text_logits"][:, 3], base["text_logits"][:, 3])
    assert torch.allclose(out["fmri_hidden"], base["fmri_hidden"], atol=1e-6)  # the block never sees text
    padded = dict(batch, text_ids=batch["text_ids"].clone())
    pad = batch["text_attention"][1] == 0
    padded["text_ids"][1, pad] = 77
    out = model(padded)
    real = batch["text_attention"][1].bool()
    assert torch.allclose(out["text_logits"][1, real], base["text_logits"][1, real], atol=1e-5)


# ------------------------------------------------------------------------------------------ objectives
def test_f2f_targets_are_shifted_by_one_step():
    codes = torch.randperm(2 * W * N).reshape(2, W, N) % K  # distinct enough that any wrong shift scores badly
    right = torch.full((2, W, N, K), -20.0)
    right[:, :-1].scatter_(-1, codes[:, 1:, :, None], 20.0)  # token (w, n) -> code of (w+1, n)
    out = f2f_loss(right, codes)
    assert out["f2f_accuracy"] == 1.0 and out["f2f_loss"] < 1e-6
    one_token = torch.full((2, W * N, K), -20.0)
    one_token[:, :-1].scatter_(-1, codes.flatten(1)[:, 1:, None], 20.0)  # the wrong, token-level shift
    assert f2f_loss(one_token.reshape(2, W, N, K), codes)["f2f_accuracy"] < 0.2

    model = make_model("qwen3")
    batch = text_batch(model)
    out = model(batch)
    manual = F.cross_entropy(out["fmri_logits"][:, :-1].reshape(-1, K), batch["codes"][:, 1:].reshape(-1))
    assert torch.allclose(out["f2f_loss"], manual)


def test_f2t_labels_cover_the_text_only():
    model = make_model("gpt2")
    tok = model.tokenizer
    prompt = tok("Describe:", add_special_tokens=False).input_ids
    example = f2t_example(tok, TEXTS[1], max_len=24, prompt="Describe:")
    answer = tok(TEXTS[1], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert example["text_ids"].tolist() == prompt + answer
    assert example["text_labels"].tolist() == [IGNORE_INDEX] * len(prompt) + answer
    cut = f2t_example(tok, TEXTS[0], max_len=len(prompt) + 3, prompt="Describe:")
    assert cut["text_labels"].tolist()[-3:] == tok(TEXTS[0], add_special_tokens=False).input_ids[:3]  # no eos

    batch = text_batch(model)
    lengths = batch["text_attention"].sum(1)
    n_ignored = (batch["text_labels"] == IGNORE_INDEX).sum()
    assert n_ignored == 2 * len(prompt) + (batch["text_ids"].shape[1] - lengths).sum()  # prompts + padding
    out = model(batch)
    assert out["text_logits"].shape[1] == batch["text_ids"].shape[1]  # no fMRI position has a text logit
    scored = batch["text_labels"] != IGNORE_INDEX
    manual = F.cross_entropy(out["text_logits"][scored], batch["text_labels"][scored])
    assert torch.allclose(out["f2t_loss"], manual)


def test_loss_is_the_weighted_sum_and_t2t_alone_works():
    model = make_model("llama")
    batch = {**text_batch(model), **t2t_batch(model.tokenizer, TEXTS + ["Rest."], max_len=12)}
    assert batch["lm_ids"].shape == (3, 12) and batch["lm_attention"][2, -1] == 0
    out = model(batch)
    expected = out["f2t_loss"] + 0.1 * out["f2f_loss"] + 0.5 * out["t2t_loss"]
    assert torch.allclose(out["loss"], expected) and 0 <= out["f2f_accuracy"] <= 1
    alone = model({"lm_ids": batch["lm_ids"], "lm_attention": batch["lm_attention"]})
    assert set(alone) == {"loss", "t2t_loss", "lm_logits"} and torch.allclose(alone["loss"], 0.5 * out["t2t_loss"])
    assert "loss" not in model({"features": batch["features"]})  # no targets, no loss


def test_tokenizer_features_feed_the_model():
    tok_config = load_preset("tiny", n_rois=N, length=24, patch_size=8, hidden=H, heads=4, codebook_size=K,
                             codebook_dim=8, kmeans_init=False)
    fmri_tokenizer = FMRITokenizer(tok_config).eval()
    with torch.no_grad():
        codes, feats = fmri_tokenizer.encode(torch.randn(2, 24, N))
    torch.manual_seed(0)
    model = FMRILanguageModel(FMRILMConfig.from_tokenizer(tok_config, llm="tiny-llama")).eval()
    out = model({"features": feats, "codes": codes})
    assert torch.isfinite(out["loss"]) and torch.allclose(out["loss"], 0.1 * out["f2f_loss"])


# ------------------------------------------------------------------------------- trainable parameters
def lora_params(model: FMRILanguageModel, arch: str, r: int) -> int:
    """r * (in + out) summed over every adapted projection, from the backbone's sizes."""
    c = model.core.config
    if arch == "gpt2":
        d = c.n_embd
        shapes = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]  # c_attn, attn c_proj, c_fc, mlp c_proj
    else:
        d, i = c.hidden_size, c.intermediate_size
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, i), (d, i), (i, d)]  # q k v o gate up down
    return c.num_hidden_layers * sum(r * (a + b) for a, b in shapes)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_trainable_counts_are_analytic(arch):
    model = make_model(arch, perturb=False)
    r = 16 if arch == "gpt2" else 8
    assert model.config.lora_r == r and model.config.lora_alpha == 2 * r
    d = model.core.config.get_text_config().hidden_size
    counts = model.trainable_parameters()
    expected = {"llm": lora_params(model, arch, r), "projector": H * d + d + d * d + d, "roi_embedding": N * d,
                "fmri_head": d * K + K, "delimiters": 2 * d}
    assert {k: counts[k] for k in expected} == expected
    assert counts["trainable"] == sum(expected.values())
    for name, p in model.llm.named_parameters():
        assert p.requires_grad == ("lora_" in name), name  # base weights frozen


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_full_finetune_and_frozen_modes(arch):
    full = make_model(arch, perturb=False, lora=False, full_finetune=True)
    assert all(p.requires_grad for p in full.parameters())
    counts = full.trainable_parameters()
    assert counts["trainable"] == counts["total"] and counts["llm"] == sum(p.numel() for p in full.llm.parameters())
    frozen = make_model(arch, perturb=False, lora=False)
    assert frozen.trainable_parameters()["llm"] == 0 and not any(p.requires_grad for p in frozen.llm.parameters())
    loss = frozen(text_batch(frozen))["loss"]
    loss.backward()  # gradients still reach the fMRI modules through the frozen LLM
    assert frozen.fmri.projector[0].weight.grad.abs().sum() > 0 and frozen.fmri.delimiters.grad is not None


# --------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("mode", ["lora", "full", "frozen"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_save_load_round_trip(tmp_path, arch, mode):
    flags = {"lora": {}, "full": dict(lora=False, full_finetune=True), "frozen": dict(lora=False)}[mode]
    model = make_model(arch, **flags)
    batch = text_batch(model)
    before = model(batch)
    model.save_pretrained(tmp_path / "lm")
    files = {p.relative_to(tmp_path / "lm").as_posix() for p in (tmp_path / "lm").rglob("*")}
    assert {"config.json", "fmri_modules.safetensors"} <= files
    assert ("llm/adapter_model.safetensors" in files) == (mode == "lora")
    assert ("llm/model.safetensors" in files) == (mode == "full")  # the base LLM is referenced, not copied
    saved = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert saved["base_llm"] == f"tiny-{arch}" and saved["config"]["lora_r"] == model.config.lora_r
    loaded = FMRILanguageModel.from_pretrained(tmp_path / "lm")
    after = loaded(batch)
    for key in ("text_logits", "fmri_logits", "loss"):
        assert torch.equal(before[key], after[key]), key
    with pytest.raises(FmrilmError, match="is not a saved fMRI-LM"):
        FMRILanguageModel.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("arch", ARCHS)
def test_generation_cache_batching_and_teacher_forcing_agree(arch):
    model = make_model(arch)
    tok = model.tokenizer
    prompts = tok(["Describe this scan in words:", "Describe:"], padding=True, return_tensors="pt")
    feats = features()
    greedy = model.generate(feats, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, eos_token_id=-1)
    uncached = model.generate(feats, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, eos_token_id=-1,
                              use_cache=False)
    assert greedy.shape == (2, 6) and torch.equal(greedy, uncached)
    sampled = [model.generate(feats, prompts.input_ids, prompts.attention_mask, max_new_tokens=6, do_sample=True,
                              top_k=50, eos_token_id=-1, use_cache=cache, generator=torch.Generator().manual_seed(5))
               for cache in (True, False)]
    assert torch.equal(*sampled)
    n = int(prompts.attention_mask[1].sum())
    alone = model.generate(feats[1:], prompts.input_ids[1:, :n], max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(alone[0], greedy[1])  # padding of the other row changes nothing
    forced = model({"features": feats[1:], "text_ids": torch.cat([prompts.input_ids[1:, :n], greedy[1:]], 1)})
    assert torch.equal(forced["text_logits"][0, n:].argmax(-1), greedy[1])  # same positions and masks as training


def test_generation_stops_at_eos_and_pads():
    model = make_model("llama", use_delimiters=False)
    feats = features()
    free = model.generate(feats, max_new_tokens=5, eos_token_id=-1)
    stop = int(free[0, 1])
    out = model.generate(feats, max_new_tokens=5, eos_token_id=stop)
    first = (free[0] == stop).nonzero()[0, 0]
    assert torch.equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1 :] == model.tokenizer.pad_token_id).all()


def test_delimiters_are_special_tokens_with_trained_embeddings():
    model = make_model("qwen3")
    ids = model.tokenizer(f"a {DELIMITERS[0]} b {DELIMITERS[1]}", add_special_tokens=False).input_ids
    assert model.delimiter_ids.tolist() == [i for i in ids if i in model.delimiter_ids.tolist()]
    embedded = model.embed_text(model.delimiter_ids[None])
    assert torch.equal(embedded[0], model.fmri.delimiters)
    inputs = model.build_inputs(features(1))
    assert torch.equal(inputs["inputs_embeds"][0, [0, -1]], model.fmri.delimiters)


def test_attention_bias_with_cache_row():
    pos = torch.tensor([[0, 0, 1, 1, 2, 3]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0]]).bool()
    keys, key_valid = torch.cat([pos, torch.tensor([[4]])], 1), torch.cat([valid, valid[:, :1]], 1)
    row = attention_bias(torch.tensor([[4]]), keys, key_valid, torch.float32)  # one cached decoding step
    assert row.shape == (1, 1, 1, 7) and torch.equal(row[0, 0, 0] == 0, torch.tensor([1, 1, 1, 1, 1, 0, 1]).bool())
