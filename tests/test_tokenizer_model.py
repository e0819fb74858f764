"""Stage 1 tokenizer: token order, shapes, quantizers, losses, persistence, presets, parameter counts.

Tiny models on seeded synthetic scans with unequal sizes (N = 11 ROIs, T = 64, P = 16 -> W = 4) so that
a transposed grid cannot pass.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fmrilm.errors import FmrilmError
from fmrilm.tokenizer import (
    ContrastiveLoss,
    DomainAdversarialLoss,
    DomainClassifier,
    FMRITokenizer,
    FMRITokenizerForTraining,
    TokenizerConfig,
    TokenizerLoss,
    clip_loss,
    grl_lambda,
    list_presets,
    load_preset,
    patchify,
    reverse_gradient,
    sequence_to_tokens,
    siglip_loss,
    tokens_to_sequence,
    unpatchify,
)
from fmrilm.tokenizer.model import pool_features, sincos_embedding

N, T, P = 11, 64, 16
W = T // P


def small_config(**overrides) -> TokenizerConfig:
    settings = dict(n_rois=N, length=T, patch_size=P, hidden=32, layers=2, heads=4, codebook_size=64,
                    codebook_dim=16, decoder_layers=1, text_dim=20, llm_embed_dim=24, shared_dim=16,
                    domain_hidden=256, fsq_levels=(8, 5, 5, 5))
    return TokenizerConfig(**{**settings, **overrides})


def scans(batch: int = 8, length: int = T, n_rois: int = N, seed: int = 0) -> torch.Tensor:
    """(B, T, N) smooth oscillations with per-scan phases and amplitudes, roughly unit variance."""
    rng = np.random.default_rng(seed)
    t = np.arange(length)[None, :, None]
    freq = rng.uniform(0.02, 0.12, (1, 1, n_rois))
    phase = rng.uniform(0, 2 * np.pi, (batch, 1, n_rois))
    amp = rng.uniform(0.7, 1.4, (batch, 1, n_rois))
    x = amp * np.sin(2 * np.pi * freq * t + phase) + 0.05 * rng.standard_normal((batch, length, n_rois))
    return torch.tensor(x * math.sqrt(2), dtype=torch.float32)


def gradients(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N, 3))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ token order
def test_grid_is_time_major():
    x = torch.arange(2 * T * N, dtype=torch.float32).reshape(2, T, N)  # every value identifies (b, t, n)
    patches = patchify(x, P)
    sequence = tokens_to_sequence(patches)
    assert patches.shape == (2, W, N, P) and sequence.shape == (2, W * N, P)
    for w in range(W):
        for n in range(N):
            torch.testing.assert_close(sequence[:, w * N + n], x[:, w * P:(w + 1) * P, n])
    torch.testing.assert_close(sequence_to_tokens(sequence, N), patches)
    torch.testing.assert_close(unpatchify(patches), x)
    model = FMRITokenizer(small_config())
    torch.testing.assert_close(model.sequence_to_tokens(model.tokens_to_sequence(patches)), patches)


def test_changing_one_patch_changes_only_its_sequence_position():
    model = FMRITokenizer(small_config())
    x = scans(3)
    before = tokens_to_sequence(model.embed(patchify(x, P)))  # (B, W*N, h)
    w, n = 2, 7
    x[:, w * P:(w + 1) * P, n] += 1.0
    after = tokens_to_sequence(model.embed(patchify(x, P)))
    changed = (after - before).abs().sum(-1) > 0  # (B, W*N)
    assert changed.sum(1).tolist() == [1, 1, 1]
    assert changed[:, w * N + n].all()


def test_encoder_sees_patches_in_time_major_order():
    """Build the encoder input by hand, position w*N + n = patch w of ROI n, and compare with the model."""
    model = FMRITokenizer(small_config()).eval()
    x = scans(2)
    roi, time = model.embed.roi_embedding(), model.embed.time
    by_hand = torch.stack([model.embed.patch(x[:, w * P:(w + 1) * P, n]) + time[w] + roi[n]
                           for w in range(W) for n in range(N)], dim=1)  # (B, W*N, h)
    with torch.no_grad():
        expected = model.encoder(by_hand)
        features = model.encode_features(x)  # (B, W, N, h)
    for w in range(W):
        for n in range(N):
            torch.testing.assert_close(features[:, w, n], expected[:, w * N + n])


def test_positions_are_time_plus_roi():
    model = FMRITokenizer(small_config())
    positions = model.embed.positions()
    assert positions.shape == (W, N, 32)
    torch.testing.assert_close(model.embed.time, sincos_embedding(W, 32))
    torch.testing.assert_close(positions[3, 5], model.embed.time[3] + model.embed.roi_embedding()[5])


# ----------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
@pytest.mark.parametrize("patch_size", [32, 160])
def test_output_shapes(quantizer, patch_size):
    config = small_config(length=160, patch_size=patch_size, quantizer=quantizer)
    model = FMRITokenizer(config)
    n_patches = 160 // patch_size
    x = scans(3, length=160)
    out = model({"x": x})
    assert out["recon"].shape == (3, 160, N)
    assert out["codes"].shape == (3, n_patches, N) and out["codes"].dtype == torch.long
    assert out["features"].shape == out["quantized"].shape == (3, n_patches, N, 32)
    assert out["pooled"].shape == (3, 32) and out["commit_loss"].shape == ()
    codes, features = model.encode(x)
    assert codes.shape == (3, n_patches, N) and features.shape == (3, n_patches, N, 32)
    assert model.decode(codes).shape == (3, 160, N)
    assert int(codes.max()) < config.vocab_size


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_forward_backward(quantizer):
    model = FMRITokenizerForTraining(small_config(quantizer=quantizer))
    losses = model({"x": scans(4), "text_features": torch.randn(4, 20), "text_token_embeddings": torch.randn(9, 24)})
    assert set(losses) == {"loss", "recon_loss", "commit_loss", "contrast_loss", "domain_loss"}
    losses["loss"].backward()
    grads = [p.grad for p in model.tokenizer.encoder.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_bad_input_shapes():
    model = FMRITokenizer(small_config())
    with pytest.raises(FmrilmError, match=r"expects \(batch, 64, 11\)"):
        model({"x": torch.zeros(2, 64, 12)})
    with pytest.raises(FmrilmError, match=r"decode expects \(batch, 4, 11\)"):
        model.decode(torch.zeros(2, 11, 4, dtype=torch.long))


# --------------------------------------------------------------------------------- domain-adversarial
def test_dann_ramp():
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1) == pytest.approx(0.98661, abs=1e-5)
    assert grl_lambda(1.0) == pytest.approx(0.9999092, abs=1e-7)
    ramp = [grl_lambda(p) for p in np.linspace(0, 1, 11)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))
    with pytest.raises(FmrilmError, match="progress must be a number in"):
        grl_lambda(1.5)


def test_domain_classifier_architecture():
    clf = DomainClassifier(32)
    assert [type(m) for m in clf] == [nn.Linear, nn.GELU, nn.Linear]
    assert (clf[0].in_features, clf[0].out_features, clf[2].in_features, clf[2].out_features) == (32, 256, 256, 2)


def test_reversed_gradient_is_minus_lambda_times_the_plain_gradient():
    clf = DomainClassifier(6, 16).double()
    features = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.zeros(5, dtype=torch.long)
    strength = 0.7
    (reversed_grad,) = torch.autograd.grad(F.cross_entropy(clf(reverse_gradient(features, strength)), labels), features)
    (plain,) = torch.autograd.grad(F.cross_entropy(clf(features), labels), features)
    # The plain gradient checked by central differences on one entry, then the reversal on all entries.
    eps, bumped = 1e-6, features.detach().clone()
    with torch.no_grad():
        bumped[2, 3] += eps
        up = F.cross_entropy(clf(bumped), labels)
        bumped[2, 3] -= 2 * eps
        numeric = (up - F.cross_entropy(clf(bumped), labels)) / (2 * eps)
    assert float(plain[2, 3]) == pytest.approx(float(numeric), rel=1e-5)
    torch.testing.assert_close(reversed_grad, -strength * plain)


def test_domain_loss_reverses_only_the_fmri_features():
    loss_fn = DomainAdversarialLoss(small_config())
    features = torch.randn(2, W, N, 32, requires_grad=True)
    text = torch.randn(9, 24)
    strength = grl_lambda(0.3)
    loss_fn(features, text, strength).backward()
    grl_grad = features.grad.clone()
    clf_grad = [p.grad.clone() for p in loss_fn.classifier.parameters()]
    features.grad = None
    loss_fn.zero_grad()
    # By hand, without reversal: the balanced loss's fMRI half.
    flat = features.reshape(-1, 32)
    fmri_ce = F.cross_entropy(loss_fn.classifier(flat), torch.zeros(len(flat), dtype=torch.long))
    text_ce = F.cross_entropy(loss_fn.classifier(loss_fn.text_proj(text)), torch.ones(9, dtype=torch.long))
    (0.5 * (fmri_ce + text_ce)).backward()
    torch.testing.assert_close(grl_grad, -strength * features.grad)
    for with_grl, without in zip(clf_grad, loss_fn.classifier.parameters()):
        torch.testing.assert_close(with_grl, without.grad)  # the classifier itself learns normally


def test_progress_from_batch_or_module():
    criterion = TokenizerLoss(small_config(recon_weight=0.0, commit_weight=0.0))
    text = torch.randn(7, 24)

    def feature_grad(batch_progress, module_progress):
        features = torch.randn(2, W, N, 32, requires_grad=True)
        output = {"recon": torch.zeros(2, T, N), "commit_loss": torch.tensor(0.0), "features": features,
                  "pooled": features.mean((1, 2))}
        criterion.progress = module_progress
        batch = {"x": torch.zeros(2, T, N), "text_token_embeddings": text, "progress": batch_progress}
        criterion(output, batch)["loss"].backward()
        return features.grad.abs().sum()

    assert feature_grad(0.0, 1.0) == 0  # lambda(0) = 0: the encoder gets nothing yet
    assert feature_grad(torch.full((2,), 0.8), 0.0) > 0  # a collated per-scan copy is accepted
    assert feature_grad(None, 0.0) == 0 and feature_grad(None, 0.5) > 0


# ---------------------------------------------------------------------------------------- contrastive
def _normalised(rows: int, dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64), dim=1)


def test_siglip_equals_hand_computation():
    f, g = _normalised(5, 7, 1), _normalised(5, 7, 2)
    t, b = torch.tensor(math.log(10.0) + 0.3, dtype=torch.float64), torch.tensor(-8.5, dtype=torch.float64)
    fn, gn, total = f.numpy(), g.numpy(), 0.0
    for i in range(5):
        for j in range(5):
            label = 1.0 if i == j else -1.0
            logit = math.exp(float(t)) * float(np.dot(fn[i], gn[j])) + float(b)
            total += -math.log(1.0 / (1.0 + math.exp(-label * logit)))
    assert float(siglip_loss(f, g, t, b)) == pytest.approx(total / 5, rel=1e-10)


@pytest.mark.parametrize("batch", [2, 8, 32])
def test_siglip_bias_for_the_batch_balances_unrelated_pairs(batch):
    module = ContrastiveLoss(small_config(contrastive="siglip"))
    module.init_bias_for_batch(batch)
    assert module.logit_bias.item() == pytest.approx(-math.log(batch - 1))
    basis = torch.eye(2 * batch)
    f, g = basis[:batch], basis[batch:]  # every fMRI embedding orthogonal to every text embedding: cos = 0
    loss = siglip_loss(f, g, module.logit_scale, module.logit_bias)
    (grad,) = torch.autograd.grad(loss, module.logit_bias)
    assert abs(grad.item()) < 1e-5  # one positive's pull = batch - 1 negatives' push
    with torch.no_grad():
        module.logit_bias.fill_(-10.0)  # SigLIP's 32k-batch value: every pair pulls the bias up
    (grad,) = torch.autograd.grad(siglip_loss(f, g, module.logit_scale, module.logit_bias), module.logit_bias)
    assert grad.item() < -0.9


def test_clip_equals_hand_computation():
    f, g = _normalised(4, 6, 3), _normalised(4, 6, 4)
    t = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    logits = math.exp(float(t)) * (f.numpy() @ g.numpy().T)
    rows = [-(logits[i, i] - math.log(sum(math.exp(logits[i, j]) for j in range(4)))) for i in range(4)]
    cols = [-(logits[j, j] - math.log(sum(math.exp(logits[i, j]) for i in range(4)))) for j in range(4)]
    assert float(clip_loss(f, g, t)) == pytest.approx((np.mean(rows) + np.mean(cols)) / 2, rel=1e-10)


@pytest.mark.parametrize("kind", ["siglip", "clip"])
def test_contrastive_module_projects_and_normalises(kind):
    module = ContrastiveLoss(small_config(contrastive=kind))
    if kind == "siglip":
        assert module.logit_scale.item() == pytest.approx(math.log(10)) and module.logit_bias.item() == -10
    pooled, text = torch.randn(6, 32), torch.randn(6, 20)
    standardised = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)  # batch statistics
    f, g = F.normalize(module.fmri_proj(standardised), dim=-1), F.normalize(module.text_proj(text), dim=-1)
    if kind == "siglip":
        expected = siglip_loss(f, g, module.logit_scale, module.logit_bias)
    else:
        expected = clip_loss(f, g, module.logit_scale)
    torch.testing.assert_close(module(pooled, text), expected)
    with pytest.raises(FmrilmError, match="text_features has 5 rows for 6 scans"):
        module(pooled, text[:5])
    with pytest.raises(FmrilmError, match=r"expected \(rows, 20\)"):
        module(pooled, torch.randn(6, 19))


def test_loss_parts_skip_cleanly_and_sum_with_weights():
    model = FMRITokenizerForTraining(small_config(contrast_weight=2.0, domain_weight=0.5, commit_weight=0.25))
    x = scans(4)
    assert set(model({"x": x})) == {"loss", "recon_loss", "commit_loss"}
    losses = model({"x": x, "text_features": torch.randn(4, 20), "text_token_embeddings": torch.randn(3, 24),
                    "progress": 0.5})
    weighted = (losses["recon_loss"], 0.25 * losses["commit_loss"], 2.0 * losses["contrast_loss"],
                0.5 * losses["domain_loss"])
    expected = sum(weighted)
    torch.testing.assert_close(losses["loss"], expected)
    assert set(model({"x": x, "text_features": None, "text_token_embeddings": torch.randn(3, 24)})) == {
        "loss", "recon_loss", "commit_loss", "domain_loss"}


# ---------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_save_load_round_trip(tmp_path, quantizer):
    model = FMRITokenizer(small_config(quantizer=quantizer, gradient_positioning=True), roi_gradients=gradients())
    x = scans(4)
    model({"x": x})  # a training-mode pass: k-means init and an EMA update of the codebook
    model.eval()
    model.save_pretrained(tmp_path / "tok")
    model.save_pretrained(tmp_path / "tok")  # saving over an earlier save is fine
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["config.json", "model.safetensors"]
    loaded = FMRITokenizer.from_pretrained(tmp_path / "tok")
    assert not loaded.training and loaded.config == model.config
    torch.testing.assert_close(loaded.embed.roi_gradients, model.embed.roi_gradients)
    with torch.no_grad():
        a, b = model({"x": x}), loaded({"x": x})
    assert torch.equal(a["codes"], b["codes"]) and torch.equal(a["recon"], b["recon"])
    assert torch.equal(a["features"], b["features"])


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FmrilmError, match="is not a saved tokenizer"):
        FMRITokenizer.from_pretrained(tmp_path / "missing")
    FMRITokenizer(small_config()).save_pretrained(tmp_path / "tok")
    saved = json.loads((tmp_path / "tok" / "config.json").read_text())
    saved["config"]["hidden"] = 64
    (tmp_path / "tok" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(FmrilmError, match="does not match its config.json"):
        FMRITokenizer.from_pretrained(tmp_path / "tok")


# ------------------------------------------------------------------------------------- encode/decode
def test_decode_of_encode_matches_forward_in_eval():
    for quantizer in ("vq", "fsq"):
        model = FMRITokenizer(small_config(quantizer=quantizer))
        x = scans(3)
        model({"x": x})
        model.eval()
        with torch.no_grad():
            codes, _ = model.encode(x)
            out = model({"x": x})
            torch.testing.assert_close(model.decode(codes), out["recon"], rtol=1e-4, atol=1e-5)
        assert torch.equal(codes, out["codes"])


def test_encode_does_not_update_the_codebook():
    model = FMRITokenizer(small_config())
    x = scans(4)
    model({"x": x})  # k-means init
    codebook = model.quantizer.vq.codebook.clone()
    model.encode(x)  # still in training mode
    assert torch.equal(model.quantizer.vq.codebook, codebook)
    model({"x": x})
    assert not torch.equal(model.quantizer.vq.codebook, codebook)


def test_a_few_steps_of_training_lower_the_reconstruction_error():
    model = FMRITokenizerForTraining(small_config(codebook_size=128))
    x = scans(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = None
    for _ in range(50):
        losses = model({"x": x})
        first = float(losses["recon_loss"].detach()) if first is None else first
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    tokenizer = model.tokenizer.eval()
    with torch.no_grad():
        error = float(F.mse_loss(tokenizer.decode(tokenizer.encode(x)[0]), x))
    assert error < 0.7 * first
    assert error < float((x ** 2).mean())  # better than predicting zeros


# ------------------------------------------------------------------------------- gradient positioning
def test_gradient_positioning_uses_the_gradients():
    config = small_config(gradient_positioning=True)
    torch.manual_seed(1)
    a = FMRITokenizer(config, roi_gradients=gradients(0)).embed.roi_embedding()
    torch.manual_seed(1)
    b = FMRITokenizer(config, roi_gradients=gradients(1)).embed.roi_embedding()
    assert a.shape == (N, 32)
    torch.testing.assert_close(a[:, :16], b[:, :16])  # the learned half
    assert not torch.allclose(a[:, 16:], b[:, 16:])  # the half mapped from the gradients


def test_gradient_positioning_errors():
    with pytest.raises(FmrilmError, match="gradient_positioning needs roi_gradients"):
        FMRITokenizer(small_config(gradient_positioning=True))
    with pytest.raises(FmrilmError, match=r"shape \(11, 3\).*got shape \(11, 2\)"):
        FMRITokenizer(small_config(gradient_positioning=True), roi_gradients=np.zeros((11, 2)))
    with pytest.raises(FmrilmError, match="gradient_positioning is False"):
        FMRITokenizer(small_config(), roi_gradients=gradients())


# ------------------------------------------------------------------------------------ config, presets
@pytest.mark.parametrize("overrides, match", [
    ({"patch_size": 30}, "length 64 is not a multiple of patch_size 30"),
    ({"hidden": 30, "heads": 4}, "hidden 30 is not divisible by heads 4"),
    ({"hidden": 33, "heads": 3}, "hidden must be even"),
    ({"layers": 0}, "layers must be an integer >= 1, got 0"),
    ({"hidden": 32.0}, "hidden must be an integer >= 1, got 32.0"),
    ({"quantizer": "rvq"}, "quantizer must be one of vq, fsq, got 'rvq'"),
    ({"contrastive": "triplet"}, "contrastive must be one of siglip, clip"),
    ({"ema_decay": 1.0}, r"ema_decay must be in \(0, 1\)"),
    ({"fsq_levels": [8, 2]}, "fsq_levels must be a non-empty list of integers >= 3"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"domain_weight": -1.0}, "domain_weight must be a finite number >= 0"),
    ({"gradient_positioning": "yes"}, "gradient_positioning must be true or false"),
    ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0"),
    ({"codebook_size": 1}, "codebook_size must be >= 2"),
])
def test_config_validation(overrides, match):
    with pytest.raises(FmrilmError, match=match):
        small_config(**overrides)


def test_config_json_round_trip():
    config = small_config(quantizer="fsq", fsq_levels=[7, 5, 5])
    assert config.fsq_levels == (7, 5, 5) and config.vocab_size == 175 and config.n_tokens == W * N
    assert TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(FmrilmError, match=r"unknown tokenizer settings \['hiden'\]"):
        TokenizerConfig.from_dict({"hiden": 64})


def test_presets(tmp_path):
    assert list_presets() == ["B", "L", "S", "quick", "tiny"]
    for name in list_presets():
        assert isinstance(load_preset(name), TokenizerConfig)
    quick = load_preset("quick")
    assert (quick.hidden, quick.layers, quick.patch_size) == (64, 2, 16)
    assert (quick.codebook_size, quick.codebook_dim) == (512, 32)
    assert load_preset("s", n_rois=116).n_rois == 116 and load_preset("S").hidden == 384
    with pytest.raises(FmrilmError, match="unknown tokenizer preset 'XL'; choose one of B, L, S, quick, tiny"):
        load_preset("XL")
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"config": {"hidden": 48, "heads": 4}}))
    assert load_preset(path).hidden == 48
    path.write_text("{not json")
    with pytest.raises(FmrilmError, match="is not readable JSON"):
        load_preset(path)


def _count(config: TokenizerConfig) -> int:
    with torch.device("meta"):  # no memory, no initialisation: counting only
        return FMRITokenizer(config).num_parameters()


@pytest.mark.parametrize("name, low, high, paper", [("S", 20e6, 30e6, 46e6), ("B", 90e6, 110e6, 174e6),
                                                    ("L", 300e6, 350e6, 610e6)])
def test_paper_size_parameter_counts(name, low, high, paper):
    config = load_preset(name, n_rois=450)
    assert low < _count(config) < high  # encoder + 2-block decoder
    # With a decoder as deep as the encoder the counts land within 10 % of the paper's trainable sizes.
    assert _count(load_preset(name, n_rois=450, decoder_layers=config.layers)) == pytest.approx(paper, rel=0.1)


def test_roi_pooling_keeps_each_roi_and_a_batch_of_one_uses_running_statistics():
    config = small_config(contrast_pooling="roi")
    features = torch.randn(3, 4, config.n_rois, config.hidden)  # (B, W, N, h)
    pooled = pool_features(features, "roi")
    assert pooled.shape == (3, config.n_rois * config.hidden)
    torch.testing.assert_close(pooled[1, : config.hidden], features[1, :, 0].mean(0))  # ROI 0 first, then ROI 1
    torch.testing.assert_close(pool_features(features, "mean"), features.mean(dim=(1, 2)))
    module = ContrastiveLoss(config)
    one = module.project_fmri(pooled[:1])  # training mode, one scan: the running statistics (0 and 1 at the start)
    torch.testing.assert_close(one, F.normalize(module.fmri_proj(pooled[:1] / math.sqrt(1 + 1e-5)), dim=-1))
    with pytest.raises(FmrilmError, match="pooled fMRI features.*expected"):
        module.project_fmri(torch.randn(2, config.hidden))
    with pytest.raises(FmrilmError, match="contrast_pooling must be one of mean, roi, network"):
        small_config(contrast_pooling="max")


# ------------------------------------------------------------------------------------------ network pooling
def test_network_similarity_is_the_hand_computed_mean_cosine_of_time_centred_features():
    rng = np.random.default_rng(3)
    features = rng.standard_normal((2, W, N, 5))  # (B, W, N, h)
    networks = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1])  # 3 networks of unequal size, not contiguous
    pooled = pool_features(torch.tensor(features), "network", torch.tensor(networks), 3).numpy()
    assert pooled.shape == (2, 6)
    for b in range(2):
        centred = features[b] - features[b].mean(axis=0)  # (W, N, h)
        v = centred.transpose(1, 0, 2).reshape(N, -1)
        cos = (v @ v.T) / np.outer(np.linalg.norm(v, axis=1), np.linalg.norm(v, axis=1))
        expected = []
        for a in range(3):
            for c in range(a, 3):
                pairs = [cos[i, j] for i in np.flatnonzero(networks == a) for j in np.flatnonzero(networks == c) if i != j]
                expected.append(np.mean(pairs))
        np.testing.assert_allclose(pooled[b], expected, rtol=1e-5, atol=1e-6)


def test_network_similarity_of_patch_means_is_network_connectivity():
    # With h = 1 feature per token (a patch mean) the pooling is the mean Pearson correlation of the ROIs' patch-mean
    # series, within and between networks: the feature-space counterpart of network-pair FC.
    x = scans(batch=1, length=T, n_rois=N, seed=5)[0].numpy()  # (T, N)
    means = x.reshape(W, P, N).mean(axis=1)  # (W, N)
    networks = np.array([0] * 6 + [1] * 5)
    pooled = pool_features(torch.tensor(means)[None, :, :, None], "network", torch.tensor(networks), 2)[0].numpy()
    r = np.corrcoef(means.T)
    within0 = r[:6, :6][~np.eye(6, dtype=bool)].mean()
    np.testing.assert_allclose(pooled, [within0, r[:6, 6:].mean(), r[6:, 6:][~np.eye(5, dtype=bool)].mean()],
                               rtol=1e-5, atol=1e-6)


def test_network_pooling_trains_saves_and_reloads(tmp_path):
    networks = torch.tensor([0, 1, 2] * 3 + [0, 1])
    config = small_config(contrast_pooling="network", n_networks=3)
    assert config.pooled_dim == 6
    model = FMRITokenizerForTraining(config, roi_networks=networks)
    batch = {"x": scans(4), "text_features": torch.randn(4, config.text_dim)}
    out = model(batch)
    assert out["contrast_loss"].isfinite() and model.tokenizer(batch)["pooled"].shape == (4, 6)
    out["loss"].backward()
    assert model.tokenizer.embed.patch.weight.grad.abs().sum() > 0  # the pooling passes gradients to the encoder
    model.tokenizer.save_pretrained(tmp_path / "tok")
    loaded = FMRITokenizer.from_pretrained(tmp_path / "tok")
    torch.testing.assert_close(loaded.roi_networks, networks)
    x = scans(2)
    torch.testing.assert_close(loaded.pool(loaded.encode(x)[1]), model.tokenizer.eval().pool(model.tokenizer.encode(x)[1]))


def test_network_pooling_errors_name_the_fix():
    with pytest.raises(FmrilmError, match="contrast_pooling 'network' needs roi_networks"):
        FMRITokenizer(small_config(contrast_pooling="network", n_networks=2))
    with pytest.raises(FmrilmError, match=r"roi_networks must be 11 integers \(n_rois,\) in \[0, 2\) \(n_networks\), "
                                          r"got shape \(11,\) with values 0 to 10"):
        FMRITokenizer(small_config(contrast_pooling="network", n_networks=2), roi_networks=np.arange(11))
    with pytest.raises(FmrilmError, match="needs at least 2 patches per ROI"):
        small_config(contrast_pooling="network", patch_size=T)
