"""Stage 2 end to end: fmrilm align on a tiny cohort, describe-scan, resume, errors, metric helpers.

A 20-scan, 38-ROI cohort (T=160) with a tiny random tokenizer (P=32 -> W=5, 16 codes, codebook initialised
by one k-means pass) and the tiny-llama backbone; one alignment run is shared by the tests of this module.
The acceptance tests (marker ``acceptance``, run by hand with ``-m acceptance``) are the CPU run with SmolLM2-135M
on a simulated 116-ROI cohort.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import ar1_scan
from test_describe import CONFIG, make_cohort
from fmrilm.data.cohort import load_cohort
from fmrilm.descriptors.pipeline import run_describe
from fmrilm.errors import FmrilmError
from fmrilm.lm import evaluate as ev
from fmrilm.lm.model import FMRILanguageModel, FMRILMConfig
from fmrilm.lm.objectives import collate, f2t_example
from fmrilm.lm.pipeline import (
    AlignCollator, AlignDataset, AlignedModel, describe_scan, describe_scans, encode_cohort, read_scan, run_align,
    target_text,
)
from fmrilm.tokenizer.config import load_preset
from fmrilm.tokenizer.model import FMRITokenizer

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
TRAIN = {"epochs": 1, "batch_size": 4, "log_every": 1}
ALIGN = dict(llm="tiny-llama", train=TRAIN, held_out_fraction=0.2, max_text_tokens=64, text_field="graph",
             n_generate=4)
EVAL_KEYS = ("f2f_accuracy", "f2f_copy_last_accuracy", "f2f_majority_accuracy", "f2t_field_accuracy",
             "f2t_majority_field_accuracy", "bleu4", "rouge_l_f1", "t2t_perplexity", "t2t_perplexity_base", "f2t_loss")


def save_tokenizer(path, cohort, n_rois=38, patch_size=32, codebook_size=16):
    """A random tiny tokenizer whose VQ codebook is k-means initialised on the cohort's first scans."""
    torch.manual_seed(0)
    config = load_preset("tiny", n_rois=n_rois, length=160, patch_size=patch_size, codebook_size=codebook_size,
                         codebook_dim=8)
    tokenizer = FMRITokenizer(config).train()
    with load_cohort(cohort) as opened:
        x = torch.from_numpy(opened.timeseries[:8][:, :, :n_rois])  # fewer ROIs: a tokenizer that does not fit
        tokenizer({"x": x})  # a training-mode pass initialises the codebook by k-means
    tokenizer.eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    cohort = make_cohort(root / "cohort", n_scans=20)
    run_describe(cohort, root / "desc", config=CONFIG)
    save_tokenizer(root / "tok", cohort)
    metrics = run_align(cohort, root / "tok", root / "desc", root / "lm", **ALIGN)
    return {"root": root, "cohort": cohort, "desc": root / "desc", "tok": root / "tok", "lm": root / "lm",
            "metrics": metrics}


def raw_scan(seed=3, n_rois=38):
    return ar1_scan(np.random.default_rng(seed), 170, n_rois=n_rois)


# ------------------------------------------------------------------------------------------ end to end
def test_align_writes_a_self_contained_model(data):
    lm = data["lm"]
    for name in ("config.json", "fmri_modules.safetensors", "llm/adapter_model.safetensors", "llm/adapter_config.json",
                 "preprocess.json", "tokenizer/config.json", "tokenizer/model.safetensors", "eval.json",
                 "align_meta.json", "run.json", "train/metrics.jsonl"):
        assert (lm / name).is_file(), name
    metrics = json.loads((lm / "eval.json").read_text())
    for key in EVAL_KEYS:
        assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
        assert metrics[key] == pytest.approx(data["metrics"][key])
    assert metrics["n_held_out_scans"] == 4 and metrics["n_generated"] == 4 and metrics["n_fields"] > 0
    preprocess = json.loads((lm / "preprocess.json").read_text())
    assert preprocess["n_rois"] == 38 and preprocess["tr"] == 2.0 and len(preprocess["roi_names"]) == 38
    assert {"preprocess", "site_normaliser", "atlas"} <= set(preprocess)
    meta = json.loads((lm / "align_meta.json").read_text())
    assert meta["fmri_tokens_per_scan"] == 5 * 38 and meta["n_train_scans"] == 16 and meta["llm"] == "tiny-llama"
    assert len(meta["held_out_subjects"]) == 4 and meta["model_config"]["lora"] is True


def test_from_pretrained_round_trip_matches_the_last_checkpoint(data):
    model = FMRILanguageModel.from_pretrained(data["lm"])
    checkpoint = sorted((data["lm"] / "train" / "checkpoints").iterdir())[-1]
    trained = load_file(str(checkpoint / "model.safetensors"))
    state = model.state_dict()
    for name, tensor in trained.items():
        assert torch.equal(state[name], tensor), name
    assert model.config.n_steps == 5 and model.config.n_rois == 38


def test_describe_scan_reads_npy_and_csv_and_equals_the_batched_api(data, tmp_path):
    x = raw_scan()
    np.save(tmp_path / "scan.npy", x)
    pd.DataFrame(x).to_csv(tmp_path / "scan.csv", index=False, header=False)
    np.savetxt(tmp_path / "scan_t.txt", x.T)
    aligned = AlignedModel(data["lm"])
    one = describe_scan(data["lm"], tmp_path / "scan.npy", tr=2.0)
    both = describe_scan(aligned, [tmp_path / "scan.npy", tmp_path / "scan.csv"], tr=2.0)
    assert isinstance(one, str) and len(one) > 0 and both[0] == one
    assert both[1] == describe_scan(aligned, tmp_path / "scan.csv", tr=2.0)
    assert describe_scan(aligned, tmp_path / "scan_t.txt", tr=2.0, transpose=True) == both[1]
    scans = np.stack([read_scan(tmp_path / f, aligned.preprocess, tr=2.0) for f in ("scan.npy", "scan.csv")])
    assert scans.shape == (2, 160, 38)
    _, features = aligned.tokenizer.encode(torch.from_numpy(scans))
    assert describe_scans(aligned.model, features, max_new_tokens=aligned.max_new_tokens) == both


def test_cli_describe_scan(data, tmp_path, capsys):
    from fmrilm.cli import main

    np.save(tmp_path / "scan.npy", raw_scan())
    assert main(["describe-scan", "--model", str(data["lm"]), "--scan", str(tmp_path / "scan.npy"), "--tr", "2"]) == 0
    expected = describe_scan(data["lm"], tmp_path / "scan.npy", tr=2.0)
    assert capsys.readouterr().out.strip() == f"{tmp_path / 'scan.npy'}: {expected}"
    assert main(["describe-scan", "--model", str(data["lm"]), "--scan", str(tmp_path / "scan.npy")]) == 2
    assert "unknown TR; pass --tr" in capsys.readouterr().err


def test_paper_sized_grid_trains():
    """P=32 on 160 points with 450 ROIs: 2,250 fMRI tokens on W=5 positions, F2F, F2T and T2T in one step."""
    torch.manual_seed(0)
    model = FMRILanguageModel(FMRILMConfig(llm="tiny-llama", n_rois=450, n_steps=5, feature_dim=16, codebook_size=32))
    example = {"features": torch.randn(5, 450, 16), "codes": torch.randint(0, 32, (5, 450)),
               **f2t_example(model.tokenizer, "The modularity is typical.", 32)}
    batch = AlignCollator(model.tokenizer.pad_token_id)([{**example, "lm_ids": torch.tensor([1, 40, 41, 2])}])
    out = model(batch)
    out["loss"].backward()
    assert out["fmri_logits"].shape == (1, 5, 450, 32) and torch.isfinite(out["loss"])
    assert model.fmri.projector[0].weight.grad.abs().sum() > 0


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(data, tmp_path):
    out = tmp_path / "lm"
    first = run_align(data["cohort"], data["tok"], data["desc"], out, **{**ALIGN, "train": {**TRAIN, "max_steps": 2}})
    assert first == {"finished": False, "steps_done": 2, "total_steps": 4}
    assert not (out / "eval.json").exists()
    resumed = run_align(data["cohort"], data["tok"], data["desc"], out, **ALIGN, resume=True)
    for name in ("fmri_modules.safetensors", "llm/adapter_model.safetensors"):
        a, b = load_file(str(out / name)), load_file(str(data["lm"] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert resumed["f2t_field_accuracy"] == data["metrics"]["f2t_field_accuracy"]


def test_token_cache_is_reused_and_matches_the_tokenizer(data):
    cache_dir = data["lm"] / "cache" / "tokens"
    stamp = (cache_dir / "features.npy").stat().st_mtime_ns
    cache = encode_cohort(data["cohort"], data["tok"], cache_dir)
    assert (cache_dir / "features.npy").stat().st_mtime_ns == stamp  # unchanged inputs: not encoded again
    tokenizer = FMRITokenizer.from_pretrained(data["tok"])
    with load_cohort(data["cohort"]) as opened, torch.no_grad():
        codes, features = tokenizer.encode(torch.from_numpy(opened.timeseries[:3]))
    assert cache.features.shape == (20, 5, 38, 64) and cache.codes.shape == (20, 5, 38)
    np.testing.assert_allclose(cache.features[:3], features.numpy(), atol=1e-6)
    np.testing.assert_array_equal(cache.codes[:3], codes.numpy())


def test_items_mix_f2f_f2t_and_t2t(data):
    cache = encode_cohort(data["cohort"], data["tok"], data["lm"] / "cache" / "tokens")
    texts = [{"text_ids": torch.tensor([5, 6, 7]), "text_labels": torch.tensor([5, 6, 7])}] * 20
    paragraphs = [torch.tensor([1, 2]), torch.tensor([1, 2, 3, 4])]
    dataset = AlignDataset(cache, np.array([3, 4]), texts, paragraphs, with_codes=True)
    batch = AlignCollator(pad_id=0)([dataset[0], dataset[1]])
    assert batch["features"].shape == (2, 5, 38, 64) and batch["codes"].shape == (2, 5, 38)
    assert batch["text_ids"].shape == (2, 3) and batch["lm_ids"].shape == (2, 4)
    assert batch["lm_attention"].sum().item() == 6


def test_target_text_keeps_whole_sentences():
    from fmrilm.lm.backbone import load_backbone

    _, tokenizer = load_backbone("tiny-llama")
    text = "The modularity is typical. The global efficiency is markedly higher (z = 2.50). The end is near."
    first = target_text(text, tokenizer, len(tokenizer("The modularity is typical.").input_ids) + 2)
    assert first == "The modularity is typical."
    assert target_text(text, tokenizer, 200) == text
    assert target_text(text, tokenizer, 3) == tokenizer.decode(tokenizer("The modularity is typical.").input_ids[:3])


def test_f2t_learns_a_fact_the_features_carry():
    """The conditional path works: when the features say it, generation states the fact (majority: half)."""
    torch.manual_seed(0)
    model = FMRILanguageModel(FMRILMConfig(llm="tiny-llama", n_rois=4, n_steps=2, feature_dim=8, codebook_size=8,
                                           lora_dropout=0.0))
    texts = {1: "The modularity is markedly higher (z = 2.50).", -1: "The modularity is typical."}
    generator = torch.Generator().manual_seed(1)

    def scans(n):
        sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
        return torch.randn(n, 2, 4, 8, generator=generator) + sign[:, None, None, None], [texts[int(s)] for s in sign]

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        features, targets = scans(8)
        examples = [{"features": f, **f2t_example(model.tokenizer, t, 32)} for f, t in zip(features, targets)]
        model(collate(examples, model.tokenizer.pad_token_id))["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    features, targets = scans(16)
    generated = ev.generate_texts(model.eval(), features.numpy(), 40)
    truths = [ev.facts(t, ["graph.modularity"]) for t in targets]
    assert ev.field_accuracy(truths, [ev.facts(g, ["graph.modularity"]) for g in generated]) == 1.0
    assert len(set(targets)) == 2


# ------------------------------------------------------------------------------------------ errors
def test_align_errors_are_one_line(data, tmp_path):
    args = (data["cohort"], data["tok"], data["desc"])
    with pytest.raises(FmrilmError, match="already holds an aligned fMRI-LM; pass --overwrite"):
        run_align(*args, data["lm"], **ALIGN)
    with pytest.raises(FmrilmError, match="holds no checkpoint"):
        run_align(*args, tmp_path / "fresh", **ALIGN, resume=True)
    other = tmp_path / "desc"
    shutil.copytree(data["desc"], other)
    lines = (other / "texts.jsonl").read_text().replace('"scan_id": "s00"', '"scan_id": "x00"')
    (other / "texts.jsonl").write_text(lines)
    with pytest.raises(FmrilmError, match=r"made from another cohort: 1 of their scan ids"):
        run_align(data["cohort"], data["tok"], other, tmp_path / "a", **ALIGN)
    save_tokenizer(tmp_path / "tok30", data["cohort"], n_rois=30)
    with pytest.raises(FmrilmError, match="expects 30 ROIs x 160 time points but cohort .* has 38 x 160"):
        run_align(data["cohort"], tmp_path / "tok30", data["desc"], tmp_path / "b", **ALIGN)
    save_tokenizer(tmp_path / "tok160", data["cohort"], patch_size=160)
    with pytest.raises(FmrilmError, match="needs W >= 2"):
        run_align(data["cohort"], tmp_path / "tok160", data["desc"], tmp_path / "c", **ALIGN)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_describe_scan_errors(data, tmp_path):
    np.save(tmp_path / "scan.npy", raw_scan())
    np.save(tmp_path / "short.npy", raw_scan(n_rois=37))
    with pytest.raises(FmrilmError, match="unknown TR; pass --tr SECONDS"):
        describe_scan(data["lm"], tmp_path / "scan.npy")
    with pytest.raises(FmrilmError, match="37 ROI columns but the atlas has 38 ROIs"):
        describe_scan(data["lm"], tmp_path / "short.npy", tr=2.0)
    with pytest.raises(FmrilmError, match="is not an 'fmrilm align' output"):
        describe_scan(tmp_path, tmp_path / "scan.npy", tr=2.0)


# ------------------------------------------------------------------------------------------ metric helpers
def test_bleu_and_rouge_on_hand_examples():
    ref = "The cat sat on the mat."
    assert ev.corpus_bleu([ref], [ref]) == pytest.approx(1.0)
    assert ev.corpus_bleu([ref], ["dogs bark loudly"]) == 0.0
    # p1 = 5/6 (+ "." 6/7), smoothed p2..p4; computed by hand on [the cat sat on a mat .]
    expected = (6 / 7 * (3 + 1 + 1) / (6 + 1) * (2 + 1) / (5 + 1) * (1 + 1) / (4 + 1)) ** 0.25
    assert ev.corpus_bleu([ref], ["The cat sat on a mat."]) == pytest.approx(expected)
    # brevity penalty exp(1 - 6/2) with every smoothed precision 1
    assert ev.corpus_bleu(["the cat sat on the mat"], ["the cat"]) == pytest.approx(math.exp(-2))
    assert ev.rouge_l(["the cat sat on the mat"], ["the cat on the mat"]) == pytest.approx(2 * 5 / 11)
    assert ev.rouge_l(["a b", "c d"], ["a b", "x"]) == pytest.approx(0.5)
    assert ev.words("(z = -1.42).") == ["(", "z", "=", "-", "1.42", ")", "."]


def test_field_accuracy_and_majority_on_hand_examples():
    truths = [{"a": ("markedly", "higher"), "b": ("typical", None)}, {"a": ("typical", None)}]
    predictions = [{"a": ("markedly", "higher"), "c": ("somewhat", "lower")}, {"a": ("somewhat", "higher")}]
    assert ev.field_accuracy(truths, predictions) == pytest.approx(1 / 3)  # b missing counts wrong, c ignored
    train = [{"a": ("typical", None)}, {"a": ("typical", None)}, {"a": ("somewhat", "higher"), "b": ("markedly", "lower")}]
    majority = ev.majority_facts(train)
    assert majority == ({"a": ("typical", None), "b": ("markedly", "lower")}, ("typical", None))
    answers = ev.majority_predictions(truths + [{"z": ("typical", None)}], majority)
    assert answers[2] == {"z": ("typical", None)}  # never-seen column: the overall majority
    assert ev.field_accuracy(truths, answers[:2]) == pytest.approx(1 / 3)
    columns = ["graph.modularity", "graph.clustering"]
    text = "The modularity is markedly higher (z = 2.50). The average clustering coefficient is typical."
    assert ev.facts(text, columns) == {"graph.modularity": ("markedly", "higher"), "graph.clustering": ("typical", None)}


def test_f2f_baselines_on_hand_codes():
    codes = np.array([[[1, 2], [1, 3], [4, 3]]])  # (1 scan, 3 steps, 2 ROIs)
    assert ev.copy_last_accuracy(codes) == pytest.approx(0.5)
    train = np.array([[[7, 2], [7, 2]], [[7, 5], [1, 5]]])  # ROI 0: 7 x3; ROI 1: 2 x2, 5 x2 -> tie to 2
    majority = ev.majority_codes(train)
    np.testing.assert_array_equal(majority, [7, 2])
    held = np.array([[[0, 0], [7, 2], [7, 9]]])
    assert ev.majority_accuracy(majority, held) == pytest.approx(3 / 4)
    with pytest.raises(FmrilmError, match="steps >= 2"):
        ev.copy_last_accuracy(codes[:, :1])


# ------------------------------------------------------------------------------------------ acceptance
@pytest.fixture(scope="module")
def acceptance(tmp_path_factory):
    """CPU acceptance run: SmolLM2-135M + LoRA, 150 simulated UKB subjects, 116 ROIs, P=80 (W=2, 232 fMRI
    tokens), a random tokenizer with a k-means codebook of 64 codes, the stage's quick settings (bf16 where the
    CPU has it); one thread unless the machine is idle (on a shared CPU two OpenMP threads wait on each other)."""
    from fmrilm.cli import build_parser
    from fmrilm.data.ingest import prepare_from_args
    from fmrilm.data.simulate import simulate_cohort

    root, start, threads = tmp_path_factory.mktemp("acceptance"), time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(2 if os.getloadavg()[0] < 1.0 else 1)  # both cores only on an idle machine
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()  # native bf16: ~1.3x faster steps
    try:
        simulate_cohort("ukb", 150, 0, root / "raw", atlas="schaefer100_tian_s1")
        argv = ["prepare", "--timeseries", str(root / "raw" / "timeseries"), "--phenotypes",
                str(root / "raw" / "participants.tsv"), "--atlas", "schaefer100_tian_s1", "--out", str(root / "c")]
        prepare_from_args(build_parser().parse_args(argv)).close()
        run_describe(root / "c", root / "d")
        save_tokenizer(root / "tok", root / "c", n_rois=116, patch_size=80, codebook_size=64)
        metrics = run_align(root / "c", root / "tok", root / "d", root / "lm", train={"precision": "bf16"} if bf16 else None)
    finally:
        torch.set_num_threads(threads)
    print({k: v for k, v in metrics.items() if k != "examples"}, f"wall {time.perf_counter() - start:.0f} s")
    return metrics


@pytest.mark.acceptance
@pytest.mark.needs_atlas
def test_acceptance_f2f_and_t2t(acceptance):
    assert acceptance["f2f_accuracy"] > acceptance["f2f_copy_last_accuracy"]
    # English kept: no more than 15 % worse than the base LLM (T2T trains on the same prose, so lower is fine)
    assert acceptance["t2t_perplexity"] < 1.15 * acceptance["t2t_perplexity_base"]


@pytest.mark.acceptance
@pytest.mark.needs_atlas
@pytest.mark.xfail(strict=False, reason=(
    "measured 2026-11-23 on the shared 2-core CPU (150 subjects, 1 epoch = 34 steps, random k-means tokenizer, "
    "721 s): f2t_field_accuracy 0.044 vs majority 0.333 over 45 facts of 15 held-out scans; BLEU-4 0.45, "
    "ROUGE-L 0.70: the wording is learnt, the facts are not. Pooled features of the untrained tokenizer carry no "
    "linear information on the descriptors (5-fold ridge r <= 0.2); needs a Stage 1 tokenizer trained with its "
    "descriptor-contrastive loss and far more alignment steps (GPU)"))
def test_acceptance_f2t_beats_majority(acceptance):
    assert acceptance["f2t_field_accuracy"] > acceptance["f2t_majority_field_accuracy"]
