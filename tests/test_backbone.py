"""The LLM backbone layer: tiny backbones, text features and their cache, LoRA defaults, the English corpus."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fmrilm.errors import FmrilmError
from fmrilm.lm.backbone import (
    TINY_ARCHS,
    backbone_info,
    default_lora_rank,
    default_lora_targets,
    load_backbone,
    text_features,
    tiny_backbone,
    token_embedding_table,
)
from fmrilm.lm.corpus import english_corpus, split_corpus

HIDDEN = {"gpt2": 32, "llama": 48, "qwen3": 64}
SHORT = "The brain rests."
LONGER = [
    "Resting-state networks are sets of regions whose activity rises and falls together over minutes.",
    "A second, much longer sentence makes sure that the short text above is padded by several tokens here.",
]


@pytest.fixture(scope="module", params=TINY_ARCHS)
def tiny(request):
    model, tokenizer = load_backbone(f"tiny-{request.param}")
    return request.param, model, tokenizer


def test_tiny_backbone_forward_and_features(tiny):
    arch, model, tokenizer = tiny
    info = backbone_info(model)
    assert info["hidden_size"] == HIDDEN[arch] and info["n_layers"] == 2 and info["vocab_size"] == 512
    assert info["model_type"] == arch and info["name"] == f"tiny-{arch}" and info["n_params"] > 10_000
    assert len(tokenizer) <= info["vocab_size"] and tokenizer.pad_token_id is not None
    assert tokenizer.padding_side == "right" and not model.training
    batch = tokenizer([SHORT, *LONGER], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, batch["input_ids"].shape[1], 512)
    features = text_features(model, tokenizer, [SHORT, *LONGER], batch_size=2)
    assert features.shape == (3, HIDDEN[arch]) and features.dtype == torch.float32
    assert torch.isfinite(features).all()


def test_tiny_backbone_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, _ = tiny_backbone("llama", seed=0)
    assert torch.equal(torch.rand(1), expected)
    b, _ = tiny_backbone("llama", seed=0)
    c, _ = tiny_backbone("llama", seed=1)
    assert torch.equal(token_embedding_table(a), token_embedding_table(b))
    assert not torch.equal(token_embedding_table(a), token_embedding_table(c))


def _alone_states(model, tokenizer, text):
    """(seq, hidden) final hidden states of one unpadded text."""
    with torch.no_grad():
        return model.base_model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]


def test_last_pooling_takes_last_non_pad_token(tiny):
    _, model, tokenizer = tiny
    batch = text_features(model, tokenizer, [*LONGER, SHORT], pooling="last", batch_size=8)
    alone = _alone_states(model, tokenizer, SHORT)
    torch.testing.assert_close(batch[2], alone[-1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(text_features(model, tokenizer, [SHORT])[0], alone[-1], atol=1e-5, rtol=1e-4)
    # The short text really was padded, and the state at the padded end differs from the right answer.
    encoded = tokenizer([*LONGER, SHORT], padding=True, return_tensors="pt")
    assert encoded["attention_mask"][2].sum() < encoded["attention_mask"].shape[1] - 3
    with torch.no_grad():
        padded_end = model.base_model(**encoded).last_hidden_state[2, -1]
    assert not torch.allclose(padded_end, alone[-1], atol=1e-3)


def test_mean_pooling_ignores_pads(tiny):
    _, model, tokenizer = tiny
    batch = text_features(model, tokenizer, [*LONGER, SHORT], pooling="mean", batch_size=8)
    expected = _alone_states(model, tokenizer, SHORT).mean(0)
    torch.testing.assert_close(batch[2], expected, atol=1e-5, rtol=1e-4)
    last = text_features(model, tokenizer, [SHORT], pooling="last")[0]
    assert not torch.allclose(last, expected, atol=1e-4)


def test_features_do_not_depend_on_batch_size_and_restore_training_mode():
    model, tokenizer = tiny_backbone("gpt2")
    texts = english_corpus(max_paragraphs=7, seed=3)
    model.train()  # dropout on: text_features must still be deterministic
    one = text_features(model, tokenizer, texts, batch_size=1, max_length=32)
    many = text_features(model, tokenizer, texts, batch_size=16, max_length=32)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-4)
    assert model.training


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_depth_pools_the_chosen_layer(arch):
    model, tokenizer = tiny_backbone(arch)
    texts = [SHORT, *LONGER]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        states = model.base_model(**batch, output_hidden_states=True).hidden_states  # embeddings + 2 layers
    for depth, layer in ((0.0, 0), (0.5, 1)):  # tiny backbones have 2 layers: depth 0.5 is layer 1's output
        expected = (states[layer] * mask).sum(1) / mask.sum(1)
        got = text_features(model, tokenizer, texts, pooling="mean", depth=depth)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    final = text_features(model, tokenizer, texts, pooling="mean")
    assert not torch.allclose(final, text_features(model, tokenizer, texts, pooling="mean", depth=0.5))


def test_depth_outside_zero_to_one_is_refused():
    model, tokenizer = tiny_backbone("gpt2")
    with pytest.raises(FmrilmError, match="depth 1.5 is not a fraction"):
        text_features(model, tokenizer, [SHORT], depth=1.5)


def _count_forwards(model):
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_feature_cache_is_reused_and_invalidated(tmp_path):
    model, tokenizer = tiny_backbone("qwen3")
    calls = _count_forwards(model)
    path = tmp_path / "cache" / "features.safetensors"
    first = text_features(model, tokenizer, [SHORT, *LONGER], cache=path)
    n_calls = len(calls)
    assert path.is_file() and n_calls > 0
    again = text_features(model, tokenizer, [SHORT, *LONGER], cache=path)
    assert len(calls) == n_calls and torch.equal(first, again)
    changed = text_features(model, tokenizer, [SHORT, LONGER[0]], cache=path)
    assert len(calls) > n_calls and changed.shape == (2, 64)
    n_calls = len(calls)
    text_features(model, tokenizer, [SHORT, LONGER[0]], pooling="mean", cache=path)
    assert len(calls) > n_calls
    n_calls = len(calls)
    text_features(model, tokenizer, [SHORT, LONGER[0]], pooling="mean", depth=0.5, cache=path)
    assert len(calls) > n_calls  # another layer: recomputed
    # Other weights (another seed) must not reuse the features of this model.
    other, _ = tiny_backbone("qwen3", seed=1)
    other_calls = _count_forwards(other)
    text_features(other, tokenizer, [SHORT, LONGER[0]], pooling="mean", cache=path)
    assert other_calls


def test_corrupt_cache_is_recomputed(tmp_path):
    model, tokenizer = tiny_backbone("gpt2")
    path = tmp_path / "features.safetensors"
    path.write_bytes(b"not a safetensors file")
    features = text_features(model, tokenizer, [SHORT], cache=path)
    assert torch.equal(text_features(model, tokenizer, [SHORT], cache=path), features)


def test_token_embedding_table_is_a_detached_copy(tiny):
    arch, model, _ = tiny
    table = token_embedding_table(model)
    weight = model.get_input_embeddings().weight
    assert table.shape == (512, HIDDEN[arch]) and not table.requires_grad and weight.requires_grad
    assert torch.equal(table, weight.detach())
    table.zero_()
    assert weight.detach().abs().sum() > 0


def test_default_lora_targets_name_real_modules(tiny):
    arch, model, _ = tiny
    targets = default_lora_targets(model)
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    assert targets and set(targets) <= leaves
    expected = ["c_attn", "c_proj", "c_fc"] if arch == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert targets == expected
    assert default_lora_rank(model) == ((16, 32) if arch == "gpt2" else (8, 16))


def test_lora_wrapped_backbone_still_works():
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny_backbone("llama")
    plain = text_features(model, tokenizer, [SHORT])
    rank, alpha = default_lora_rank(model)
    lora = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=default_lora_targets(model)))
    # LoRA's B matrices start at zero, so features are unchanged, and the helpers see through the wrapper.
    torch.testing.assert_close(text_features(lora, tokenizer, [SHORT]), plain)
    assert backbone_info(lora)["architecture"] == "LlamaForCausalLM"
    assert token_embedding_table(lora).shape == (512, 48)


def test_load_local_directory_adds_pad_token(tmp_path):
    model, tokenizer = tiny_backbone("gpt2")
    model.config.pad_token_id = None
    tokenizer.pad_token = None
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, loaded_tokenizer = load_backbone(tmp_path / "m")
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "<eos>"
    assert loaded.config.pad_token_id == loaded_tokenizer.eos_token_id
    assert torch.equal(token_embedding_table(loaded), token_embedding_table(model))


def test_english_corpus_from_pydoc_is_prose():
    paragraphs = english_corpus()
    words = sum(len(p.split()) for p in paragraphs)
    # pydoc_data.topics holds ~65,000 words, about half of it code, grammar and tables (see corpus.py).
    assert len(paragraphs) >= 600 and words >= 28_000
    assert len(set(paragraphs)) == len(paragraphs) and all(len(p.split()) >= 20 for p in paragraphs)
    for paragraph in paragraphs:
        assert "\n" not in paragraph and not paragraph.endswith(":")
        assert ">>>" not in paragraph and "::=" not in paragraph and "+---" not in paragraph and "|" not in paragraph
        assert paragraph[-1] in ".!?\"”’)" and not paragraph.lstrip().startswith(("def ", "class ", "import "))
    assert len(english_corpus(min_words=1)) > len(paragraphs)


def test_english_corpus_is_deterministic_and_subsamples():
    assert english_corpus() == english_corpus()
    subset = english_corpus(max_paragraphs=50, seed=1)
    assert subset == english_corpus(max_paragraphs=50, seed=1) != english_corpus(max_paragraphs=50, seed=2)
    full = english_corpus()
    assert len(subset) == 50 and [full.index(p) for p in subset] == sorted(full.index(p) for p in subset)


def test_split_corpus_partitions_deterministically():
    paragraphs = english_corpus(max_paragraphs=100)
    train, held = split_corpus(paragraphs, 0.1, seed=0)
    assert (train, held) == split_corpus(paragraphs, 0.1, seed=0)
    assert len(held) == 10 and sorted(train + held) == sorted(paragraphs)
    assert split_corpus(paragraphs, 0.1, seed=1)[1] != held
    with pytest.raises(FmrilmError, match="held_out_fraction=1.5"):
        split_corpus(paragraphs, 1.5)


def test_english_corpus_from_text_files(tmp_path):
    first = tmp_path / "a.txt"
    first.write_text("One short line.\n\nThis paragraph spans\ntwo lines of text.\n\n\n  Third one here.  \n")
    second = tmp_path / "b.txt"
    second.write_text("This paragraph spans two lines of text.\n\nAnother paragraph.")
    assert english_corpus([first, second], min_words=1) == [
        "One short line.",
        "This paragraph spans two lines of text.",
        "Third one here.",
        "Another paragraph.",
    ]
    assert english_corpus(str(first), min_words=4) == ["This paragraph spans two lines of text."]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tiny_backbone("bert"), "unknown tiny backbone architecture 'bert'; choose one of gpt2, llama, qwen3"),
        (lambda: load_backbone("tiny-mamba"), "choose one of gpt2, llama, qwen3"),
        (lambda: english_corpus(["/no/such/corpus.txt"]), r"corpus file /no/such/corpus.txt not found"),
        (lambda: load_backbone("/no/such/model/dir"), r"model directory /no/such/model/dir not found"),
        (lambda: load_backbone("./no/such/model"), r"model directory no/such/model not found"),
    ],
)
def test_user_errors(call, message):
    with pytest.raises(FmrilmError, match=message):
        call()


def test_unknown_pooling_and_bad_directory(tmp_path):
    model, tokenizer = tiny_backbone("gpt2")
    with pytest.raises(FmrilmError, match="unknown pooling 'max'; choose one of last, mean"):
        text_features(model, tokenizer, [SHORT], pooling="max")
    with pytest.raises(FmrilmError, match="text 1 is empty; remove empty texts"):
        text_features(model, tokenizer, [SHORT, ""])
    with pytest.raises(FmrilmError, match="has no config.json"):
        load_backbone(tmp_path)


def test_uncached_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FmrilmError, match="model 'fmrilm-test/no-such-model' could not be found locally.*hf download"):
        load_backbone("fmrilm-test/no-such-model")
    assert time.perf_counter() - start < 5


@pytest.mark.slow
def test_smollm2_is_cached_and_speaks_english(tmp_path, monkeypatch):
    monkeypatch.setenv("FMRILM_CACHE", str(tmp_path))
    start = time.perf_counter()
    load_backbone("smollm2-135m")
    build_seconds = time.perf_counter() - start
    assert (tmp_path / "backbones" / "smollm2-135m" / "model.safetensors").is_file()
    start = time.perf_counter()
    model, tokenizer = load_backbone("smollm2-135m")
    cached_seconds = time.perf_counter() - start
    info = backbone_info(model)
    assert (info["hidden_size"], info["n_layers"], info["vocab_size"]) == (576, 30, 49152)
    _, held_out = split_corpus(english_corpus(), 0.1, seed=0)
    perplexities = [_perplexity(model, tokenizer, text) for text in held_out[:5]]
    print(f"\nbuild {build_seconds:.1f} s, cached load {cached_seconds:.1f} s, perplexities {perplexities}")
    assert cached_seconds < 10
    assert perplexities[0] < 100 and max(perplexities) < 100
    features = text_features(model, tokenizer, held_out[:4])
    assert features.shape == (4, 576) and torch.isfinite(features).all()


def _perplexity(model, tokenizer, text: str) -> float:
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        loss = model(**batch, labels=batch["input_ids"]).loss
    return round(math.exp(loss.item()), 2)
