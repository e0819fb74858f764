"""Distributed training: 2 CPU processes (DDP over gloo, started by ``accelerate launch``) follow the 1-process run.

The toy regression of tests/test_train.py is trained by tests/scripts/train_toy.py, alone or under the launcher,
through this file run as a script: it destroys the process group once training is done. Without that, gloo's
worker threads are still alive when the interpreter shuts down and a process can abort with "terminate called
without an active exception" (pytorch/pytorch#190489) - the abort once seen under load in the earlier version
of this test, which launched train_toy.py directly.
"""

from __future__ import annotations

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


def _launch(out: Path, processes: int, batch_size: int, *extra: str) -> list[dict]:
    """Train the toy model on ``processes`` CPU processes and return its epoch lines."""
    from test_train import read_metrics

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # `accelerate launch --cpu --num_processes N` starts one process without MPI (accelerate#2741); --multi_gpu
    # goes through torchrun and the script's device="cpu" makes Accelerate join the processes over gloo
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    done = subprocess.run([*launch, __file__, str(out), str(batch_size), *extra], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "terminate called" not in done.stderr, done.stderr[-3000:]
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


if __name__ == "__main__":  # one training process: the toy script, then a clean process-group teardown
    sys.argv = [str(SCRIPT), *sys.argv[1:]]
    runpy.run_path(str(SCRIPT), run_name="__main__")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
