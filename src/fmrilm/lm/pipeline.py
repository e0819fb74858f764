"""``fmrilm align`` and ``fmrilm describe-scan``: Stage 2 on a described cohort and a trained tokenizer.

Outputs of :func:`run_align` in ``LM`` (a self-contained model directory)::

    config.json, fmri_modules.safetensors, llm/   the model (FMRILanguageModel.from_pretrained(LM) loads it)
    tokenizer/                                    a copy of the frozen Stage 1 tokenizer (config + weights)
    preprocess.json                               what standardizes a new scan as the cohort's were
    eval.json                                     held-out metrics (fmrilm.lm.evaluate)
    align_meta.json                               inputs, split, settings; written LAST: marks a finished run
    run.json                                      the run's settings, compared on resume
    train/                                        the shared Trainer's metrics.jsonl and checkpoints/
    cache/tokens/                                 every scan's tokenizer features and codes (.npy, reused)

With ``overwrite`` an existing ``LM`` stays as it is while the new run builds in ``.LM.overwrite`` beside it; the
finished run replaces it in one swap (``resume`` continues an interrupted overwrite; :func:`fmrilm.io.training_output`).

What the model sees. Every scan is encoded once by the frozen tokenizer, streaming over the cohort's HDF5
store in batches into memory-mapped ``.npy`` files, so memory does not grow with the cohort. A training item
is one scan of a training subject: its features (W, N, h) and codes (W, N) (F2F), its descriptor text (F2T,
``texts.jsonl`` field ``text`` or one domain; cut to the whole sentences that fit ``max_text_tokens``, eos
after them) and one English paragraph (T2T; item i takes paragraph perm[i mod P] of the 90 % training part
of :func:`fmrilm.lm.corpus.english_corpus`, the other 10 % give the held-out perplexity).

Split. The subject-level rule of the tokenizer stage (:func:`fmrilm.tokenizer.pipeline.split_subjects`): the
phenotypes' ``split`` column ("train" vs the rest) when present, else a fraction of subjects drawn with seed
0, so the same cohort gives the same held-out subjects in both stages (a warning says when they differ).

Sequence length and CPU. The block has W*N tokens but only W positions (the ROIs of a step share one), so
the LLM's context limits text, not the grid. The paper's grid, P=32 on 160 points and N=450 ROIs, is 2,250
fMRI tokens per scan: supported (the float attention mask is S x S, 22 MB per scan at S = 2,350), but each
training sample then costs ~3 x 2 x 106 M x 2,350 ~ 1.5 TFLOP for SmolLM2-135M, tens of seconds on a CPU.
CPU runs shrink the grid: a smaller atlas (116 ROIs, ``schaefer100_tian_s1``) with P=32 gives 580 tokens
(W=5), and P=80 gives W=2, 232 tokens. P=160 (W=1) cannot train F2F, which predicts step w+1 from steps
<= w: it is refused unless ``config_overrides={"f2f_weight": 0}``. The stage defaults (``TRAIN_DEFAULTS``,
``MODEL_DEFAULTS``) are such CPU-sized quick settings; on a GPU raise epochs and batch size.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from fmrilm import __version__
from fmrilm.data.cohort import load_cohort
from fmrilm.errors import FmrilmError, FmrilmWarning
from fmrilm.io import check_same_run, sha256_file, training_output, write_json_atomic
from fmrilm.lm.evaluate import HeldOut, evaluate_alignment, generate_texts
from fmrilm.lm.model import CONFIG_FILE, FMRI_FILE, LLM_DIR, FMRILanguageModel, FMRILMConfig
from fmrilm.lm.objectives import collate, f2t_example, pad_right, t2t_batch
from fmrilm.tokenizer.model import FMRITokenizer
from fmrilm.train import TrainConfig, Trainer, set_seed

META_FILE, EVAL_FILE, RUN_FILE, PREPROCESS_FILE = "align_meta.json", "eval.json", "run.json", "preprocess.json"
TOKENIZER_DIR, TRAIN_DIR, CACHE_DIR = "tokenizer", "train", "cache"
_OWNED = (META_FILE, EVAL_FILE, RUN_FILE, PREPROCESS_FILE, TOKENIZER_DIR, CONFIG_FILE, FMRI_FILE, LLM_DIR, TRAIN_DIR)
_FROM_DATA = ("n_rois", "n_steps", "feature_dim", "codebook_size", "tokenizer_dir", "llm")  # never overridden
MAX_TEXT_TOKENS = 96  # F2T target budget: whole sentences of the description (eos included)
LM_MAX_TOKENS = 96  # T2T paragraph budget (pydoc paragraphs average ~60 SmolLM2 tokens)
# CPU quick settings (see the module docstring); lora_dropout 0 also saves the ~10 % a dropout mask costs.
TRAIN_DEFAULTS = {"epochs": 1, "batch_size": 4, "lr": 2e-3, "warmup_ratio": 0.1, "weight_decay": 0.0,
                  "log_every": 5}
MODEL_DEFAULTS = {"lora_dropout": 0.0, "f2f_weight": 0.5}


# ------------------------------------------------------------------------------------------ token cache
class TokenCache:
    """Tokenizer features (S, W, N, h) float32 and codes (S, W, N) int32 of every scan, memory-mapped.

    The maps are opened lazily once per process (a map must not be pickled into DataLoader workers).
    """

    def __init__(self, directory: Path):
        self.directory, self._maps, self._pid = Path(directory), None, None

    def _open(self) -> tuple[np.ndarray, np.ndarray]:
        if self._maps is None or self._pid != os.getpid():
            self._maps = tuple(np.load(self.directory / f"{n}.npy", mmap_mode="r") for n in ("features", "codes"))
            self._pid = os.getpid()
        return self._maps

    @property
    def features(self) -> np.ndarray:
        return self._open()[0]

    @property
    def codes(self) -> np.ndarray:
        return self._open()[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None, "_pid": None}


def _cache_key(cohort: Path, tokenizer_dir: Path, scan_ids: list[str]) -> dict:
    # The HDF5 store can be large: its size and modification time stand for its content; the tokenizer is small.
    stat = (cohort / "timeseries.h5").stat()
    return {"tokenizer_sha256": sha256_file(tokenizer_dir / "model.safetensors"),
            "tokenizer_config_sha256": sha256_file(tokenizer_dir / "config.json"),
            "cohort": str(cohort.resolve()), "timeseries_bytes": stat.st_size, "timeseries_mtime_ns": stat.st_mtime_ns,
            "scan_ids_sha256": hashlib.sha256(json.dumps(scan_ids).encode()).hexdigest()}


def encode_cohort(cohort: str | os.PathLike, tokenizer_dir: str | os.PathLike, cache: str | os.PathLike,
                  batch_size: int = 16) -> TokenCache:
    """Encode every scan of ``cohort`` with the frozen tokenizer into ``cache`` (reused while inputs are unchanged).

    Returns
    -------
    TokenCache
        ``features`` (S, W, N, h) float32 and ``codes`` (S, W, N) int32, cohort order.
    """
    cohort, tokenizer_dir, cache = Path(cohort), Path(tokenizer_dir), Path(cache)
    with load_cohort(cohort) as opened:
        key = _cache_key(cohort, tokenizer_dir, [str(s) for s in opened.scans["scan_id"]])
        if (cache / "key.json").is_file() and json.loads((cache / "key.json").read_text()) == key:
            return TokenCache(cache)
        tokenizer = FMRITokenizer.from_pretrained(tokenizer_dir)
        c = tokenizer.config
        shape = (len(opened), c.n_patches, c.n_rois)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "key.json").unlink(missing_ok=True)  # the old maps are invalid from here on
        features = np.lib.format.open_memmap(cache / ".features.npy", "w+", np.float32, (*shape, c.hidden))
        codes = np.lib.format.open_memmap(cache / ".codes.npy", "w+", np.int32, shape)
        with torch.no_grad():
            for start in range(0, len(opened), batch_size):
                stop = min(start + batch_size, len(opened))
                batch_codes, batch_features = tokenizer.encode(torch.from_numpy(opened.timeseries[start:stop]))
                features[start:stop], codes[start:stop] = batch_features.numpy(), batch_codes.numpy()
        features.flush(), codes.flush()
        del features, codes
    for name in ("features", "codes"):
        os.replace(cache / f".{name}.npy", cache / f"{name}.npy")
    write_json_atomic(cache / "key.json", key)  # last: marks a complete cache
    return TokenCache(cache)


# ------------------------------------------------------------------------------------------ texts
def target_text(text: str, tokenizer, max_tokens: int) -> str:
    """The description cut to its first whole sentences that fit ``max_tokens`` LLM tokens with the eos.

    When even the first sentence does not fit, its first ``max_tokens`` tokens (decoded) are returned.
    """
    sentences = re.split(r"(?<=[.!?])\s+", text.strip())
    kept: list[str] = []
    for sentence in sentences:
        if len(tokenizer(" ".join(kept + [sentence]), add_special_tokens=False).input_ids) + 1 > max_tokens:
            break
        kept.append(sentence)
    if kept:
        return " ".join(kept)
    return tokenizer.decode(tokenizer(sentences[0], add_special_tokens=False).input_ids[:max_tokens]).strip()


def _descriptor_columns(descriptors: Path) -> list[str]:
    from fmrilm.descriptors.pipeline import load_descriptors

    return [c for c in load_descriptors(descriptors).columns if c not in ("scan_id", "subject_id")]


# ------------------------------------------------------------------------------------------ training parts
class AlignDataset(Dataset):
    """Item i: scan ``indices[i]``'s features (W, N, h), codes (W, N) (when F2F is on), F2T ``text_ids`` /
    ``text_labels`` (L,), and T2T ``lm_ids`` (L',) of paragraph ``order[i % P]``."""

    def __init__(self, cache: TokenCache, indices: np.ndarray, texts: list[dict], paragraphs: list[Tensor],
                 with_codes: bool, seed: int = 0):
        self.cache, self.indices, self.texts, self.paragraphs = cache, np.asarray(indices), texts, paragraphs
        self.with_codes, self.order = with_codes, np.random.default_rng(seed).permutation(len(paragraphs))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        scan = int(self.indices[i])
        item = {"features": torch.from_numpy(np.array(self.cache.features[scan])), **self.texts[scan],
                "lm_ids": self.paragraphs[self.order[i % len(self.order)]]}
        if self.with_codes:
            item["codes"] = torch.from_numpy(np.array(self.cache.codes[scan], dtype=np.int64))
        return item


class AlignCollator:
    """Scan parts through :func:`fmrilm.lm.objectives.collate`; T2T ids right-padded with ``lm_attention``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict[str, Tensor]:
        batch = collate([{k: v for k, v in item.items() if k != "lm_ids"} for item in items], self.pad_id)
        rows = [item["lm_ids"] for item in items]
        batch["lm_ids"] = pad_right(rows, self.pad_id)
        batch["lm_attention"] = pad_right([[1] * len(r) for r in rows], 0)
        return batch


def build_config(tokenizer_config, tokenizer_dir: Path, llm: str, lora: bool, overrides: Mapping | None) -> FMRILMConfig:
    """Grid sizes from the tokenizer, ``MODEL_DEFAULTS``, the adaptation mode, then ``overrides``."""
    overrides = dict(overrides or {})
    fixed = sorted(set(overrides) & set(_FROM_DATA))
    if fixed:
        raise FmrilmError(f"fMRI-LM settings {fixed} come from the tokenizer and the llm argument and cannot be "
                          "overridden")
    settings = {**MODEL_DEFAULTS, "lora": lora, "full_finetune": not lora, **overrides}
    config = FMRILMConfig.from_tokenizer(tokenizer_config, tokenizer_dir=str(tokenizer_dir.resolve()), llm=llm,
                                         **settings)
    if config.n_steps < 2 and config.f2f_weight > 0:
        raise FmrilmError(f"tokenizer {tokenizer_dir} gives W={config.n_steps} time step per scan, but F2F predicts "
                          "step w+1 from steps <= w and needs W >= 2; use a tokenizer with patch_size <= length/2 "
                          "or pass config_overrides={'f2f_weight': 0}")
    return config


def stage_train_config(train: TrainConfig | Mapping | None) -> TrainConfig:
    """``train`` itself when a TrainConfig, else ``TRAIN_DEFAULTS`` updated with the ``train`` fields."""
    return train if isinstance(train, TrainConfig) else TrainConfig.from_dict({**TRAIN_DEFAULTS, **dict(train or {})})


class _Rows:
    """Rows ``indices`` of an array-like, read one at a time (keeps memory maps lazy)."""

    def __init__(self, array, indices: Sequence[int]):
        self.array, self.indices = array, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.array[self.indices[i]])


# ------------------------------------------------------------------------------------------ run
def run_align(
    cohort: str | os.PathLike, tokenizer: str | os.PathLike, descriptors: str | os.PathLike, out: str | os.PathLike,
    *, llm: str = "smollm2-135m", lora: bool = True, config_overrides: Mapping | None = None,
    train: TrainConfig | Mapping | None = None, held_out_fraction: float = 0.1, max_text_tokens: int = MAX_TEXT_TOKENS,
    text_field: str = "text", n_generate: int = 32, resume: bool = False, overwrite: bool = False,
) -> dict:
    """Align an LLM with a trained tokenizer's fMRI tokens and write the model to ``out`` (module docstring).

    Parameters
    ----------
    cohort, tokenizer, descriptors
        A prepared cohort, a Stage 1 tokenizer trained on its atlas and length, and its ``fmrilm describe`` output.
    out
        Output directory; one holding a finished model is refused unless ``overwrite``, which replaces it once the
        new model is complete.
    llm, lora
        Base causal LM (:func:`fmrilm.lm.backbone.load_backbone`); LoRA adapters (default) or full fine-tuning.
    config_overrides
        FMRILMConfig fields over ``MODEL_DEFAULTS`` (projector, loss weights, LoRA rank...; not the grid sizes).
    train
        A TrainConfig used as is, or TrainConfig fields over ``TRAIN_DEFAULTS`` (``precision="bf16"``...).
    held_out_fraction
        Fraction of subjects held out when the phenotypes have no ``split`` column.
    max_text_tokens, text_field
        F2T target budget (tokens, eos included) and texts.jsonl field ("text" or a domain: fc, fg, ica, graph).
    n_generate
        Held-out scans described by generation in the evaluation.
    resume
        Continue the run in ``out/train`` (or an interrupted overwrite of ``out``) from its newest checkpoint.

    Returns
    -------
    dict
        The metrics written to ``eval.json``; for a run stopped by ``max_steps`` before its last step,
        ``{"finished": False, "steps_done": ..., "total_steps": ...}`` and only checkpoints are written.
    """
    from fmrilm.tokenizer.pipeline import field_texts, load_inputs, split_subjects

    final, tokenizer = Path(out), Path(tokenizer)
    out = _check_out(final, resume, overwrite)  # a staging directory when overwriting
    inputs = load_inputs(cohort, descriptors, [text_field])
    config = build_config(_tokenizer_config(tokenizer, inputs), tokenizer, llm, lora, config_overrides)
    split = split_subjects(inputs, held_out_fraction)
    with load_cohort(inputs.cohort) as opened:
        preprocess, scan_ids = _preprocess_record(opened), [str(s) for s in opened.scans["scan_id"]]
    _warn_split_mismatch(tokenizer, split)
    train_cfg = stage_train_config(train)
    texts = field_texts(inputs, text_field)
    cache = TokenCache(out / CACHE_DIR / "tokens")  # filled below, once the Trainer knows the main process
    set_seed(train_cfg.seed)  # same initial weights on every run and every process
    model = FMRILanguageModel(config)
    freeze_unused_head(model, trains_f2f=config.f2f_weight > 0)
    targets = [target_text(t, model.tokenizer, max_text_tokens) for t in texts]
    dataset, english_held = _training_set(model, cache, split["train"], targets, max_text_tokens, train_cfg.seed)
    run = {"cohort": str(inputs.cohort.resolve()), "descriptors": str(inputs.descriptors.resolve()),
           "tokenizer": str(tokenizer.resolve()), "llm": llm, "model_config": model.config.to_dict(),
           "text_field": text_field, "max_text_tokens": max_text_tokens, "held_out_fraction": held_out_fraction,
           "held_out_subjects": split["held_out_subjects"], "train_subjects_sha256": split["train_subjects_sha256"]}
    trainer = Trainer(model, dataset, train_cfg, out / TRAIN_DIR, collate_fn=AlignCollator(model.tokenizer.pad_token_id))
    if trainer.accelerator.is_main_process:
        encode_cohort(inputs.cohort, tokenizer, cache.directory)
    _start_run(trainer, out, run, resume)  # waits for every process
    trainer.fit(resume=resume)
    steps = _steps_done(trainer)
    if steps < trainer.total_steps:
        return {"finished": False, "steps_done": steps, "total_steps": trainer.total_steps}
    held = _held_out(cache, split, targets, _descriptor_columns(inputs.descriptors), english_held, scan_ids)
    run.update(train_config=train_cfg.to_dict(), split_method=split["method"], n_train_scans=len(split["train"]),
               n_held_out_scans=len(split["held_out"]), fmri_tokens_per_scan=model.config.n_steps * model.config.n_rois)
    metrics = _finish(trainer, held, preprocess, tokenizer, out, run, n_generate)
    trainer.publish(out, final)
    return metrics


def freeze_unused_head(model: FMRILanguageModel, trains_f2f: bool) -> None:
    """Freeze the F2F code head of a run whose batches carry no codes: it would get no gradient, and DDP refuses
    trainable parameters without one ("Expected to have finished reduction in the prior iteration")."""
    if not trains_f2f:
        model.fmri.head.requires_grad_(False)


def _training_set(model: FMRILanguageModel, cache: TokenCache, train: np.ndarray, targets: list[str],
                  max_text_tokens: int, seed: int) -> tuple[AlignDataset, list[str]]:
    """The training items (F2T targets and T2T paragraphs tokenized once) and the held-out English paragraphs."""
    from fmrilm.lm.corpus import english_corpus, split_corpus

    english_train, english_held = split_corpus(english_corpus(), held_out_fraction=0.1, seed=0)
    examples = [f2t_example(model.tokenizer, t, max_text_tokens) for t in targets]
    paragraphs = [t2t_batch(model.tokenizer, [p], LM_MAX_TOKENS)["lm_ids"][0] for p in english_train]
    return AlignDataset(cache, train, examples, paragraphs, model.config.f2f_weight > 0, seed), english_held


def _held_out(cache: TokenCache, split: dict, targets: list[str], columns: list[str], paragraphs: list[str],
              scan_ids: list[str]) -> HeldOut:
    """Evaluation inputs; the majority baselines count the training scans (references: the first 2,000)."""
    held, train = split["held_out"], split["train"]
    return HeldOut(_Rows(cache.features, held), _Rows(cache.codes, held), [targets[i] for i in held], columns,
                   np.asarray(cache.codes[train]), [targets[i] for i in train[:2000]], paragraphs,
                   [scan_ids[i] for i in held])


def _check_out(out: Path, resume: bool, overwrite: bool, *, marker: str = META_FILE,
               owned: Sequence[str] = _OWNED, what: str = "an aligned fMRI-LM", command: str = "align") -> Path:
    """Refuse a finished model (unless overwrite) and an unfinished run not resumed, before any work; return the
    directory to build in (:func:`fmrilm.io.training_output`). ``marker`` (written last) marks a finished run,
    ``owned`` lists the stage's outputs (Stage 3 reuses this)."""
    return training_output(out, resume, overwrite, marker=marker, what=what, train_dir=TRAIN_DIR,
                                 owned=tuple(owned), keep=(CACHE_DIR,), command=command)


def _tokenizer_config(tokenizer: Path, inputs):
    from fmrilm.tokenizer.model import CONFIG_FILE as TOK_CONFIG
    from fmrilm.tokenizer.config import TokenizerConfig

    if not (tokenizer / TOK_CONFIG).is_file() or not (tokenizer / "model.safetensors").is_file():
        raise FmrilmError(f"{tokenizer} is not a trained tokenizer (needs config.json and model.safetensors); "
                          "run 'fmrilm train-tokenizer' first")
    config = TokenizerConfig.from_dict(json.loads((tokenizer / TOK_CONFIG).read_text())["config"])
    if (config.n_rois, config.length) != (inputs.n_rois, inputs.length):
        raise FmrilmError(f"tokenizer {tokenizer} expects {config.n_rois} ROIs x {config.length} time points but "
                          f"cohort {inputs.cohort} has {inputs.n_rois} x {inputs.length}; use a tokenizer trained "
                          "on this cohort's atlas and length")
    return config


def _preprocess_record(opened) -> dict:
    """The cohort's settings and fitted statistics that standardize a new scan (see describe_scan)."""
    meta = opened.meta
    keys = ("preprocess", "site_normaliser", "n_rois", "atlas", "atlas_image", "tr", "length")
    return {"format": "fmrilm.preprocess/1", **{k: meta.get(k) for k in keys},
            "roi_names": [str(n) for n in opened.rois["name"]]}


def _warn_split_mismatch(tokenizer: Path, split: dict) -> None:
    path = tokenizer / "tokenizer_meta.json"
    if path.is_file():
        held = json.loads(path.read_text()).get("held_out_subjects")
        if held is not None and sorted(held) != split["held_out_subjects"]:
            warnings.warn(f"the tokenizer {tokenizer} held out other subjects than this split; held-out metrics "
                          "may include subjects the tokenizer trained on", FmrilmWarning, stacklevel=3)


def _start_run(trainer: Trainer, out: Path, run: dict, resume: bool, owned: Sequence[str] = _OWNED) -> None:
    """Fresh run: clear this stage's outputs in ``out`` (the build directory; the cache stays). Resume: the settings
    must be the run's."""
    if trainer.accelerator.is_main_process:
        if resume:
            check_same_run(out / RUN_FILE, run)
        else:
            for name in owned:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / RUN_FILE, run)
    trainer.accelerator.wait_for_everyone()


def _steps_done(trainer: Trainer) -> int:
    from fmrilm.train import latest_checkpoint

    newest = latest_checkpoint(trainer.out_dir)  # the Trainer checkpoints whenever it stops
    return json.loads((newest / "trainer_state.json").read_text())["step"] if newest else 0


def _finish(trainer: Trainer, held: HeldOut, preprocess: dict, tokenizer: Path, out: Path, run: dict,
            n_generate: int) -> dict:
    """Main process: evaluate, then write the model, preprocess.json, tokenizer/, eval.json and, last, the meta."""
    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if trainer.accelerator.is_main_process:
        model = trainer.unwrapped_model.eval()
        # fp32 whatever the training precision: decoding reads every weight per token, and autocast would
        # cast the frozen weights again at each step (slower on a CPU), besides making metrics precision-bound
        metrics = evaluate_alignment(model, held, max_new_tokens=run["max_text_tokens"],
                                     max_text_tokens=run["max_text_tokens"], n_generate=n_generate,
                                     lm_max_len=LM_MAX_TOKENS)
        _save_model(model, out)
        write_json_atomic(out / PREPROCESS_FILE, preprocess)
        _copy_tokenizer(tokenizer, out / TOKENIZER_DIR)
        write_json_atomic(out / EVAL_FILE, metrics)
        meta = {"format": "fmrilm.align_meta/1", "fmrilm_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **run,
                "trainable_parameters": model.trainable_parameters()}
        write_json_atomic(out / META_FILE, meta)
        box[0] = metrics
    broadcast_object_list(box)
    return box[0]


def _save_model(model: FMRILanguageModel, out: Path) -> None:
    """save_pretrained replaces a whole directory, so save beside and move the model's files into ``out``."""
    staging = out / ".model-staging"
    model.save_pretrained(staging, overwrite=True)
    for name in (CONFIG_FILE, FMRI_FILE, LLM_DIR):
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        if (staging / name).exists():
            os.replace(staging / name, target)
    shutil.rmtree(staging)


def _copy_tokenizer(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors", "tokenizer_meta.json", "eval.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


# ------------------------------------------------------------------------------------------ describe a scan
class AlignedModel:
    """An aligned LM directory loaded for inference: ``model``, ``tokenizer`` (Stage 1), ``preprocess``."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        if not (directory / PREPROCESS_FILE).is_file() or not (directory / TOKENIZER_DIR).is_dir():
            raise FmrilmError(f"{directory} is not an 'fmrilm align' output ({PREPROCESS_FILE} or {TOKENIZER_DIR}/ "
                              "is missing); run 'fmrilm align' first")
        self.directory, self.preprocess = directory, json.loads((directory / PREPROCESS_FILE).read_text())
        self.tokenizer = FMRITokenizer.from_pretrained(directory / TOKENIZER_DIR)
        self.model = FMRILanguageModel.from_pretrained(directory)
        meta = directory / META_FILE
        self.max_new_tokens = json.loads(meta.read_text())["max_text_tokens"] if meta.is_file() else MAX_TEXT_TOKENS


def read_scan(path: str | os.PathLike, preprocess: dict, *, tr: float | None = None, site: str | None = None,
              mat_key: str | None = None, transpose: bool = False) -> np.ndarray:
    """A new scan file standardized as the cohort's scans were: (length, N) float32 (its first window).

    ROI time-series files (npy, csv, tsv, txt, 1D, mat) are (T, N), or (N, T) with ``transpose``; a 4D NIfTI
    (.nii, .nii.gz) is parcellated with the cohort's atlas when that atlas has a label image.
    """
    from fmrilm.data.prepare import standardize_new_scan
    from fmrilm.data.readers import orient, read_matrix

    path, n_rois = Path(path), int(preprocess["n_rois"])
    if path.name.lower().endswith((".nii", ".nii.gz")):
        x, tr = _read_nifti(path, preprocess, tr)
    else:
        x = orient(read_matrix(path, mat_key), n_rois, "time-cols" if transpose else "auto", path)
    if tr is None:
        raise FmrilmError(f"{path}: unknown TR; pass --tr SECONDS, the scan's native repetition time")
    try:
        return standardize_new_scan(x, float(tr), preprocess, site)[0]
    except FmrilmError as exc:
        raise FmrilmError(f"{path}: {exc}") from None


def _read_nifti(path: Path, preprocess: dict, tr: float | None) -> tuple[np.ndarray, float | None]:
    from fmrilm.data.atlas import list_atlases, load_atlas
    from fmrilm.data.nifti import parcellate, tr_from_image

    image = preprocess.get("atlas_image")
    if not image:
        raise FmrilmError(f"{path}: the cohort's atlas {preprocess['atlas']!r} has no label image, so a NIfTI "
                          "cannot be parcellated; give the scan's ROI time series instead")
    atlas = load_atlas(preprocess["atlas"] if preprocess["atlas"] in list_atlases() else image)
    return parcellate(path, atlas), tr if tr is not None else tr_from_image(path)


def describe_scans(model: FMRILanguageModel, features: Tensor | np.ndarray, *, max_new_tokens: int = MAX_TEXT_TOKENS,
                   batch_size: int = 8) -> list[str]:
    """Greedy descriptions (KV cache) of a batch of scans.

    Parameters
    ----------
    model : FMRILanguageModel
    features : (B, W, N, h)
        Tokenizer encoder features of the scans.

    Returns
    -------
    list of B str
    """
    model.eval()
    if isinstance(features, Tensor):
        features = features.detach().float().cpu().numpy()
    return generate_texts(model, np.asarray(features, dtype=np.float32), max_new_tokens, batch_size)


def describe_scan(model_dir: str | os.PathLike | AlignedModel, scan_file: str | os.PathLike | Sequence, *,
                  tr: float | None = None, site: str | None = None, mat_key: str | None = None,
                  transpose: bool = False, max_new_tokens: int | None = None, batch_size: int = 8) -> str | list[str]:
    """Describe one scan file (or a list of them) in words with an aligned model.

    Parameters
    ----------
    model_dir
        An ``fmrilm align`` output directory, or an :class:`AlignedModel` already loaded from one.
    scan_file
        A file in any format prepare accepts (see :func:`read_scan`), or a list of such files.
    tr, site, mat_key, transpose
        Native TR in seconds (required unless a NIfTI header gives it), acquisition site (for the cohort's
        site statistics), MATLAB variable name, and whether time runs along columns.
    max_new_tokens
        Token budget of each description; default the trained target budget.

    Returns
    -------
    str for one file, list of str (same order) for a list.
    """
    aligned = model_dir if isinstance(model_dir, AlignedModel) else AlignedModel(model_dir)
    files = [scan_file] if isinstance(scan_file, (str, os.PathLike)) else list(scan_file)
    scans = np.stack([read_scan(f, aligned.preprocess, tr=tr, site=site, mat_key=mat_key, transpose=transpose)
                      for f in files])  # (B, T, N)
    with torch.no_grad():
        _, features = aligned.tokenizer.encode(torch.from_numpy(scans))
    texts = describe_scans(aligned.model, features, max_new_tokens=max_new_tokens or aligned.max_new_tokens,
                           batch_size=batch_size)
    return texts[0] if isinstance(scan_file, (str, os.PathLike)) else texts
