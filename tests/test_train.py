"""The shared training loop on a toy MLP regression: learning, logging, schedule, exact resume, checkpoints."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from fmrilm import train as train_module
from fmrilm.errors import FmrilmError
from fmrilm.train import (
    TrainConfig,
    Trainer,
    cosine_with_warmup,
    latest_checkpoint,
    set_seed,
    verify_checkpoint,
)


class ToyData(Dataset):
    """(n, n_features) inputs and a smooth nonlinear target, seeded; samples are dicts."""

    def __init__(self, n: int = 37, n_features: int = 11, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, n_features, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(n_features, generator=g)) + 0.05 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class ToyRegression(nn.Module):
    """A small MLP returning {"loss", "mse_loss", "l2_loss"}; ``tie`` shares one weight between two layers."""

    def __init__(self, n_features: int = 11, hidden: int = 16, dropout: float = 0.0, tie: bool = False):
        super().__init__()
        self.inp = nn.Linear(n_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.mid2 = nn.Linear(hidden, hidden)
        if tie:
            self.mid2.weight = self.mid.weight
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = self.drop(F.gelu(self.norm(self.inp(batch["x"]))))  # (B, hidden)
        h = h + self.mid2(F.gelu(self.mid(h)))
        pred = self.out(h).squeeze(-1)  # (B,)
        mse = F.mse_loss(pred.float(), batch["y"])
        l2 = 1e-3 * self.out.weight.float().pow(2).sum()
        return {"loss": mse + l2, "mse_loss": mse, "l2_loss": l2}


def toy_model(seed: int = 0, **kwargs) -> ToyRegression:
    set_seed(seed)
    return ToyRegression(**kwargs)


def config(**overrides) -> TrainConfig:
    base = dict(lr=1e-2, epochs=3, batch_size=8, warmup_ratio=0.2, log_every=2, device="cpu")
    return TrainConfig(**{**base, **overrides})


def read_metrics(out: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "event" not in r], [r for r in records if r.get("event") == "epoch"]


def assert_records_close(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(x[k] == pytest.approx(y[k], abs=1e-6) for k in x)


def train(out: Path, data: Dataset | None = None, model_kwargs: dict | None = None, resume: bool = False,
          **overrides) -> tuple[Trainer, dict]:
    trainer = Trainer(toy_model(**(model_kwargs or {})), data or ToyData(), config(**overrides), out)
    return trainer, trainer.fit(resume=resume)


def test_loss_decreases_and_metrics_lines_hold_the_parts(tmp_path):
    data = ToyData(n=60)  # 37 to train on, 23 held out

    def eval_fn(model):
        return {"val_mse": model({"x": data.x[37:], "y": data.y[37:]})["mse_loss"]}

    trainer = Trainer(toy_model(), Subset(data, range(37)), config(epochs=8), tmp_path, eval_fn=eval_fn)
    final = trainer.fit()
    steps, epochs = read_metrics(tmp_path)
    assert trainer.steps_per_epoch == 5 and len(steps) == 20 and len(epochs) == 8
    assert set(steps[0]) == {"step", "epoch", "lr", "loss", "mse_loss", "l2_loss"}
    assert [r["step"] for r in steps] == list(range(2, 41, 2))
    assert set(epochs[0]) == {"event", "epoch", "step", "train_loss", "train_mse_loss", "train_l2_loss", "val_mse"}
    assert epochs[-1]["train_loss"] < 0.5 * epochs[0]["train_loss"]
    assert epochs[-1]["val_mse"] < epochs[0]["val_mse"]
    assert final == epochs[-1]
    assert json.loads((tmp_path / "train_config.json").read_text()) == trainer.config.to_dict()


def test_lr_follows_linear_warmup_then_cosine(tmp_path):
    _, _ = train(tmp_path, log_every=1, epochs=4, warmup_ratio=0.25, min_lr_ratio=0.1)
    lrs = [r["lr"] for r in read_metrics(tmp_path)[0]]
    total, warmup = 20, 5
    expected = [1e-2 * (s + 1) / (warmup + 1) if s < warmup else
                1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
                for s in range(total)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[:warmup + 1] == sorted(lrs[:warmup + 1]) and lrs[warmup:] == sorted(lrs[warmup:], reverse=True)


def test_cosine_with_warmup_reaches_min_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_with_warmup(opt, total_steps=10, warmup_ratio=0.0, min_lr_ratio=0.25)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 2.0 and lrs[10] == pytest.approx(0.5) and lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize("stop, accumulation", [(3, 1), (5, 1), (2, 2), (3, 2)],
                         ids=["mid-epoch", "epoch-boundary", "accumulation-mid-epoch", "accumulation-boundary"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, stop, accumulation):
    kwargs = dict(model_kwargs={"dropout": 0.2}, gradient_accumulation=accumulation, log_every=1)
    full, _ = train(tmp_path / "full", **kwargs)
    train(tmp_path / "cut", max_steps=stop, **kwargs)
    resumed, _ = train(tmp_path / "cut", resume=True, **kwargs)
    for a, b in zip(full.unwrapped_model.state_dict().values(), resumed.unwrapped_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    full_steps, full_epochs = read_metrics(tmp_path / "full")
    cut_steps, cut_epochs = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut_steps] == [r["step"] for r in full_steps]  # nothing written twice
    assert_records_close(cut_epochs, full_epochs)


def test_resume_from_an_older_checkpoint_rewrites_the_later_lines(tmp_path):
    full, _ = train(tmp_path / "full", log_every=1)
    train(tmp_path / "crash", log_every=1, checkpoint_every=3, max_steps=8)  # checkpoints at 6 and 8
    shutil.rmtree(latest_checkpoint(tmp_path / "crash"))  # as if the run died after step 8, before its checkpoint
    resumed, _ = train(tmp_path / "crash", log_every=1, checkpoint_every=3, resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "crash")[0]] == list(range(1, 16))
    assert_records_close(read_metrics(tmp_path / "crash")[1], read_metrics(tmp_path / "full")[1])
    assert torch.allclose(full.unwrapped_model.out.weight, resumed.unwrapped_model.out.weight, atol=1e-6)


def test_resume_after_the_end_changes_nothing(tmp_path):
    first, final = train(tmp_path, epochs=1)
    again, final_again = train(tmp_path, epochs=1, resume=True)
    assert final_again == final
    assert torch.equal(first.unwrapped_model.out.weight, again.unwrapped_model.out.weight)


def test_tied_weights_survive_a_checkpoint(tmp_path):
    train(tmp_path, model_kwargs={"tie": True}, max_steps=3)
    resumed, _ = train(tmp_path, model_kwargs={"tie": True}, resume=True)
    model = resumed.unwrapped_model
    assert model.mid2.weight is model.mid.weight


def frozen_input_model(seed: int = 0) -> ToyRegression:
    """The toy model whose input layer is a FROZEN Linear + BatchNorm: frozen weights, running statistics that
    change while training."""
    model = toy_model(seed)
    set_seed(seed + 100)
    model.inp = nn.Sequential(nn.Linear(11, 16), nn.BatchNorm1d(16)).requires_grad_(False)
    return model


def train_frozen(out: Path, resume: bool = False, model: ToyRegression | None = None, **overrides) -> Trainer:
    trainer = Trainer(model or frozen_input_model(), ToyData(), config(log_every=1, **overrides), out)
    trainer.fit(resume=resume)
    return trainer


def test_checkpoint_holds_trainable_weights_and_buffers_but_no_frozen_weight(tmp_path):
    full = train_frozen(tmp_path / "full")
    train_frozen(tmp_path / "cut", max_steps=7)
    saved = load_file(latest_checkpoint(tmp_path / "cut") / "model.safetensors")
    frozen = {"inp.0.weight", "inp.0.bias", "inp.1.weight", "inp.1.bias"}
    assert not frozen & saved.keys()
    assert saved.keys() == set(full.unwrapped_model.state_dict()) - frozen  # incl. running_mean/var, count
    assert saved["inp.1.num_batches_tracked"].item() == 7  # a buffer of the frozen part that training changed
    resumed = train_frozen(tmp_path / "cut", resume=True)
    a, b = full.unwrapped_model.state_dict(), resumed.unwrapped_model.state_dict()
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert_records_close(read_metrics(tmp_path / "cut")[1], read_metrics(tmp_path / "full")[1])


def test_resume_refuses_other_frozen_weights_or_other_trainable_parameters(tmp_path):
    train_frozen(tmp_path, max_steps=4)
    with pytest.raises(FmrilmError, match=r"the model's frozen weights \(or which parameters are frozen\) differ "
                                          r"from the interrupted run's; build the model from the same base weights"):
        train_frozen(tmp_path, resume=True, model=frozen_input_model(seed=1))
    unfrozen = frozen_input_model().requires_grad_(True)
    with pytest.raises(FmrilmError, match=r"model\.safetensors does not fit the model \(missing \['inp\.0\.bias', "
                                          r"'inp\.0\.weight', 'inp\.1\.bias'\], unknown \[\]\); resume with the model"):
        train_frozen(tmp_path, resume=True, model=unfrozen)


def test_a_checkpoint_holding_the_whole_model_still_resumes(tmp_path):
    """Checkpoints written before they were trimmed held every tensor and no frozen_sha256."""
    full = train_frozen(tmp_path / "full", epochs=2)
    train_frozen(tmp_path / "cut", epochs=2, max_steps=7)
    ckpt = latest_checkpoint(tmp_path / "cut")
    model = frozen_input_model()
    model.load_state_dict({**model.state_dict(), **load_file(ckpt / "model.safetensors")})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["frozen_sha256"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    records = json.loads((ckpt / "checksums.json").read_text())
    for name in ("model.safetensors", "trainer_state.json"):
        records[name] = train_module._file_record(ckpt / name)
    (ckpt / "checksums.json").write_text(json.dumps(records))
    resumed = train_frozen(tmp_path / "cut", epochs=2, resume=True)
    assert torch.allclose(full.unwrapped_model.out.weight, resumed.unwrapped_model.out.weight, atol=1e-6)


def test_checkpoints_rotate_and_verify(tmp_path):
    train(tmp_path, checkpoint_every=4, keep_checkpoints=2)  # 15 steps: 4, 8, 12 and the final 15
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000012", "step-00000015"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-00000015"
    files = {p.name for p in latest_checkpoint(tmp_path).iterdir()}
    assert files == {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json",
                     "checksums.json"}
    verify_checkpoint(latest_checkpoint(tmp_path))
    state = json.loads((latest_checkpoint(tmp_path) / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (15, 3, 0)
    assert TrainConfig.from_dict(state["config"]) == config(checkpoint_every=4, keep_checkpoints=2)


def _flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


@pytest.mark.parametrize("name, damage, match", [
    ("model.safetensors", _flip_bytes, r"model\.safetensors does not match its sha256.*delete the directory .*step-"),
    ("optimizer.pt", _truncate, r"optimizer\.pt is truncated.*delete the directory .*step-"),
    ("checksums.json", _truncate, r"no readable checksums\.json.*delete the directory"),
])
def test_damaged_checkpoint_is_refused_not_skipped(tmp_path, name, damage, match):
    train(tmp_path, checkpoint_every=2, max_steps=6)
    damage(latest_checkpoint(tmp_path) / name)
    with pytest.raises(FmrilmError, match=match):
        train(tmp_path, checkpoint_every=2, resume=True)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FmrilmError, match=r"resume=True but .*checkpoints holds no checkpoint"):
        train(tmp_path, resume=True)


def test_fresh_run_refuses_an_out_dir_with_checkpoints(tmp_path):
    train(tmp_path, max_steps=2)
    with pytest.raises(FmrilmError, match="already holds checkpoints; pass resume=True"):
        train(tmp_path)


@pytest.mark.parametrize("key, value", [("batch_size", 4), ("seed", 1), ("gradient_accumulation", 2)])
def test_resume_refuses_a_changed_data_key(tmp_path, key, value):
    train(tmp_path, max_steps=2)
    with pytest.raises(FmrilmError, match=rf"trained with {key}=\S+ but the config now says {key}={value}"):
        train(tmp_path, resume=True, **{key: value})


@pytest.mark.parametrize("key, value", [
    ("lr", 0), ("lr", float("nan")), ("weight_decay", -1.0), ("epochs", 0), ("epochs", 2.5), ("batch_size", True),
    ("warmup_ratio", 1.0), ("min_lr_ratio", 1.5), ("grad_clip", -0.1), ("precision", "fp16"), ("seed", -1),
    ("checkpoint_every", -1), ("keep_checkpoints", 0), ("log_every", 0), ("max_steps", 0), ("device", "gpu"),
    ("gradient_accumulation", 0), ("num_workers", -2),
])
def test_config_validation_names_field_and_value(key, value):
    with pytest.raises(FmrilmError, match=rf"TrainConfig\.{key}={re.escape(repr(value))} is invalid: it must be"):
        TrainConfig(**{key: value})


def test_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(lr=3e-4, max_steps=7, precision="bf16")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(FmrilmError, match=r"unknown TrainConfig key\(s\) \['lr_max'\]"):
        TrainConfig.from_dict({"lr_max": 1.0})


def test_bf16_runs_on_cpu_with_finite_loss(tmp_path):
    trainer, final = train(tmp_path, precision="bf16", epochs=2)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert all(math.isfinite(v) for k, v in final.items() if k.endswith("loss"))
    trainer_fp32, _ = train(tmp_path / "fp32", epochs=1)  # a later stage may switch precision in one process
    assert trainer_fp32.accelerator.mixed_precision == "no"


def test_only_trainable_params_move_and_norms_biases_skip_decay(tmp_path):
    model = toy_model()
    model.inp.requires_grad_(False)
    frozen = model.inp.weight.detach().clone()
    trainer = Trainer(model, ToyData(), config(epochs=1), tmp_path, trainable_params=model.parameters())
    trainer.fit()
    assert torch.equal(model.inp.weight, frozen)
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and any(p is model.norm.weight for p in plain["params"])


def test_bad_inputs_are_explained(tmp_path):
    with pytest.raises(FmrilmError, match="training dataset has no samples"):
        Trainer(toy_model(), ToyData(n=0), config(), tmp_path)
    frozen = toy_model().requires_grad_(False)
    with pytest.raises(FmrilmError, match="no trainable parameter"):
        Trainer(frozen, ToyData(), config(), tmp_path)
    with pytest.raises(FmrilmError, match=r"loss became (nan|inf) by step 2; lower TrainConfig\.lr"):
        train(tmp_path, data=ToyData(), lr=1e30, grad_clip=0.0, weight_decay=0.0)


def test_tensorboard_receives_the_scalars_when_installed(tmp_path, monkeypatch):
    calls = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter, which needs tensorboard installed
        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def close(self):
            calls.append("closed")

    monkeypatch.setattr(sys.modules[Trainer.__module__], "_summary_writer", lambda directory: Writer())
    train(tmp_path, epochs=1, log_every=5)
    assert calls == [("train/lr", 5), ("train/l2_loss", 5), ("train/loss", 5), ("train/mse_loss", 5),
                     ("epoch/train_l2_loss", 5), ("epoch/train_loss", 5), ("epoch/train_mse_loss", 5), "closed"]


def test_torch_load_is_always_weights_only():
    source = Path(sys.modules[Trainer.__module__].__file__).read_text()
    calls = re.findall(r"torch\.load\(([^)]*)\)", source)
    assert calls and all("weights_only=True" in call for call in calls)

