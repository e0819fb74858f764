"""``fmrilm train-tokenizer`` and ``fmrilm tokenize``: Stage 1 on a prepared and described cohort.

Outputs of :func:`run_train_tokenizer` in ``OUT``::

    config.json, model.safetensors    the tokenizer (FMRITokenizer.from_pretrained(OUT) loads it)
    eval.json                         held-out metrics (fmrilm.tokenizer.evaluate)
    tokenizer_meta.json               inputs, LLM, split, settings; written LAST: it marks a finished tokenizer
    run.json                          the run's settings, compared on resume
    train/                            the shared Trainer's train_config.json, metrics.jsonl, checkpoints/
    cache/text_features*.safetensors  the frozen LLM's descriptor-text features (reused when unchanged)

Every file is written through a temporary name and a rename, so a crash never leaves a half-written one.

What the model sees. Training subjects' scans, read lazily from the cohort's HDF5 store (one handle per process),
each with the frozen LLM's pooled states of its descriptor text, computed once: by default the last-token state
of the whole paragraph (``texts.jsonl`` field ``text``, the paper's choice); with ``text_fields`` = the four
domains, each domain paragraph pooled on its own and the results concatenated (see :func:`run_train_tokenizer`). Each batch also carries ``4 x B`` frozen LLM input embeddings of English prose tokens
(:func:`fmrilm.lm.corpus.english_corpus`, 90 % of paragraphs; the rest serve the held-out domain accuracy),
drawn with a generator seeded by the batch's item indices, so a resumed run draws the same.

DANN progress. The gradient-reversal ramp needs p = step / total steps. :class:`ProgressTracker` wraps the
training module and counts training micro-batches in an integer buffer; the buffer is part of the weights the
Trainer checkpoints, so after a resume p continues exactly where it stopped (p = micro-batches done / all
micro-batches of the run, which equals optimizer steps / total steps when ``gradient_accumulation`` is 1).

Stage defaults. ``TRAIN_DEFAULTS`` holds the TrainConfig fields per preset (the ``train`` argument overrides
them); every tokenizer setting comes from the preset and ``overrides``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from fmrilm import __version__
from fmrilm.data.cohort import load_cohort
from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_file, check_same_run, link_tree, training_output, write_json_atomic
from fmrilm.tokenizer.config import TokenizerConfig, load_preset
from fmrilm.tokenizer.evaluate import evaluate_tokenizer, scan_batches
from fmrilm.tokenizer.model import CONFIG_FILE, WEIGHTS_FILE, FMRITokenizer, FMRITokenizerForTraining
from fmrilm.train import TrainConfig, Trainer, set_seed

META_FILE, EVAL_FILE, RUN_FILE, TRAIN_DIR, CACHE_DIR = "tokenizer_meta.json", "eval.json", "run.json", "train", "cache"
TEXT_FIELDS = ("text", "fc", "fg", "ica", "graph")  # texts.jsonl: the whole paragraph, then one per domain
DOMAIN_FIELDS = TEXT_FIELDS[1:]
_OWNED = (META_FILE, EVAL_FILE, RUN_FILE, CONFIG_FILE, WEIGHTS_FILE, TRAIN_DIR)  # what --overwrite removes
_FROM_DATA = ("n_rois", "length", "text_dim", "llm_embed_dim", "n_networks")  # from the cohort and the LLM, fixed
SPLIT_SEED = 0  # the held-out subjects do not move when the training seed changes
TOKENS_PER_SCAN = 4  # English token embeddings per scan in a batch (B2 = 4 B)
EVAL_TOKENS = 4096  # held-out English tokens for the domain accuracy
TRAIN_DEFAULTS: dict[str, dict] = {  # per preset (file stem, lower case); "default" for the others
    "default": {"epochs": 50, "batch_size": 32, "lr": 3e-4, "warmup_ratio": 0.05, "log_every": 10},
    "quick": {"epochs": 8, "batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.05, "log_every": 10},  # CPU minutes
    "tiny": {"epochs": 15, "batch_size": 8, "lr": 2e-3, "warmup_ratio": 0.05, "log_every": 10},
}


# ----------------------------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class StageInputs:
    """A cohort matched with its descriptor texts: ``texts[i]`` describes scan i; ``gradients`` (N, 3) or None;
    ``networks`` (N,) each ROI's index into ``network_names`` (sorted), or None when the ROI table lacks networks."""

    cohort: Path
    descriptors: Path
    subjects: list[str]
    texts: list[str]
    gradients: np.ndarray | None
    n_rois: int
    length: int
    phenotypes: pd.DataFrame
    networks: np.ndarray | None = None
    network_names: list[str] = dataclasses.field(default_factory=list)
    fields: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # texts.jsonl fields read, cohort order


def load_inputs(cohort: str | os.PathLike, descriptors: str | os.PathLike,
                fields: Sequence[str] = ("text",)) -> StageInputs:
    """Open the cohort and its ``fmrilm describe`` output and check that they belong together.

    ``texts.jsonl`` is read once, line by line, keeping only the ``fields`` asked for (``"text"`` always), so
    :func:`field_texts` of those fields reads nothing more.
    """
    cohort, descriptors = Path(cohort), Path(descriptors)
    with load_cohort(cohort) as opened:
        scan_ids, subjects = ([str(s) for s in opened.scans[c]] for c in ("scan_id", "subject_id"))
        (_, length, n_rois), phenotypes = opened.timeseries.shape, opened.phenotypes
        names = opened.rois["network"] if "network" in opened.rois else None
    keep = list(dict.fromkeys(["text", *[f for f in fields if f in TEXT_FIELDS]]))
    records = _read_texts(descriptors, keep)
    texts = _match_texts(records, scan_ids, subjects, cohort, descriptors)
    chosen = {field: [str(records[s].get(field) or "") for s in scan_ids] for field in keep}
    networks, network_names = _roi_networks(names)
    return StageInputs(cohort, descriptors, subjects, texts, _reference_gradients(descriptors, n_rois), int(n_rois),
                       int(length), phenotypes, networks, network_names, chosen)


def _roi_networks(names: pd.Series | None) -> tuple[np.ndarray | None, list[str]]:
    """Each ROI's index into the sorted network names of the ROI table; (None, []) when any ROI has none."""
    if names is None or names.isna().any() or (names.astype(str).str.strip() == "").any():
        return None, []
    network_names = sorted(names.astype(str).unique())
    return names.astype(str).map({n: i for i, n in enumerate(network_names)}).to_numpy(np.int64), network_names


def _read_texts(descriptors: Path, fields: Sequence[str]) -> dict[str, dict]:
    """{scan_id: {"subject_id", *fields}} of ``texts.jsonl``, streamed line by line (other fields dropped)."""
    path = descriptors / "texts.jsonl"
    if not path.is_file():
        raise FmrilmError(f"{descriptors} is not an 'fmrilm describe' output ({path.name} is missing); "
                          f"run 'fmrilm describe COHORT --out {descriptors}'")
    records = {}
    with path.open(encoding="utf-8") as lines:
        for line in filter(str.strip, lines):
            record = json.loads(line)
            records[str(record["scan_id"])] = {k: record.get(k) for k in ("subject_id", *fields)}
    return records


def _match_texts(records: dict, scan_ids: list[str], subjects: list[str], cohort: Path, descriptors: Path) -> list[str]:
    fix = f"run 'fmrilm describe {cohort} --out DESC' on this cohort and pass that DESC"
    known = set(scan_ids)  # once: a set per record made this quadratic (16 s at 20,000 scans)
    foreign = [s for s in records if s not in known]
    moved = [s for s, subject in zip(scan_ids, subjects) if s in records and str(records[s]["subject_id"]) != subject]
    if foreign or moved:
        example = (foreign or moved)[0]
        raise FmrilmError(f"descriptors {descriptors} were made from another cohort: {len(foreign)} of their scan ids "
                          f"are not in {cohort} and {len(moved)} belong to other subjects (e.g. {example!r}); {fix}")
    missing = [s for s in scan_ids if s not in records]
    if missing:
        raise FmrilmError(f"{len(missing)} of {len(scan_ids)} scans of {cohort} have no descriptor text in "
                          f"{descriptors / 'texts.jsonl'} (e.g. {missing[0]!r}); {fix}")
    texts = [str(records[s].get("text") or "") for s in scan_ids]
    if "" in texts:
        raise FmrilmError(f"scan {scan_ids[texts.index('')]!r} has an empty descriptor text in {descriptors}; {fix}")
    return texts


def field_texts(inputs: StageInputs, field: str) -> list[str]:
    """Per-scan texts of one ``texts.jsonl`` field (:data:`TEXT_FIELDS`), in cohort order."""
    if field not in TEXT_FIELDS:
        raise FmrilmError(f"text field {field!r} is not one of {', '.join(TEXT_FIELDS)}")
    if field == "text":
        return inputs.texts
    chosen = inputs.fields.get(field)
    if chosen is None:  # not asked for by load_inputs: one more pass over texts.jsonl
        with load_cohort(inputs.cohort) as opened:
            scan_ids = [str(s) for s in opened.scans["scan_id"]]
        records = _read_texts(inputs.descriptors, [field])
        chosen = inputs.fields[field] = [str(records[s].get(field) or "") for s in scan_ids]
    if "" in chosen:
        with load_cohort(inputs.cohort) as opened:
            scan = str(opened.scans["scan_id"].iloc[chosen.index("")])
        raise FmrilmError(f"scan {scan!r} has no {field!r} text in {inputs.descriptors}; "
                          "describe the cohort with that domain, or use the field 'text'")
    return chosen


def _reference_gradients(descriptors: Path, n_rois: int) -> np.ndarray | None:
    """(N, 3) first three group gradients of the describe reference, or None when absent or unusable."""
    path = descriptors / "reference" / "arrays.safetensors"
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    gradients = load_file(str(path)).get("group_gradients")
    if gradients is None or gradients.ndim != 2 or gradients.shape[0] != n_rois or gradients.shape[1] < 3:
        return None
    gradients = gradients[:, :3].astype(np.float32)
    return gradients if np.isfinite(gradients).all() else None


def split_subjects(inputs: StageInputs, held_out_fraction: float) -> dict:
    """Subject-level split: ``split == "train"`` subjects train when the phenotypes have that column, the rest
    is held out; otherwise a seeded ``held_out_fraction`` of the subjects is held out. No subject is in both.

    Returns
    -------
    dict
        ``train`` (n_train,) and ``held_out`` (n_held,) scan indices, ``method``, ``held_out_subjects``.
    """
    subjects, phenotypes = np.array(inputs.subjects), inputs.phenotypes
    if "split" in phenotypes.columns:
        train = set(phenotypes.loc[phenotypes["split"].astype(str) == "train", "subject_id"].astype(str))
        method = "phenotype column 'split' ('train' vs the rest)"
    else:
        if not 0 < held_out_fraction < 1:
            raise FmrilmError(f"held_out_fraction={held_out_fraction} must be in (0, 1); 0.1 is usual")
        unique = np.unique(subjects)
        n_held = min(max(1, round(held_out_fraction * len(unique))), len(unique) - 1)
        held = set(unique[np.random.default_rng(SPLIT_SEED).permutation(len(unique))[:n_held]])
        train, method = set(unique) - held, f"seeded {held_out_fraction:g} of the subjects (seed {SPLIT_SEED})"
    is_train = np.isin(subjects, list(train))
    if is_train.all() or not is_train.any():
        part = "held-out" if is_train.all() else "training"
        raise FmrilmError(f"the subject split of {inputs.cohort} leaves no {part} scan ({method}); "
                          "give the phenotypes a 'split' column with both 'train' and other values")
    return {"train": np.flatnonzero(is_train), "held_out": np.flatnonzero(~is_train), "method": method,
            "held_out_subjects": sorted(set(subjects[~is_train])),
            "train_subjects_sha256": _sha256(sorted(set(subjects[is_train])))}


def _sha256(values: list[str]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------- text side
@dataclasses.dataclass
class TextSide:
    """The frozen LLM's part: ``features`` (S, H) per scan; ``pool`` (U, H) embeddings of the distinct English
    training tokens, ``stream`` (L,) indices into it in text order (drawn at natural frequency); ``eval_tokens``
    (m, H) held-out English token embeddings."""

    features: Tensor
    pool: Tensor
    stream: np.ndarray
    eval_tokens: Tensor
    info: dict


def encode_text_side(llm: str, texts: list[str] | Mapping[str, list[str]], cache: Path, pooling: str = "last",
                     depth: float = 1.0) -> TextSide:
    """Load the LLM, compute descriptor features and the English token pools, then free the LLM.

    ``texts`` is one text per scan, or several (a mapping field -> texts, each field pooled on its own and the
    features concatenated in the mapping's order: (S, len(texts) * hidden)). ``pooling`` and ``depth`` are those
    of :func:`fmrilm.lm.backbone.text_features`; features are cached per field in ``cache`` (a directory).
    """
    from fmrilm.lm.backbone import backbone_info, load_backbone, text_features, token_embedding_table
    from fmrilm.lm.corpus import english_corpus, split_corpus

    # bf16 weights: the descriptor pass (300 paragraphs of ~800 tokens) runs about 3x faster than in fp32 on a CPU,
    # and the features are pooled in fp32; SmolLM2's weights come 4-bit quantised, so bf16 loses nothing that matters.
    model, tokenizer = load_backbone(llm, dtype=torch.bfloat16)
    context = getattr(model.config, "max_position_embeddings", None) or 512
    max_length = int(min(context, 2048))  # descriptor paragraphs are ~500-1500 tokens; keep all that fits
    parts = dict(texts) if isinstance(texts, Mapping) else {"text": list(texts)}
    features = torch.cat([text_features(model, tokenizer, part, pooling=pooling, max_length=max_length, depth=depth,
                                        cache=cache / _cache_name(field)) for field, part in parts.items()], dim=1)
    table = token_embedding_table(model)  # (V, H) frozen copy
    train_text, held_text = split_corpus(english_corpus(), held_out_fraction=0.1, seed=0)
    unique, stream = np.unique(_token_ids(tokenizer, train_text), return_inverse=True)
    held = _token_ids(tokenizer, held_text)
    held = np.random.default_rng(0).choice(held, size=min(EVAL_TOKENS, len(held)), replace=False)
    info = {**backbone_info(model), "text_max_length": max_length, "pooling": pooling, "depth": depth,
            "text_fields": list(parts),
            "english_tokens": int(len(stream)), "english_distinct_tokens": int(len(unique))}
    side = TextSide(features, table[torch.from_numpy(unique)].clone(), stream.astype(np.int64),
                    table[torch.from_numpy(held)].clone(), info)
    del model, tokenizer, table
    gc.collect()  # the LLM is not needed again in this stage
    return side


def _cache_name(field: str) -> str:
    return "text_features.safetensors" if field == "text" else f"text_features_{field}.safetensors"


def _token_ids(tokenizer, paragraphs: list[str]) -> np.ndarray:
    ids = tokenizer(paragraphs, add_special_tokens=False, verbose=False)["input_ids"]
    return np.concatenate([np.asarray(i, dtype=np.int64) for i in ids])


# ----------------------------------------------------------------------------------------------- training parts
class ScanDataset(Dataset):
    """Map-style training set: item i -> {"x" (T, N), "text_features" (H,), "index" ()} of scan ``indices[i]``.

    The HDF5 file is opened lazily, once per process (a handle must not cross fork or pickling).
    """

    def __init__(self, cohort: Path, indices: np.ndarray, features: Tensor):
        self.cohort, self.indices, self.features = Path(cohort), np.asarray(indices), features
        self._opened, self._pid = None, None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if self._opened is None or self._pid != os.getpid():
            self._opened, self._pid = load_cohort(self.cohort), os.getpid()
        scan = int(self.indices[i])
        return {"x": torch.from_numpy(self._opened.scan(scan)), "text_features": self.features[scan],
                "index": torch.tensor(scan)}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_opened": None, "_pid": None}


class EnglishTokenCollator:
    """Collate scans and add ``text_token_embeddings`` (TOKENS_PER_SCAN * B, H) drawn from the English stream.

    The draw is seeded by (seed, the batch's scan indices): the same batch always gets the same tokens, so a
    resumed run is exact, and batches differ from epoch to epoch because the shuffled batches do.
    """

    def __init__(self, pool: Tensor, stream: np.ndarray, seed: int, per_scan: int = TOKENS_PER_SCAN):
        self.pool, self.stream, self.seed, self.per_scan = pool, stream, seed, per_scan

    def __call__(self, items: list[dict]) -> dict:
        batch = default_collate(items)
        rng = np.random.default_rng([self.seed, *batch["index"].tolist()])
        picks = self.stream[rng.integers(0, len(self.stream), self.per_scan * len(items))]
        batch["text_token_embeddings"] = self.pool[torch.from_numpy(picks)]
        return batch


class ProgressTracker(nn.Module):
    """The training module plus a checkpointed counter of training micro-batches that sets the DANN progress."""

    def __init__(self, model: FMRITokenizerForTraining, total_batches: int = 1):
        super().__init__()
        self.model, self.total_batches = model, total_batches
        self.register_buffer("batches_done", torch.zeros((), dtype=torch.int64))  # saved with the weights

    def forward(self, batch: dict) -> dict[str, Tensor]:
        if self.training:  # the Trainer's evaluation runs in eval mode and must not advance the ramp
            self.model.set_progress(min(1.0, int(self.batches_done) / max(1, self.total_batches)))
            self.batches_done += 1
        return self.model(batch)

    @property
    def finished(self) -> bool:
        return int(self.batches_done) >= self.total_batches


def build_config(preset: str, inputs: StageInputs, hidden_size: int, overrides: Mapping | None,
                 text_parts: int = 1) -> TokenizerConfig:
    """The preset with sizes from the cohort and the LLM (``text_parts`` pooled texts of ``hidden_size`` each per
    scan); gradient positioning on when gradients exist (``overrides={"gradient_positioning": False}`` turns it
    off)."""
    overrides = dict(overrides or {})
    fixed = sorted(set(overrides) & set(_FROM_DATA))
    if fixed:
        raise FmrilmError(f"tokenizer settings {fixed} come from the cohort and the LLM and cannot be overridden")
    if overrides.get("gradient_positioning") and inputs.gradients is None:
        raise FmrilmError(f"gradient_positioning needs the group gradients of {inputs.descriptors / 'reference'}, "
                          "which are missing or do not match the cohort's ROIs; run 'fmrilm describe' again")
    sizes = {"n_rois": inputs.n_rois, "length": inputs.length, "text_dim": hidden_size * text_parts,
             "llm_embed_dim": hidden_size,
             "gradient_positioning": inputs.gradients is not None,
             "n_networks": max(1, len(inputs.network_names))}
    config = load_preset(preset, **{**sizes, **overrides})
    if config.contrast_pooling == "network" and inputs.networks is None:  # asked for by the preset or an override
        raise FmrilmError(f"contrast_pooling 'network' needs each ROI's network, the 'network' column of "
                          f"{inputs.cohort / 'rois.parquet'}, which is missing or incomplete; prepare the cohort with "
                          "an atlas whose labels name networks, or set contrast_pooling to 'mean'")
    return config


def stage_train_config(preset: str, train: TrainConfig | Mapping | None) -> TrainConfig:
    """``train`` itself when a TrainConfig, else the stage defaults for the preset updated with ``train``."""
    if isinstance(train, TrainConfig):
        return train
    defaults = TRAIN_DEFAULTS.get(Path(str(preset)).stem.lower(), TRAIN_DEFAULTS["default"])
    return TrainConfig.from_dict({**defaults, **dict(train or {})})


# ----------------------------------------------------------------------------------------------- run
def run_train_tokenizer(
    cohort: str | os.PathLike, descriptors: str | os.PathLike, out: str | os.PathLike, *,
    preset: str = "quick", llm: str = "smollm2-135m", train: TrainConfig | Mapping | None = None,
    overrides: Mapping | None = None, held_out_fraction: float = 0.1, text_pooling: str = "mean",
    text_fields: Sequence[str] = DOMAIN_FIELDS, text_depth: float = 0.8, resume: bool = False, overwrite: bool = False,
) -> dict:
    """Train the Stage 1 tokenizer on a described cohort and write it to ``out`` (see the module docstring).

    Parameters
    ----------
    cohort, descriptors
        A prepared cohort and the ``fmrilm describe`` output made from it.
    out
        Output directory; one holding a finished tokenizer is refused unless ``overwrite``.
    preset, overrides
        Tokenizer preset name or JSON path, and TokenizerConfig fields replacing the preset's.
    llm
        The frozen LLM whose text space the tokens are aligned with (:func:`fmrilm.lm.backbone.load_backbone`).
    train
        A TrainConfig used as is, or a dict of TrainConfig fields over the stage defaults (``TRAIN_DEFAULTS``).
    held_out_fraction
        Fraction of subjects held out when the phenotypes have no ``split`` column.
    text_fields, text_pooling, text_depth
        How descriptor texts become text features: the ``texts.jsonl`` fields pooled one by one and concatenated,
        the pooling (``"last"`` token or ``"mean"`` over tokens) and the LLM layer as a fraction of its depth
        (1.0: the final output). The paper pools the whole paragraph (``("text",)``) at its last token of the final
        layer; with SmolLM2-135M those features hardly tell scans apart (even a perfect fMRI side, the descriptors
        themselves, retrieves at chance; benchmarks/bench_text_features.py), while the default - each domain
        paragraph mean-pooled at 0.8 of the depth - raises that ceiling well above chance (README, Stage 1).
    resume
        Continue the run in ``out/train`` from its newest checkpoint.

    Returns
    -------
    dict
        The held-out metrics written to ``eval.json``; for a run stopped by ``max_steps`` before its last step,
        ``{"finished": False, "batches_done": ..., "total_batches": ...}`` and nothing but checkpoints is written.
    """
    final = Path(out)
    out = _check_out(final, resume, overwrite)  # a staging directory when overwriting
    inputs = load_inputs(cohort, descriptors, text_fields)
    split = split_subjects(inputs, held_out_fraction)
    train_cfg = stage_train_config(preset, train)
    build_config(preset, inputs, 8, overrides)  # a bad preset or override fails before the LLM is loaded
    fields = list(dict.fromkeys(text_fields))
    if not fields:
        raise FmrilmError("text_fields is empty; give at least one of " + ", ".join(TEXT_FIELDS))
    texts = {field: field_texts(inputs, field) for field in fields}  # checked before the LLM is loaded
    if out != final and (final / CACHE_DIR).is_dir() and not (out / CACHE_DIR).exists():
        # a fresh overwrite starts from the old run's text features (reused when unchanged); a resumed one has them
        link_tree(final / CACHE_DIR, out / CACHE_DIR)
    text = encode_text_side(llm, texts, out / CACHE_DIR, text_pooling, text_depth)
    config = build_config(preset, inputs, text.info["hidden_size"], overrides, text_parts=len(fields))
    run = {"cohort": str(inputs.cohort.resolve()), "descriptors": str(inputs.descriptors.resolve()), "llm": llm,
           "text_pooling": text_pooling, "text_fields": fields, "text_depth": float(text_depth),
           "preset": str(preset), "tokenizer_config": config.to_dict(),
           "held_out_fraction": held_out_fraction, "held_out_subjects": split["held_out_subjects"],
           "train_subjects_sha256": split["train_subjects_sha256"]}
    trainer, tracker = _make_trainer(config, train_cfg, inputs, split, text, out)
    _start_run(trainer, out, run, resume)
    trainer.fit(resume=resume)
    if not tracker.finished:
        return {"finished": False, "batches_done": int(tracker.batches_done), "total_batches": tracker.total_batches}
    metrics = _finish(trainer, tracker.model, inputs, split, text, out, {**run, "train_config": train_cfg.to_dict()})
    trainer.publish(out, final)
    return metrics


def _make_trainer(config: TokenizerConfig, train_cfg: TrainConfig, inputs: StageInputs, split: dict,
                  text: TextSide, out: Path) -> tuple[Trainer, ProgressTracker]:
    set_seed(train_cfg.seed)  # the same initial weights on every run and every process
    networks = inputs.networks if config.contrast_pooling == "network" else None
    tracker = ProgressTracker(FMRITokenizerForTraining(config, inputs.gradients, networks))
    tracker.model.criterion.contrast.set_text_statistics(text.features[split["train"]])  # training texts only
    tracker.model.criterion.contrast.init_bias_for_batch(train_cfg.batch_size)  # pairs are contrasted per process
    held = split["held_out"]

    def eval_fn(module: ProgressTracker) -> dict[str, float]:  # cheap per-epoch check; the full eval is at the end
        metrics = evaluate_tokenizer(module.model.tokenizer, inputs.cohort, held)
        return {"val_reconstruction_r2": metrics["reconstruction_r2"] or 0.0,
                "val_codebook_usage": metrics["codebook_usage"]}

    trainer = Trainer(tracker, ScanDataset(inputs.cohort, split["train"], text.features), train_cfg, out / TRAIN_DIR,
                      collate_fn=EnglishTokenCollator(text.pool, text.stream, train_cfg.seed), eval_fn=eval_fn)
    tracker.total_batches = trainer.batches_per_epoch * train_cfg.epochs
    return trainer, tracker


def _check_out(out: Path, resume: bool, overwrite: bool) -> Path:
    """Refuse a finished tokenizer (unless overwrite) and an unfinished run not resumed, before any work; return the
    directory to build in (:func:`fmrilm.io.training_output`)."""
    return training_output(out, resume, overwrite, marker=META_FILE, what="a finished tokenizer",
                                 train_dir=TRAIN_DIR)


def _start_run(trainer: Trainer, out: Path, run: dict, resume: bool) -> None:
    """Fresh run: clear this stage's old outputs (the cache stays). Resume: the settings must be the run's."""
    if trainer.accelerator.is_main_process:
        if resume:
            check_same_run(out / RUN_FILE, run)
        else:
            for name in _OWNED:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out / RUN_FILE, run)
    trainer.accelerator.wait_for_everyone()


def _finish(trainer: Trainer, module: FMRITokenizerForTraining, inputs: StageInputs, split: dict, text: TextSide,
            out: Path, run: dict) -> dict:
    """Main process: evaluate, then write the tokenizer, eval.json and, last, tokenizer_meta.json."""
    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if trainer.accelerator.is_main_process:
        held = split["held_out"]
        metrics = evaluate_tokenizer(module, inputs.cohort, held, text.features[held], text.eval_tokens)
        module.tokenizer.save_pretrained(out)
        write_json_atomic(out / EVAL_FILE, metrics)
        meta = {"format": "fmrilm.tokenizer_meta/1", "fmrilm_version": __version__,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **run,
                "split_method": split["method"], "n_train_scans": int(len(split["train"])),
                "n_held_out_scans": int(len(held)), "backbone": text.info,
                "dann_progress": "training micro-batches done / all micro-batches of the run"}
        write_json_atomic(out / META_FILE, meta)
        box[0] = metrics
    broadcast_object_list(box)
    return box[0]


# ----------------------------------------------------------------------------------------------- tokenize
def run_tokenize(cohort: str | os.PathLike, tokenizer: str | os.PathLike, out_file: str | os.PathLike,
                 batch_size: int = 32) -> Path:
    """Encode every scan of a cohort into codes and write them as safetensors.

    Parameters
    ----------
    cohort
        A prepared cohort whose ROIs and length match the tokenizer's.
    tokenizer
        A directory written by :func:`run_train_tokenizer` (or ``FMRITokenizer.save_pretrained``).
    out_file
        The ``.safetensors`` file to write (atomically): tensor ``codes`` (S, W, N) int32, time-major token
        grid (``codes[s, w, n]`` = patch w of ROI n of scan s), metadata ``scan_ids`` (JSON list, cohort order)
        and ``layout``.
    batch_size
        Scans per forward pass.

    Returns
    -------
    Path
        ``out_file``.
    """
    model = FMRITokenizer.from_pretrained(tokenizer)
    out_file = Path(out_file)
    with load_cohort(cohort) as opened:
        _, length, n_rois = opened.timeseries.shape
        if (n_rois, length) != (model.config.n_rois, model.config.length):
            raise FmrilmError(f"cohort {cohort} has {n_rois} ROIs x {length} time points but tokenizer {tokenizer} "
                              f"expects {model.config.n_rois} x {model.config.length}; use a tokenizer trained on "
                              "this atlas and length")
        scan_ids = [str(s) for s in opened.scans["scan_id"]]
        with torch.no_grad():
            batches = scan_batches(opened, np.arange(len(opened)), batch_size)
            codes = [model.encode(x)[0].to(torch.int32) for x in batches]
    metadata = {"scan_ids": json.dumps(scan_ids), "layout": "scans x patches x rois, time-major",
                "tokenizer": str(Path(tokenizer).resolve()), "vocab_size": str(model.config.vocab_size)}
    _save_safetensors_atomic({"codes": torch.cat(codes).contiguous()}, out_file, metadata)
    return out_file


def _save_safetensors_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
