"""Overwrite safety of the training stages: ``--overwrite`` builds beside the old output and swaps it in complete.

An overwrite of a finished model runs in ``.<name>.overwrite`` beside it (fmrilm.io.training_output). Until the new
run is complete the old output is untouched: an overwrite stopped by ``max_steps``, raising, or killed with SIGKILL
leaves it byte for byte and loadable, and ``--resume`` continues the overwrite in progress, then swaps it in.
The module fixture plays that story on one tiny Stage 2 (tiny-llama) output; Stage 3 is stopped and resumed the
same way, and a slow test kills Stage 1's command line.
"""

from __future__ import annotations

import json
import signal
import socket

import pytest
import torch
from safetensors.torch import load_file

from test_crash_safety import exists, kill_when, snapshot
from test_describe import CONFIG, make_cohort
from test_lm_pipeline import save_tokenizer
from fmrilm.descriptors.pipeline import run_describe
from fmrilm.errors import FmrilmError
from fmrilm.io import publish_output, staging_dir, training_output
from fmrilm.lm.pipeline import AlignedModel, run_align

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
ALIGN = dict(llm="tiny-llama", train={"epochs": 1, "batch_size": 4}, held_out_fraction=0.2, max_text_tokens=32,
             text_field="graph", n_generate=2)
NEW = {**ALIGN, "text_field": "fc"}  # the overwrite trains on another text: its model differs from the old one
ARGS = dict(marker="meta.json", what="a model", train_dir="train")


# ------------------------------------------------------------------------------------------ io helpers
def test_training_output_builds_an_overwrite_beside_the_old_output(tmp_path):
    out = tmp_path / "out"
    assert training_output(out, False, False, **ARGS) == out  # nothing to protect: build in place
    (out / "train" / "checkpoints" / "step-00000004").mkdir(parents=True)
    (out / "meta.json").write_text("{}")
    with pytest.raises(FmrilmError, match="already holds a model; pass --overwrite"):
        training_output(out, False, False, **ARGS)
    staging = training_output(out, False, True, **ARGS)
    assert staging == staging_dir(out) == tmp_path / ".out.overwrite" and not staging.exists()
    with pytest.raises(FmrilmError, match="already holds a model"):  # no overwrite in progress: out is finished
        training_output(out, True, False, **ARGS)
    (staging / "train" / "checkpoints" / "step-00000001").mkdir(parents=True)
    assert training_output(out, True, False, **ARGS) == staging  # --resume continues the overwrite
    assert training_output(out, True, True, **ARGS) == staging
    assert training_output(out, False, True, **ARGS) == staging  # a fresh overwrite starts that directory again


def test_publish_output_swaps_in_the_new_run_and_keeps_files_the_stage_does_not_write(tmp_path):
    out, work = tmp_path / "out", tmp_path / ".out.overwrite"
    (out / "notes").mkdir(parents=True)
    (out / "model.bin").write_text("old")
    (out / "notes" / "mine.txt").write_text("mine")
    (out / "eval.json").write_text("old")
    work.mkdir()
    (work / "model.bin").write_text("new")
    (work / "eval.json").write_text("new")
    publish_output(work, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert {n: (out / n).read_text() for n in ("model.bin", "eval.json", "notes/mine.txt")} == {
        "model.bin": "new", "eval.json": "new", "notes/mine.txt": "mine"}
    publish_output(out, out)  # a run built in place: nothing to do
    assert (out / "model.bin").read_text() == "new"


def test_a_publish_killed_between_its_renames_puts_the_old_output_back(tmp_path):
    out = tmp_path / "out"
    aside = tmp_path / f".out.old-{socket.gethostname()}-999999999-x"  # a swap killed after its first rename
    aside.mkdir()
    (aside / "meta.json").write_text("{}")
    with pytest.raises(FmrilmError, match="already holds a model"):
        training_output(out, False, False, **ARGS)
    assert (out / "meta.json").is_file()


# ------------------------------------------------------------------------------------------ Stage 2
@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A finished align output, then an overwrite of it that stops at step 1, one whose resume raises before the
    swap, and the resume that completes it; snapshots of the old output after each."""
    root = tmp_path_factory.mktemp("overwrite")
    cohort = make_cohort(root / "cohort", n_scans=20)
    run_describe(cohort, root / "desc", config=CONFIG)
    save_tokenizer(root / "tok", cohort)
    inputs, lm = (cohort, root / "tok", root / "desc"), root / "lm"
    run_align(*inputs, lm, **ALIGN)
    (lm / "notes.txt").write_text("the user's own file")
    before = snapshot(lm)
    stopped = run_align(*inputs, lm, **{**NEW, "train": {**NEW["train"], "max_steps": 1}}, overwrite=True)
    after_stop = snapshot(lm)
    loads = AlignedModel(lm).model.config.n_rois
    monkey = pytest.MonkeyPatch()
    monkey.setattr("fmrilm.lm.pipeline.evaluate_alignment", _fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        run_align(*inputs, lm, **NEW, resume=True)
    monkey.undo()
    after_failure = snapshot(lm)
    resumed = run_align(*inputs, lm, **NEW, resume=True)
    return {"root": root, "lm": lm, "before": before, "after_stop": after_stop, "after_failure": after_failure,
            "stopped": stopped, "resumed": resumed, "loads": loads}


def _fail(*args, **kwargs):
    raise RuntimeError("evaluation failed")


def test_a_stopped_or_failing_overwrite_leaves_the_old_model_unchanged_and_loadable(story):
    assert story["stopped"] == {"finished": False, "steps_done": 1, "total_steps": 4}
    assert story["after_stop"] == story["before"] and story["after_failure"] == story["before"]
    assert story["loads"] == 38


def test_resume_completes_the_overwrite_and_swaps_it_in(story):
    lm, old = story["lm"], story["before"]
    assert sorted(p.name for p in story["root"].iterdir() if p.name.startswith(".")) == []  # no staging left
    assert json.loads((lm / "run.json").read_text())["text_field"] == "fc"
    assert json.loads((lm / "align_meta.json").read_text())["text_field"] == "fc"
    assert (lm / "notes.txt").read_text() == "the user's own file"
    assert json.loads((lm / "eval.json").read_text())["f2t_loss"] == pytest.approx(story["resumed"]["f2t_loss"])
    new = load_file(str(lm / "fmri_modules.safetensors"))
    assert any(not torch.equal(new[k], t) for k, t in _tensors(old["fmri_modules.safetensors"]).items())
    lines = [json.loads(line) for line in (lm / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4] and (lm / "train" / "metrics.jsonl").read_bytes() != old["train/metrics.jsonl"]
    assert AlignedModel(lm).model.config.n_rois == 38


def _tensors(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


# ------------------------------------------------------------------------------------------ Stages 1 and 3
@pytest.mark.slow  # 25-38 s, green twice
def test_train_tokenizer_overwrite_killed_leaves_the_old_tokenizer_then_resume_publishes(story, tmp_path):
    from fmrilm.tokenizer.model import FMRITokenizer
    from fmrilm.tokenizer.pipeline import run_train_tokenizer

    root, tok = story["root"], tmp_path / "tok"
    args = dict(preset="tiny", llm="tiny-gpt2", train={"epochs": 2, "batch_size": 8, "device": "cpu"})
    run_train_tokenizer(root / "cohort", root / "desc", tok, **args)
    before = snapshot(tok)
    cli = ["train-tokenizer", root / "cohort", "--descriptors", root / "desc", "--out", tok, "--preset", "tiny",
           "--llm", "tiny-gpt2", "--epochs", "3", "--batch-size", "8", "--device", "cpu", "--overwrite"]
    code = kill_when(exists(".tok.overwrite/train/checkpoints/step-*", tmp_path), *cli)
    assert code == -signal.SIGKILL and snapshot(tok) == before
    FMRITokenizer.from_pretrained(tok)
    run_train_tokenizer(root / "cohort", root / "desc", tok, **{**args, "train": {**args["train"], "epochs": 3}},
                        resume=True)
    assert json.loads((tok / "train" / "train_config.json").read_text())["epochs"] == 3
    assert not staging_dir(tok).exists() and snapshot(tok)["model.safetensors"] != before["model.safetensors"]


def test_instruct_overwrite_stopped_leaves_the_old_model_then_resume_publishes(story, tmp_path):
    from fmrilm.instruct.pipeline import InstructedModel, run_instruct

    cohort, inst = story["root"] / "cohort", tmp_path / "inst"
    settings, train = dict(paradigms=["single"], max_text_tokens=384), {"epochs": 1, "batch_size": 4}
    run_instruct(cohort, story["lm"], inst, tasks=["sex"], train=train, **settings)
    before = snapshot(inst)
    stopped = run_instruct(cohort, story["lm"], inst, tasks=["age"], train={**train, "max_steps": 1}, overwrite=True,
                           **settings)
    assert stopped["finished"] is False and snapshot(inst) == before
    assert InstructedModel(inst).info["tasks"] == ["sex"]
    run_instruct(cohort, story["lm"], inst, tasks=["age"], train=train, resume=True, **settings)
    assert InstructedModel(inst).info["tasks"] == ["age"] and not staging_dir(inst).exists()
