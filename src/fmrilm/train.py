"""The one training loop the tokenizer, alignment and instruction stages share: Accelerate, checkpoints, exact resume.

A stage builds a model (``model(batch) -> {"loss": ..., "<part>_loss": ...}``), a map-style dataset of dict
samples and a :class:`TrainConfig`, then::

    set_seed(train_cfg.seed)                      # before building the model: same initial weights every run
    trainer = Trainer(TokenizerModel(model_cfg), dataset, train_cfg, out / "train",
                      eval_fn=lambda m: {"val_mse": validate(m, val_set)})
    final = trainer.fit(resume=args.resume)       # dict of the last epoch's train_*_loss and eval metrics
    if trainer.accelerator.is_main_process: save_artifacts(trainer.unwrapped_model, out)

Data order. ``batch_size`` is per process. Epoch e visits a permutation seeded by (seed, e); global micro-batch j
holds its items [j*B*P, (j+1)*B*P) and process p takes the p-th part, so P processes at batch B see what one
process at batch B*P sees (the last, short, micro-batch is split as evenly as possible). An optimizer step takes
``gradient_accumulation`` micro-batches. The lr schedule spans ``epochs``, never ``max_steps``, so stopping early
and resuming change nothing. Random draws inside the dataset's ``__getitem__`` (``random``, NumPy, torch on the
CPU; e.g. a sampled prompt) are seeded by (seed, epoch, item index), so an item is the same whichever process or
worker loads it. DDP averages the processes' losses: P processes at batch B follow one process at batch B with
P-step gradient accumulation exactly, and one process at batch B*P too when each item's loss has the same weight
(a mean over a fixed number of elements; a token-mean loss over texts of unequal length weights tokens otherwise).

Checkpoints keep what training changes (:func:`checkpoint_state`): the parameters with ``requires_grad`` and the
persistent buffers (running statistics, codebooks), each shared tensor once. A frozen LLM is not copied into every
checkpoint (SmolLM2-135M with LoRA: 572 MB -> 34 MB, 23 MB of it AdamW's moments): on resume the stage builds the
model again from its base weights and the checkpoint is loaded over it. ``trainer_state.json`` holds a sha256 of
the frozen tensors, so a model rebuilt from other base weights (or another seed) is refused, not resumed.

Resume. ``fit(resume=True)`` checks the newest checkpoint against its checksums (a damaged file is an error naming
the directory to delete, never a silent fall-back to an older checkpoint), restores weights, optimizer, scheduler,
every process's RNG and the running loss means, and skips the micro-batches of the current epoch already done: the
resumed run ends with the weights of an uninterrupted one. batch_size, seed, gradient_accumulation and the process
count must match the checkpoint; metrics.jsonl lines written after the checkpoint are dropped.

Layout of ``out_dir``::

    train_config.json                  the TrainConfig of the run
    metrics.jsonl                      a JSON line per log step and per epoch end ("event": "epoch")
    tensorboard/                       only when tensorboard is installed
    checkpoints/step-00000120/         built in a temporary directory, then renamed; newest keep_checkpoints kept
        model.safetensors (trainable + buffers) optimizer.pt scheduler.pt rng.pt trainer_state.json checksums.json

Launch. One process: ``python -m fmrilm.cli ...``. Several processes (DDP; gloo on CPU, NCCL on GPUs):
``accelerate launch --multi_gpu --num_processes 2 -m fmrilm.cli ...``, or ``torchrun --nproc_per_node 2 -m
fmrilm.cli ...``; with device "cpu" (or "auto" on a machine without CUDA) the processes join on the CPU. Beware:
``accelerate launch --cpu --num_processes 2`` starts ONE process unless MPI is configured (accelerate issue 2741).
SLURM: one launcher per node (srun) with ``--num_machines $SLURM_NNODES --machine_rank $SLURM_NODEID
--main_process_ip <first node>``. Only the main process logs and writes. Precision comes from
``TrainConfig.precision``; the launcher's ``--mixed_precision`` is ignored.

DeepSpeed ZeRO-2 (optimizer states and gradients sharded over the processes; for full fine-tuning of a larger LLM):
``accelerate launch --config_file src/fmrilm/presets/accelerate/zero2.yaml --num_processes 8 -m fmrilm align ...``.
The micro-batch, clipping and accumulation come from the TrainConfig (DeepSpeed steps at the last micro-batch of
a step). Checkpoints of a DeepSpeed run hold the whole model but only the main process's optimizer shard, so such
a run cannot be resumed (refused). ZeRO-3 is refused: evaluation and saving on the main process need whole
parameters, which ZeRO-3 partitions. DeepSpeed is not a dependency and this path is untested here (no GPU).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from accelerate.utils import broadcast_object_list, gather_object, send_to_device
from accelerate.utils import set_seed as _accelerate_set_seed
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_output_dir, publish_output, sha256_file, write_json_atomic

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
_CHECKPOINT_NAME = re.compile(r"step-\d{8}")
_RESUME_FIXED = ("batch_size", "seed", "gradient_accumulation")  # they decide which samples each step sees


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "weight_decay": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "epochs": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "warmup_ratio": (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "min_lr_ratio": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "grad_clip": (lambda v: _is_num(v) and v >= 0, "a number >= 0 (0 turns clipping off)"),
    "precision": (lambda v: v in ("fp32", "bf16"), "'fp32' or 'bf16'"),
    "seed": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "checkpoint_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = at each epoch end)"),
    "keep_checkpoints": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "log_every": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_steps": (lambda v: v is None or (_is_int(v) and v >= 1), "None or an integer >= 1"),
    "device": (lambda v: v in ("auto", "cpu", "cuda"), "'auto', 'cpu' or 'cuda'"),
    "gradient_accumulation": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "num_workers": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
}


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings shared by every stage; saved in ``train_config.json`` and in every checkpoint."""

    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 0.05  # AdamW decay of matrices; biases and norm gains (ndim < 2) are never decayed
    epochs: int = 50  # passes over the training set; the lr schedule spans all of them
    batch_size: int = 32  # samples per process per micro-batch (global batch = x processes x accumulation)
    warmup_ratio: float = 0.05  # share of all steps spent in the linear warm-up before the cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    precision: str = "fp32"  # "fp32" or "bf16" (autocast through Accelerate, on CPU and CUDA)
    seed: int = 0  # seeds the data order and, per process, the RNGs of a fresh run
    checkpoint_every: int = 0  # steps between checkpoints; 0 = at each epoch end
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    log_every: int = 10  # steps between metrics.jsonl lines
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in all; None = run all epochs
    device: str = "auto"  # "auto" (CUDA when available), "cpu" or "cuda"
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    num_workers: int = 0  # DataLoader worker processes per training process

    def __post_init__(self) -> None:
        for name, (ok, rule) in _RULES.items():
            value = getattr(self, name)
            if not ok(value):
                raise FmrilmError(f"TrainConfig.{name}={value!r} is invalid: it must be {rule}")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from :meth:`to_dict` output, refusing keys that are not fields."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise FmrilmError(f"unknown TrainConfig key(s) {unknown}; allowed keys are {sorted(_RULES)}")
        return cls(**data)


def set_seed(seed: int) -> None:
    """Seed ``random``, NumPy and torch (all devices) in this process."""
    _accelerate_set_seed(seed)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float,
                       min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``round(warmup_ratio * total_steps)`` steps, then a cosine from lr to lr * min_lr_ratio.

    Step s (0-based) of a warm-up of w steps uses lr * (s + 1) / (w + 1), so no step is wasted at lr 0; the cosine
    starts at lr at step w and reaches lr * min_lr_ratio after ``total_steps`` steps.
    """
    warmup = round(warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """Return the newest ``out_dir/checkpoints/step-<8 digits>`` directory, or None when there is none."""
    root = Path(out_dir) / "checkpoints"
    found = sorted(p for p in root.glob("step-*") if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name))
    return found[-1] if found else None


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of a checkpoint against ``checksums.json``.

    Raises
    ------
    FmrilmError
        Naming the missing, truncated or corrupted file and the checkpoint directory to delete.
    """
    path = Path(path)
    fix = f"delete the directory {path} and resume again (from the previous checkpoint, if any)"
    try:
        records = json.loads((path / "checksums.json").read_text())
        if not isinstance(records, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise FmrilmError(f"checkpoint {path} has no readable checksums.json ({err}); {fix}") from None
    for name in CHECKPOINT_FILES:
        if name not in records:
            raise FmrilmError(f"checkpoint {path} has no checksum for {name}; {fix}")
    for name, record in records.items():
        problem = _file_problem(path / name, record)
        if problem:
            raise FmrilmError(f"checkpoint file {path / name} {problem}; {fix}")


def _file_record(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _file_problem(path: Path, record: Mapping[str, Any]) -> str | None:
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"is truncated or overwritten ({size} bytes, {record['bytes']} expected)"
    if _file_record(path)["sha256"] != record["sha256"]:
        return "does not match its sha256 checksum (corrupted)"
    return None


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects


def _changing(model: torch.nn.Module) -> set[str]:
    """Names (every alias) of the parameters with requires_grad and of the buffers."""
    names = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return names | {name for name, _ in model.named_buffers(remove_duplicate=False)}


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint keeps: trainable parameters and persistent buffers, by state-dict name.

    Frozen parameters are left out (the model is rebuilt from its base weights on resume); a tensor shared by
    several names (tied weights) is kept under its first name. Tensors are detached, on the CPU, and own their
    memory (safetensors refuses views into a larger storage).
    """
    changing, kept, seen = _changing(model), {}, set()
    for name, tensor in model.state_dict().items():
        key = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if name not in changing or (tensor.numel() and key in seen):
            continue
        seen.add(key)
        tensor = tensor.detach().cpu().contiguous()
        owns = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
        kept[name] = tensor if owns else tensor.clone()
    return kept


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of the frozen parameters (those checkpoints leave out)."""
    changing, digest = _changing(model), hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name in changing:
            continue
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy())  # the buffer itself, no copy
    return digest.hexdigest()


def _load_weights(model: torch.nn.Module, path: Path, fix: str) -> None:
    """Load a checkpoint's tensors over a freshly built model; every trainable tensor must be in the file.
    A checkpoint holding the whole model (written before checkpoints were trimmed) loads too."""
    state, known = load_file(str(path)), model.state_dict().keys()
    missing = sorted(set(checkpoint_state(model)) - set(state))
    unknown = sorted(set(state) - set(known))
    if missing or unknown:
        raise FmrilmError(f"checkpoint {path} does not fit the model (missing {missing[:3]}, unknown "
                          f"{unknown[:3]}); {fix}")
    model.load_state_dict(state, strict=False)


def _rng_state() -> dict[str, Any]:
    # NumPy's key array becomes a tensor so that torch.load(weights_only=True) accepts the file
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
            cached], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class _ShardedBatches(Sampler[list[int]]):
    """This process's part of each global micro-batch of one epoch, from micro-batch ``start`` on."""

    def __init__(self, n: int, batch_size: int, processes: int, rank: int, seed: int, epoch: int, start: int):
        self.n, self.size, self.processes, self.rank = n, batch_size * processes, processes, rank
        self.seed, self.epoch, self.start = seed, epoch, start

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        for first in range(self.start * self.size, self.n, self.size):
            chunk = order[first:first + self.size]
            if len(chunk) < self.processes:  # every process needs a batch, or DDP would wait for ever
                chunk = np.concatenate([chunk, np.resize(order, self.processes - len(chunk))])
            yield np.array_split(chunk, self.processes)[self.rank].tolist()

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.size) - self.start)


class _SeededItems(Dataset):
    """``data[i]`` with ``random``, NumPy and the CPU torch generator seeded by (seed, epoch, i), restored after."""

    def __init__(self, data: Dataset, seed: int, epoch: int):
        self.data, self.seed, self.epoch = data, seed, epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        value = int(np.random.SeedSequence([self.seed, self.epoch, int(i)]).generate_state(1)[0])
        random.seed(value)
        np.random.seed(value)
        torch.default_generator.manual_seed(value)  # not torch.manual_seed, which would reseed CUDA as well
        try:
            return self.data[i]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class _Mean:
    """Running mean of the loss parts over micro-batches; ``reduce`` also averages over processes."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.count = 0

    def add(self, parts: Mapping[str, torch.Tensor]) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.count += 1

    def reduce(self, accelerator: Accelerator) -> dict[str, float]:
        """Every process must call this at the same point (it is a collective)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        sums = [torch.as_tensor(self.sums[k], dtype=torch.float32, device=accelerator.device) for k in keys]
        return dict(zip(keys, accelerator.reduce(torch.stack(sums) / self.count, "mean").tolist()))

    def state(self, accelerator: Accelerator) -> dict[str, Any]:
        return {"means": self.reduce(accelerator), "count": self.count}

    def load(self, state: Mapping[str, Any]) -> None:
        # process means are restored on every process: averaging them again over processes leaves them unchanged
        self.count = state["count"]
        self.sums = {key: mean * self.count for key, mean in state["means"].items()}


@dataclasses.dataclass
class _Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch in progress
    batch: int = 0  # micro-batches of that epoch done (the same count on every process)


def _param_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    # decay only matrices: biases and norm gains (ndim < 2) set scales and offsets that decay would only bias to 0
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _loss_parts(out: Any) -> dict[str, torch.Tensor]:
    if not isinstance(out, Mapping) or "loss" not in out:
        raise TypeError(f"model(batch) must return a dict with a 'loss' tensor, got {type(out).__name__}")
    return {k: v.detach().float() for k, v in out.items() if k == "loss" or k.endswith("_loss")}


def _make_accelerator(config: TrainConfig) -> Accelerator:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise FmrilmError("TrainConfig.device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")
    # Accelerate keeps one state per process and refuses a second Accelerator with another precision; stages run
    # one after another in one process, so forget the finished stage's state (the process group stays)
    AcceleratorState._reset_state(reset_partial_state=False)
    # without cpu=True a torchrun-launched CPU-only job would run as independent single processes; DeepSpeed joins
    # them itself (gloo on a CPU) and needs cpu=False
    cpu = config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no",
                              cpu=cpu and not _deepspeed_launch())
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, config)
    if accelerator.num_processes > 1:  # gloo/NCCL threads alive at interpreter exit abort the process
        atexit.register(_destroy_process_group)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise FmrilmError(f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate joined "
                          f"{accelerator.num_processes}; use device='cpu' or 'auto' for CPU training")
    return accelerator


def _deepspeed_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # set by accelerate launch


def _configure_deepspeed(accelerator: Accelerator, config: TrainConfig) -> None:
    """The DeepSpeed settings that must follow the TrainConfig: micro-batch and clipping; the Trainer accumulates
    gradients itself, so DeepSpeed's own accumulation is 1. ZeRO-3 is refused (see the module docstring)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin.zero_stage == 3:
        raise FmrilmError("DeepSpeed ZeRO-3 is not supported by the fmrilm Trainer (evaluation and checkpoints on the "
                          "main process need whole parameters); launch with presets/accelerate/zero2.yaml")
    plugin.deepspeed_config.update(train_micro_batch_size_per_gpu=config.batch_size, gradient_accumulation_steps=1,
                                   gradient_clipping=config.grad_clip)


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Trainer:
    """Train ``model`` on ``train_data`` with AdamW, a warm-up + cosine schedule, checkpoints and exact resume.

    Parameters
    ----------
    model : torch.nn.Module
        ``model(batch) -> dict`` with a scalar ``"loss"`` to minimise and any ``"*_loss"`` parts to log.
    train_data : torch.utils.data.Dataset
        Map-style dataset (``len`` and ``[i]``) of samples that ``collate_fn`` turns into a batch dict.
    config : TrainConfig
    out_dir : str or Path
        Receives metrics.jsonl, train_config.json and checkpoints/ (see the module docstring).
    collate_fn : callable, optional
        List of samples -> batch dict; default :func:`torch.utils.data.default_collate`.
    eval_fn : callable, optional
        ``eval_fn(model) -> {name: float}``, run under ``torch.no_grad`` on the main process at each epoch end
        with the unwrapped model in eval mode; its metrics go into the epoch line and to every process.
    trainable_params : iterable of Parameter, optional
        What AdamW updates (default: all parameters); parameters with ``requires_grad=False`` are left out.
    """

    def __init__(self, model: torch.nn.Module, train_data: Dataset, config: TrainConfig, out_dir: str | Path, *,
                 collate_fn: Callable[[list[Any]], Any] | None = None,
                 eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
                 trainable_params: Iterable[torch.nn.Parameter] | None = None) -> None:
        if len(train_data) == 0:
            raise FmrilmError("the training dataset has no samples; check the data given to the stage")
        self.config, self.out_dir, self.train_data = config, Path(out_dir), train_data
        self.collate_fn, self.eval_fn = collate_fn, eval_fn
        self.accelerator = _make_accelerator(config)
        self._deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        params = [p for p in (model.parameters() if trainable_params is None else trainable_params) if p.requires_grad]
        if not params:
            raise FmrilmError("the model has no trainable parameter (none has requires_grad=True); unfreeze some")
        processes = self.accelerator.num_processes
        self.batches_per_epoch = math.ceil(len(train_data) / (config.batch_size * processes))
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation)
        self.total_steps = self.steps_per_epoch * config.epochs
        optimizer = torch.optim.AdamW(_param_groups(params, config.weight_decay), lr=config.lr)
        # the scheduler is not handed to Accelerate, which would step it once per process
        self.scheduler = cosine_with_warmup(optimizer, self.total_steps, config.warmup_ratio, config.min_lr_ratio)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self._params, self._pos, self._lr = params, _Position(), config.lr
        self._meters = {"log": _Mean(), "epoch": _Mean()}
        self._last_metrics: dict[str, Any] = {}
        self._writer: Any = None
        self._frozen: str | None = None

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without its DDP wrapper: the one to save or to evaluate."""
        return self.accelerator.unwrap_model(self.model)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``epochs`` are done or ``max_steps`` is reached, then return the newest metrics line.

        Parameters
        ----------
        resume : bool
            Continue from the newest checkpoint in ``out_dir`` (an error when there is none). Without it, an
            ``out_dir`` that already holds checkpoints is refused.
        """
        if resume:
            self._restore()
        else:
            self._start()
        self.model.train()
        self._writer = _summary_writer(self.out_dir / "tensorboard") if self.accelerator.is_main_process else None
        show = self.accelerator.is_main_process and sys.stderr.isatty()
        total = min(self.total_steps, self.config.max_steps or self.total_steps)
        with tqdm(total=total, initial=self._pos.step, disable=not show, desc="train", dynamic_ncols=True) as bar:
            while not self._finished():
                self._run_epoch(bar)
        if self._writer is not None:
            self._writer.close()
        self.accelerator.wait_for_everyone()
        return dict(self._last_metrics)

    def publish(self, work: str | Path, out: str | Path) -> None:
        """Main process: replace ``out`` by the finished stage output built in ``work`` (a staging directory of an
        overwrite, see :func:`fmrilm.io.training_output`); every process waits for it."""
        if self.accelerator.is_main_process:
            publish_output(work, out)
        self.accelerator.wait_for_everyone()

    def _finished(self) -> bool:
        limit = self.config.max_steps
        return self._pos.epoch >= self.config.epochs or (limit is not None and self._pos.step >= limit)

    def _start(self) -> None:
        if latest_checkpoint(self.out_dir) is not None:
            raise FmrilmError(f"{self.out_dir} already holds checkpoints; pass resume=True to continue that run "
                              "or choose another output directory")
        set_seed(self.config.seed + self.accelerator.process_index)
        if self.accelerator.is_main_process:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            write_json_atomic(self.out_dir / "train_config.json", self.config.to_dict())
        self.accelerator.wait_for_everyone()

    def _restore(self) -> None:
        ckpt = latest_checkpoint(self.out_dir)
        if ckpt is None:
            raise FmrilmError(f"resume=True but {self.out_dir / 'checkpoints'} holds no checkpoint; "
                              "run without resume to start from scratch")
        verify_checkpoint(ckpt)
        state = json.loads((ckpt / "trainer_state.json").read_text())
        self._check_resumable(state, ckpt)
        fix = "resume with the model (and the trainable parameters) the interrupted run was started with"
        _load_weights(self.unwrapped_model, ckpt / "model.safetensors", fix)  # read on CPU, copied to the model
        self._check_frozen(state, ckpt)
        self.optimizer.load_state_dict(_load(ckpt / "optimizer.pt"))
        self.scheduler.load_state_dict(_load(ckpt / "scheduler.pt"))
        _set_rng_state(_load(ckpt / "rng.pt")[self.accelerator.process_index])
        for name, meter in self._meters.items():
            meter.load(state["meters"][name])
        self._pos = _Position(state["step"], state["epoch"], state["batch_in_epoch"])
        self._last_metrics = state["last_metrics"]
        if self.accelerator.is_main_process:
            _drop_metrics_after(self.out_dir / "metrics.jsonl", self._pos.step)
        self.accelerator.wait_for_everyone()

    def _check_resumable(self, state: Mapping[str, Any], ckpt: Path) -> None:
        if state.get("deepspeed") or self._deepspeed:
            raise FmrilmError(f"cannot resume from {ckpt}: DeepSpeed runs do not resume (ZeRO shards the optimizer "
                              "states over the processes and a checkpoint keeps the main process's part only); start "
                              "the run again, or train without the DeepSpeed config (DDP) for resumable checkpoints")
        for key in _RESUME_FIXED:
            old, new = state["config"][key], getattr(self.config, key)
            if old != new:
                raise FmrilmError(f"cannot resume from {ckpt}: it was trained with {key}={old!r} but the config "
                                  f"now says {key}={new!r}; set {key}={old!r} or start a new run elsewhere")
        old, new = state["num_processes"], self.accelerator.num_processes
        if old != new:
            raise FmrilmError(f"cannot resume from {ckpt}: it was trained on {old} processes but this run has "
                              f"{new}; launch with --num_processes {old}")

    def _check_frozen(self, state: Mapping[str, Any], ckpt: Path) -> None:
        saved = state.get("frozen_sha256")  # absent in checkpoints that held the whole model
        if saved is not None and saved != self._frozen_sha256():
            raise FmrilmError(f"cannot resume from {ckpt}: the model's frozen weights (or which parameters are "
                              "frozen) differ from the interrupted run's; build the model from the same base "
                              "weights, seed and trainable parameters")

    def _frozen_sha256(self) -> str:
        if self._frozen is None:  # frozen tensors never change: hash them once per run
            self._frozen = frozen_fingerprint(self.unwrapped_model)
        return self._frozen

    def _run_epoch(self, bar: tqdm) -> None:
        cfg, pos = self.config, self._pos
        sampler = _ShardedBatches(len(self.train_data), cfg.batch_size, self.accelerator.num_processes,
                                  self.accelerator.process_index, cfg.seed, pos.epoch, pos.batch)
        # a generator of its own keeps the DataLoader from drawing on the global RNG when it starts an epoch
        items = _SeededItems(self.train_data, cfg.seed, pos.epoch)
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
        batches, epoch = iter(loader), pos.epoch
        while pos.epoch == epoch and not self._finished():  # _after_step moves on to the next epoch
            n = min(cfg.gradient_accumulation, self.batches_per_epoch - pos.batch)
            parts = self._train_step(batches, n)
            pos.step, pos.batch = pos.step + 1, pos.batch + n
            bar.update()
            if not bar.disable:
                bar.set_postfix({k: f"{v.item():.4g}" for k, v in parts.items()}, refresh=False)
            self._after_step()

    def _train_step(self, batches: Iterator[Any], n: int) -> dict[str, torch.Tensor]:
        for i in range(n):
            batch = send_to_device(next(batches), self.accelerator.device)
            self.accelerator.gradient_state._set_sync_gradients(i == n - 1)  # DeepSpeed steps at the last one
            # DDP all-reduces gradients only after the step's last micro-batch
            with contextlib.nullcontext() if i == n - 1 else self.accelerator.no_sync(self.model):
                out = self.model(batch)
                parts = _loss_parts(out)
                self.accelerator.backward(out["loss"] / n)
            for meter in self._meters.values():
                meter.add(parts)
        if self.config.grad_clip > 0:
            self.accelerator.clip_grad_norm_(self._params, self.config.grad_clip)
        self._lr = self.optimizer.param_groups[0]["lr"]  # the lr this step used, for the log
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts

    def _after_step(self) -> None:
        pos, every = self._pos, self.config.checkpoint_every
        if pos.step % self.config.log_every == 0:
            self._record({"step": pos.step, "epoch": pos.epoch, "lr": self._lr, **self._take_means("log")})
        epoch_done = pos.batch == self.batches_per_epoch
        if epoch_done:
            self._end_epoch()
        if (every and pos.step % every == 0) or (not every and epoch_done) or self._finished():
            self._save_checkpoint()

    def _take_means(self, name: str) -> dict[str, float]:
        means = self._meters[name].reduce(self.accelerator)
        self._meters[name] = _Mean()
        for key, value in means.items():
            if not math.isfinite(value):
                raise FmrilmError(f"{key} became {value} by step {self._pos.step}; lower TrainConfig.lr "
                                  f"(now {self.config.lr}) or use precision='fp32'")
        return means

    def _end_epoch(self) -> None:
        pos = self._pos
        record = {"event": "epoch", "epoch": pos.epoch, "step": pos.step}
        record.update({f"train_{k}": v for k, v in self._take_means("epoch").items()})
        metrics = self._evaluate()
        clash = sorted(set(metrics) & set(record))
        if clash:
            raise ValueError(f"eval_fn returned reserved metric name(s) {clash}; rename them")
        self._record({**record, **metrics})
        pos.epoch, pos.batch = pos.epoch + 1, 0

    def _evaluate(self) -> dict[str, float]:
        if self.eval_fn is None:
            return {}
        box: list[Any] = [None]
        if self.accelerator.is_main_process:
            model = self.unwrapped_model
            model.eval()
            with torch.no_grad():
                box[0] = {k: float(v) for k, v in self.eval_fn(model).items()}
            model.train()
        broadcast_object_list(box)  # every process returns the same final metrics
        return box[0]

    def _record(self, record: dict[str, Any]) -> None:
        self._last_metrics = record
        if not self.accelerator.is_main_process:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")
        prefix = "epoch/" if record.get("event") == "epoch" else "train/"
        for key, value in record.items():
            if self._writer is not None and key not in ("event", "step", "epoch"):
                self._writer.add_scalar(prefix + key, value, record["step"])

    def _save_checkpoint(self) -> None:
        rng = gather_object([_rng_state()])  # collectives: every process takes part
        meters = {name: meter.state(self.accelerator) for name, meter in self._meters.items()}
        if self.accelerator.is_main_process:
            self._write_checkpoint(rng, meters)
        self.accelerator.wait_for_everyone()

    def _write_checkpoint(self, rng: list[dict[str, Any]], meters: dict[str, Any]) -> None:
        pos = self._pos
        final = self.out_dir / "checkpoints" / f"step-{pos.step:08d}"
        state = {"step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch,
                 "num_processes": self.accelerator.num_processes, "config": self.config.to_dict(),
                 "meters": meters, "last_metrics": self._last_metrics, "frozen_sha256": self._frozen_sha256(),
                 "deepspeed": self._deepspeed}
        with atomic_output_dir(final, overwrite=True) as tmp:
            save_file(checkpoint_state(self.unwrapped_model), str(tmp / "model.safetensors"))
            # a DeepSpeed run does not resume, and ZeRO's optimizer state is sharded: nothing worth keeping
            torch.save({} if self._deepspeed else self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng, tmp / "rng.pt")
            write_json_atomic(tmp / "trainer_state.json", state)
            write_json_atomic(tmp / "checksums.json", {name: _file_record(tmp / name) for name in CHECKPOINT_FILES})
        kept = sorted(p for p in final.parent.iterdir() if _CHECKPOINT_NAME.fullmatch(p.name))
        for old in kept[:-self.config.keep_checkpoints]:
            shutil.rmtree(old)


def _summary_writer(directory: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl holds everything
        return None
    return SummaryWriter(str(directory))


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget the lines an interrupted run wrote after its last checkpoint; the resumed run writes them again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)
