"""Distributed training: 2 CPU processes (DDP over gloo, started by ``accelerate launch``) follow the 1-process run.

The toy regression of tests/test_train.py is trained by tests/scripts/train_toy.py, alone or under the launcher,
through this file run as a script: it destroys the process group once training is done. Without that, gloo's
worker threads are still alive when the interpreter shuts down and a process can abort with "terminate called
without an active exception" (pytorch/pytorch#190489) - the abort once seen under load in the earlier version
of this test, which launched train_toy.py directly.

Stages 2 and 3 (``run_align``, ``run_instruct`` on a tiny cohort and the tiny-llama backbone) run the same way
(``stage NAME JSON`` arguments). Their losses are means over text tokens, and texts differ in length, so 2
processes x batch b are compared with 1 process x batch b x 2 accumulation steps, which DDP equals exactly
(see fmrilm.train: 1 process x batch 2b weights the tokens of a step otherwise).
"""

from __future__ import annotations

import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fmrilm.train import latest_checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "train_toy.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_launched(processes: int, *args: str) -> None:
    """Run this file as a script on ``processes`` CPU processes under ``accelerate launch``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    # `accelerate launch --cpu --num_processes N` starts one process without MPI (accelerate#2741); --multi_gpu
    # goes through torchrun and the script's device="cpu" makes Accelerate join the processes over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    done = subprocess.run([*launch, __file__, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-3000:]


def _launch(out: Path, processes: int, batch_size: int, *extra: str) -> list[dict]:
    """Train the toy model on ``processes`` CPU processes and return its epoch lines."""
    from test_train import read_metrics

    _run_launched(processes, str(out), str(batch_size), *extra)
    return read_metrics(out)[1]


def _train_here(out: Path, batch_size: int) -> list[dict]:
    """The same toy run in this process (one process needs no launcher); returns its epoch lines."""
    from test_train import read_metrics

    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(SCRIPT), str(out), str(batch_size)]
    torch.set_num_threads(1)
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    return read_metrics(out)[1]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_run_through_a_resume(tmp_path):
    one = _train_here(tmp_path / "one", 16)
    # the same global batch of 16 on 2 processes x 8 (3 steps per epoch), stopped in the middle of epoch 1 and
    # resumed: a resume that skipped, repeated or reshuffled a micro-batch would leave the 1-process curve
    _launch(tmp_path / "two", 2, 8, "4")
    two = _launch(tmp_path / "two", 2, 8, "resume")
    for key in ("train_loss", "probe_mse"):
        print(f"\n{key}\n  1 process x batch 16:  {[r[key] for r in one]}\n  2 processes x batch 8: {[r[key] for r in two]}")
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5, abs=1e-6), key
    assert len(one) == 6 and one[-1]["train_loss"] < 0.6 * one[0]["train_loss"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["checkpoints", "metrics.jsonl", "train_config.json"]
    single, double = (load_file(latest_checkpoint(tmp_path / name) / "model.safetensors") for name in ("one", "two"))
    assert single.keys() == double.keys()
    for name in single:  # DDP averages gradients in another order: equal up to float rounding
        torch.testing.assert_close(double[name], single[name], atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------ Stages 2 and 3
@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """A 20-scan cohort (16 training scans for align, 14 for instruct), its descriptors, a tiny tokenizer and a
    1-process tiny-llama align output as the instruct source."""
    from test_describe import CONFIG, make_cohort
    from test_lm_pipeline import save_tokenizer
    from fmrilm.descriptors.pipeline import run_describe

    root = tmp_path_factory.mktemp("dist")
    cohort = make_cohort(root / "cohort", n_scans=20)
    run_describe(cohort, root / "desc", config=CONFIG)
    save_tokenizer(root / "tok", cohort)
    align = {"cohort": str(cohort), "tokenizer": str(root / "tok"), "descriptors": str(root / "desc"),
             "llm": "tiny-llama", "held_out_fraction": 0.2, "max_text_tokens": 32, "text_field": "graph",
             "n_generate": 2}
    _run_stage("align", {**align, "out": str(root / "source"), "train": {"epochs": 1, "batch_size": 4}})
    return {"root": root, "align": align, "source": root / "source"}


def _compare_runs(one: Path, two: Path, weight_files: tuple[str, ...]) -> list[dict]:
    """The same metrics lines, the same files and the same final weights (up to float rounding); returns the lines."""
    from test_train import read_metrics

    lines_one, lines_two = (read_metrics(out / "train")[0] + read_metrics(out / "train")[1] for out in (one, two))
    assert len(lines_two) == len(lines_one) > 2
    for a, b in zip(lines_one, lines_two):
        losses = sorted(k for k in a if k.endswith("loss"))
        assert losses and sorted(k for k in b if k.endswith("loss")) == losses
        print(f"step {a['step']}: " + ", ".join(f"{k} {a[k]:.6f} / {b[k]:.6f}" for k in losses))
        assert [b[k] for k in losses] == pytest.approx([a[k] for k in losses], rel=1e-5, abs=1e-6), a["step"]
    names = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*")
                               if not {"checkpoints", "tensorboard"} & set(p.parts))  # event files name the pid
    assert names(two) == names(one)
    for name in weight_files:
        single, double = load_file(str(one / name)), load_file(str(two / name))
        assert single.keys() == double.keys() and single, name
        for key in single:  # DDP averages gradients in another order: equal up to float rounding
            torch.testing.assert_close(double[key], single[key], atol=1e-5, rtol=1e-5, msg=key)
    return lines_one


WEIGHTS = ("fmri_modules.safetensors", "llm/adapter_model.safetensors")


@pytest.mark.slow  # 23-47 s (+10 s fixture), green twice
def test_align_on_two_processes_follows_one_process_with_accumulation(stage_inputs):
    root, train = stage_inputs["root"], {"epochs": 2, "batch_size": 2, "log_every": 1}
    _run_stage("align", {**stage_inputs["align"], "out": str(root / "a1"),
                         "train": {**train, "gradient_accumulation": 2}})
    _run_launched(2, "stage", "align", json.dumps({**stage_inputs["align"], "out": str(root / "a2"), "train": train}))
    lines = _compare_runs(root / "a1", root / "a2", WEIGHTS)
    assert lines[-1]["step"] == 8 and {"train_f2t_loss", "train_f2f_loss", "train_t2t_loss"} <= set(lines[-1])
    one, two = (json.loads((root / name / "eval.json").read_text()) for name in ("a1", "a2"))
    for key in ("f2t_loss", "t2t_perplexity", "f2f_accuracy"):  # evaluated once, by the main process
        assert two[key] == pytest.approx(one[key], rel=1e-4), key


@pytest.mark.slow  # 58-78 s, green twice
def test_instruct_on_two_processes_follows_one_process_through_a_resume(stage_inputs):
    root, source = stage_inputs["root"], str(stage_inputs["source"])
    # batch 1: 14 training scans, 7 steps an epoch; prompts are drawn per item, whichever process loads it
    run = {"cohorts": [stage_inputs["align"]["cohort"]], "model": source, "tasks": ["sex", "age"],
           "max_text_tokens": 384}
    train = {"epochs": 2, "batch_size": 1, "log_every": 1}
    _run_stage("instruct", {**run, "out": str(root / "i1"), "train": {**train, "gradient_accumulation": 2}})
    _run_launched(2, "stage", "instruct", json.dumps({**run, "out": str(root / "i2"), "train": {**train, "max_steps": 3}}))
    assert not (root / "i2" / "instruct.json").exists()
    _run_launched(2, "stage", "instruct", json.dumps({**run, "out": str(root / "i2"), "train": train, "resume": True}))
    lines = _compare_runs(root / "i1", root / "i2", WEIGHTS)
    assert lines[-1]["step"] == 14
    one, two = (json.loads((root / name / "instruct.json").read_text()) for name in ("i1", "i2"))
    assert two["steps"] == one["steps"] == 14 and two["cohorts"] == one["cohorts"]


# ------------------------------------------------------------------------------------------ DeepSpeed configs
ACCELERATE_PRESETS = Path(__file__).resolve().parents[1] / "src" / "fmrilm" / "presets" / "accelerate"


def test_the_zero2_config_loads_with_accelerates_config_loader():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(ACCELERATE_PRESETS / "zero2.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED and config.deepspeed_config["zero_stage"] == 2
    assert config.mixed_precision == "no" and config.num_machines == 1  # precision comes from TrainConfig
    assert sorted(p.name for p in ACCELERATE_PRESETS.iterdir()) == ["zero2.yaml"]  # ZeRO-3 is refused by the Trainer


def _run_stage(name: str, kwargs: dict) -> dict:
    from fmrilm.instruct.pipeline import run_instruct
    from fmrilm.lm.pipeline import run_align

    return {"align": run_align, "instruct": run_instruct}[name](**kwargs)


if __name__ == "__main__":  # one training process (toy or stage), then a clean process-group teardown
    if sys.argv[1] == "stage":
        torch.set_num_threads(1)
        _run_stage(sys.argv[2], json.loads(sys.argv[3]))
    else:
        sys.argv = [str(SCRIPT), *sys.argv[1:]]
        runpy.run_path(str(SCRIPT), run_name="__main__")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
