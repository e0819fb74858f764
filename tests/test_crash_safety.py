"""Crash safety: ``kill -9`` during prepare, describe and train-tokenizer, then rerun or ``--resume``.

Every test runs the real command line in a subprocess, kills it with SIGKILL at a chosen point (a file
appearing), and checks that (1) the output is absent or untouched, never half-written, (2) rerunning (or
resuming) gives outputs equal to an uninterrupted run, and (3) a damaged checkpoint is refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from conftest import ar1_scan
from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_output_dir, check_output_dir
from test_describe import NETWORKS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
FMRILM = [sys.executable, "-m", "fmrilm"]
TIMEOUT = 300


def fmrilm(*args: str | Path) -> subprocess.CompletedProcess:
    """Run ``fmrilm ARGS`` to the end; fail the test on a non-zero exit."""
    done = subprocess.run([*FMRILM, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done


def kill_when(trigger, *args: str | Path) -> int:
    """Start ``fmrilm ARGS``, SIGKILL it as soon as ``trigger(pid)`` is true, and return its exit code."""
    process = subprocess.Popen([*FMRILM, *map(str, args)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and not trigger(process.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    return process.wait()


def exists(pattern: str, root: Path):
    """Trigger: a file matching ``pattern`` appeared under ``root``."""
    return lambda pid: any(root.glob(pattern))


def has_open(path: Path):
    """Trigger: the process holds ``path`` open (Linux /proc), i.e. it is reading it."""
    def trigger(pid: int) -> bool:
        try:
            return any(os.path.realpath(fd) == str(path.resolve()) for fd in Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # the process ended or an fd closed while we looked
            return False
    return trigger


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_outputs(a: Path, b: Path) -> None:
    """Every file of ``a`` equals the one of ``b``: tables, arrays and JSON by value (creation times aside)."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in files:
        x, y = a / name, b / name
        if name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(x), pd.read_parquet(y))
        elif name.endswith(".h5"):
            with h5py.File(x) as fx, h5py.File(y) as fy:
                np.testing.assert_array_equal(fx["timeseries"][:], fy["timeseries"][:])
        elif name.endswith(".json"):
            jx, jy = (json.loads(p.read_text()) for p in (x, y))
            assert {k: v for k, v in jx.items() if k != "created"} == {k: v for k, v in jy.items() if k != "created"}, name
        elif name.endswith(".safetensors"):
            tx, ty = load_file(str(x)), load_file(str(y))
            assert tx.keys() == ty.keys() and all(np.array_equal(tx[k], ty[k]) for k in tx), name
        else:
            assert x.read_bytes() == y.read_bytes(), name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """40 scans of 38 ROIs at TR 0.72 s (resampled by prepare) and their uninterrupted prepare and describe."""
    root = tmp_path_factory.mktemp("crash")
    rng = np.random.default_rng(0)
    (root / "ts").mkdir()
    for i in range(40):
        np.save(root / "ts" / f"s{i:02d}.npy", ar1_scan(rng, 450, n_rois=len(NETWORKS)))
    pd.DataFrame({"name": [f"roi{i}" for i in range(len(NETWORKS))], "network": NETWORKS}).to_csv(root / "rois.csv", index=False)
    fmrilm(*prepare_args(root, root / "cohort"))
    fmrilm("describe", root / "cohort", "--out", root / "desc", "--ica-components", "4")
    return root


def prepare_args(root: Path, out: Path) -> list:
    return ["prepare", "--timeseries", root / "ts", "--atlas", root / "rois.csv", "--tr", "0.72", "--out", out,
            "--max-constant-fraction", "0.2"]


@pytest.mark.slow
def test_prepare_killed_while_writing_then_rerun_equals_the_uninterrupted_run(runs, tmp_path):
    out = tmp_path / "cohort"
    code = kill_when(exists(".cohort.tmp-*/timeseries.h5", tmp_path), *prepare_args(runs, out))
    assert code == -signal.SIGKILL and not out.exists()  # killed mid-run: no half-written cohort
    assert len(list(tmp_path.glob(".cohort.tmp-*"))) == 1
    fmrilm(*prepare_args(runs, out))  # the rerun removes the killed run's temporary directory
    assert_same_outputs(runs / "cohort", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


@pytest.mark.slow
def test_prepare_killed_during_overwrite_leaves_the_existing_cohort_intact(runs, tmp_path):
    out = tmp_path / "cohort"
    shutil.copytree(runs / "cohort", out)
    before = snapshot(out)
    code = kill_when(exists(".cohort.tmp-*/timeseries.h5", tmp_path), *prepare_args(runs, out), "--overwrite", "--length", "120")
    assert code == -signal.SIGKILL and snapshot(out) == before
    assert "scans       40 from 40 subjects" in fmrilm("info", out).stdout


@pytest.mark.slow
@pytest.mark.parametrize("point", ["reading", "writing"])
def test_describe_killed_then_rerun_equals_the_uninterrupted_run(runs, tmp_path, point):
    out = tmp_path / "desc"
    trigger = exists(".desc.tmp-*/*", tmp_path) if point == "writing" else has_open(runs / "cohort" / "timeseries.h5")
    code = kill_when(trigger, "describe", runs / "cohort", "--out", out, "--ica-components", "4")
    assert code == -signal.SIGKILL and not out.exists()
    fmrilm("describe", runs / "cohort", "--out", out, "--ica-components", "4")
    assert_same_outputs(runs / "desc", out)


def test_atomic_output_removes_only_what_killed_runs_of_this_host_left(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale, running, foreign = (tmp_path / f".out.tmp-{owner}-abc" for owner in
                               (f"{host}-{dead.stdout.strip()}", f"{host}-{os.getpid()}", f"otherhost-{dead.stdout.strip()}"))
    for directory in (stale, running, foreign):
        directory.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("new")
    assert not stale.exists() and running.exists() and foreign.exists()
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (tmp_path / "out" / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", running.name, foreign.name])


def test_an_output_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.old-{socket.gethostname()}-{dead.stdout.strip()}-"
    aside.mkdir()
    (aside / "a.txt").write_text("old")  # killed after moving out aside, before moving the new one in
    with pytest.raises(FmrilmError, match="already exists"):
        check_output_dir(tmp_path / "out", overwrite=False)
    assert (tmp_path / "out" / "a.txt").read_text() == "old" and not aside.exists()


def tokenizer_args(runs: Path, out: Path, *extra: str) -> list:
    return ["train-tokenizer", runs / "cohort", "--descriptors", runs / "desc", "--out", out, "--preset", "tiny",
            "--llm", "tiny-gpt2", "--epochs", "2", "--batch-size", "8", "--device", "cpu", *extra]


@pytest.mark.acceptance  # about 130 s on a loaded 2-core machine (three tokenizer runs): too long for CI
def test_train_tokenizer_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(runs, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    fmrilm(*tokenizer_args(runs, full))
    code = kill_when(exists("train/checkpoints/step-*", cut), *tokenizer_args(runs, cut))
    assert code == -signal.SIGKILL and not (cut / "model.safetensors").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(cut, damaged)
    fmrilm(*tokenizer_args(runs, cut, "--resume"))
    reference, resumed = load_file(str(full / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    for name in reference:
        np.testing.assert_allclose(resumed[name], reference[name], atol=1e-6, rtol=0, err_msg=name)
    steps = [[json.loads(line)["step"] for line in (run / "train/metrics.jsonl").read_text().splitlines()] for run in (full, cut)]
    assert steps[0] == steps[1]
    # a truncated checkpoint is an error naming the file, never a silent start from scratch
    weights = next((damaged / "train/checkpoints").glob("step-*")) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    done = subprocess.run([*FMRILM, *map(str, tokenizer_args(runs, damaged, "--resume"))], env=ENV, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"checkpoint file {weights} is truncated" in done.stderr and "delete the directory" in done.stderr


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_atomic_outputs_get_the_umask_modes_not_private_ones(tmp_path, mask):
    from fmrilm.io import atomic_file, write_json_atomic
    from fmrilm.report.html import _write_text_atomic

    old = os.umask(mask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        _write_text_atomic(tmp_path / "report.html", "<p>hi</p>")
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "f.txt").write_text("x")
        with pytest.raises(RuntimeError), atomic_file(tmp_path / "a.json") as tmp:  # a failed write keeps the old file
            tmp.write_text("half")
            raise RuntimeError("stop")
    finally:
        os.umask(old)
    for name in ("a.json", "report.html", "out/f.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out", "report.html"]  # no temporary left
