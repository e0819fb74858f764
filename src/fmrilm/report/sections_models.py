"""Report sections on the trained stages: tokenizer reconstruction and codebook, training curves, generations.

Each function takes a :class:`RunDir` and returns the section's HTML body, or raises
:class:`StageNotRun` when its inputs are missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmrilm.data.cohort import load_cohort
from fmrilm.report import figures
from fmrilm.report.common import (
    TRAINED_STAGES, RunDir, StageNotRun, esc, figure, metrics_table, note, read_json, read_jsonl, table,
)

MAX_SCANS = 8  # held-out scans encoded for the figures: seconds even for the paper's 450-ROI, P = 32 grid
BATCH = 4
TOKENIZER_METRICS = ("n_held_out", "reconstruction_mse", "reconstruction_r2", "codebook_usage", "n_codes_used",
                     "codebook_perplexity", "domain_accuracy", "retrieval_f2t_top1", "retrieval_t2f_top1",
                     "retrieval_chance_top1")
STAGE_TITLES = {"tokenizer": "Stage 1 tokenizer", "lm": "Stage 2 alignment", "instruct": "Stage 3 instruction tuning"}


def _held_out_scans(cohort_dir: Path, held_out_subjects: list | None) -> np.ndarray:
    """(S, T, N) up to MAX_SCANS scans of the held-out subjects (every subject when none are recorded)."""
    with load_cohort(cohort_dir) as cohort:
        subjects = cohort.scans["subject_id"].astype(str)
        held = np.flatnonzero(subjects.isin([str(s) for s in held_out_subjects]).to_numpy()) if held_out_subjects else []
        indices = np.asarray(held if len(held) else np.arange(len(cohort)))[:MAX_SCANS]
        return np.stack([cohort.scan(int(i)) for i in indices])


def _median_roi(true: np.ndarray, recon: np.ndarray) -> int:
    """The ROI whose reconstruction error is the median over ROIs: a representative one, not the best."""
    errors = ((true - recon) ** 2).mean(axis=0)  # (N,)
    return int(np.argsort(errors)[len(errors) // 2])


def _cached_codes(run: RunDir, shape: tuple[int, int]) -> np.ndarray | None:
    """Every scan's codes (S, W, N) from the Stage 2 token cache when it holds this tokenizer's grid, else None."""
    path = run.path / "lm" / "cache" / "tokens" / "codes.npy"
    if not path.is_file():
        return None
    codes = np.load(path, mmap_mode="r")
    return np.asarray(codes) if codes.ndim == 3 and tuple(codes.shape[1:]) == shape else None


def _code_counts(run: RunDir, model, x: torch.Tensor) -> tuple[np.ndarray, str]:
    """(occurrences of each code, where they were counted): the Stage 2 cache, else the given scans encoded."""
    cached = _cached_codes(run, (model.config.n_patches, model.config.n_rois))
    if cached is not None:
        return np.bincount(cached.ravel(), minlength=model.config.vocab_size), f"all {len(cached)} scans (Stage 2 token cache)"
    with torch.no_grad():
        codes = torch.cat([model.encode(x[i:i + BATCH])[0] for i in range(0, len(x), BATCH)])  # (S, W, N)
    return np.bincount(codes.flatten().numpy(), minlength=model.config.vocab_size), f"{len(x)} held-out scans"


def tokenizer(run: RunDir) -> str:
    """True vs reconstructed signal of one held-out scan's ROI, codebook usage, and the held-out metrics."""
    from fmrilm.tokenizer.model import FMRITokenizer

    out = run.stage("tokenizer", "Stage 1 tokenizer")
    meta, metrics = read_json(out / "tokenizer_meta.json"), read_json(out / "eval.json")
    model = FMRITokenizer.from_pretrained(out).eval()
    x = torch.from_numpy(_held_out_scans(run.cohort_path(meta.get("cohort")), meta.get("held_out_subjects")))
    with torch.no_grad():
        true, recon = x[0].numpy(), model.decode(model.encode(x[:1])[0])[0].numpy()  # (T, N) each
    roi = _median_roi(true, recon)
    counts, where = _code_counts(run, model, x)
    used = int((counts > 0).sum())
    return (
        '<div class="row">'
        + figure(figures.reconstruction(true[:, roi], recon[:, roi], model.config.patch_size,
                                        f"held-out scan, ROI {roi} (median reconstruction error)"),
                 "tokenizer reconstruction", "grey lines: patch borders (one token per patch and ROI)")
        + figure(figures.codebook_usage(counts, f"{used} of {len(counts)} codes used"), "codebook usage",
                 f"{used} of {len(counts)} codes used in {where}")
        + "</div>" + metrics_table(metrics, TOKENIZER_METRICS)
    )


def _curves(records: list[dict]) -> tuple[dict, dict]:
    """({loss: (steps, values)}, {metric: (epochs, values)}) of a metrics.jsonl.

    Losses come from the step records; a run too short for one (fewer steps than ``log_every``) falls back to the
    epoch records' ``train_*loss`` means at each epoch's last step. Metrics are the epoch records' evaluations.
    """
    steps: dict[str, tuple[list, list]] = {}
    epoch_losses: dict[str, tuple[list, list]] = {}
    epochs: dict[str, tuple[list, list]] = {}
    for record in records:
        is_epoch = record.get("event") == "epoch"
        for key, value in record.items():
            if not isinstance(value, (int, float)) or key in ("event", "epoch", "step", "lr"):
                continue
            if is_epoch and key.startswith("train_") and key.endswith("loss") and "step" in record:
                _append(epoch_losses, key[len("train_"):], record["step"], value)
            elif is_epoch and not key.startswith("train_"):
                _append(epochs, key, record["epoch"], value)
            elif not is_epoch and key.endswith("loss") and "step" in record:
                _append(steps, key, record["step"], value)
    return steps or epoch_losses, epochs


def _append(curves: dict[str, tuple[list, list]], name: str, x: float, y: float) -> None:
    xs, ys = curves.setdefault(name, ([], []))
    xs.append(x)
    ys.append(y)


def training_curves(run: RunDir) -> str:
    """One figure per trained stage from its ``train/metrics.jsonl``; stages without one are named."""
    parts, missing = [], []
    for stage in TRAINED_STAGES:
        path = run.path / stage / "train" / "metrics.jsonl"
        records = read_jsonl(path) if path.is_file() else []
        steps, epochs = _curves(records)
        if not steps:
            missing.append(f"{STAGE_TITLES[stage]}: stage not run (no {path})")
            continue
        parts.append(figure(figures.training_curves(steps, epochs, STAGE_TITLES[stage]),
                            f"training curves of {stage}", f"{path.relative_to(run.path)}: {len(records)} records"))
    if not parts:
        raise StageNotRun("stage not run: no trained stage wrote train/metrics.jsonl")
    return "".join(parts) + "".join(note(m) for m in missing)


def _examples_table(examples: list[dict]) -> str:
    rows = [[esc(e.get("scan_id", "")), esc(e.get("reference", "")), esc(e.get("generated", ""))] for e in examples]
    return table(["scan", "true description (reference)", "generated"], rows)


def _open_answers(path: Path, limit: int = 3) -> list[dict]:
    """The first ``limit`` scans' open-ended answers in an ``fmrilm evaluate`` predictions.jsonl, with references."""
    seen: dict[str, dict] = {}
    for record in read_jsonl(path):
        if record.get("paradigm") == "open" and "answer" in record and record.get("scan_id") not in seen:
            seen[record["scan_id"]] = {"scan_id": record["scan_id"], "reference": record.get("reference", ""),
                                       "generated": record["answer"]}
        if len(seen) == limit:
            break
    return list(seen.values())


def generations(run: RunDir) -> str:
    """Generated next to true descriptions of held-out scans: ``eval.json`` examples of Stages 2 and 3 and the
    open-ended answers of ``fmrilm evaluate`` (``DIR/evaluate/<cohort>/predictions.jsonl``)."""
    parts = []
    for stage in ("lm", "instruct"):
        path = run.path / stage / "eval.json"
        if not path.is_file():
            continue
        metrics = read_json(path)
        examples = [e for e in metrics.get("examples", []) if isinstance(e, dict) and "generated" in e]
        if examples:
            parts.append(f"<h3>{esc(STAGE_TITLES[stage])}</h3>" + _examples_table(examples) + metrics_table(metrics))
    for path in sorted((run.path / "evaluate").glob("*/predictions.jsonl")):
        examples = _open_answers(path)
        if examples:
            parts.append(f"<h3>Stage 3 open-ended answers ({esc(path.parent.name)})</h3>" + _examples_table(examples))
    if not parts:
        raise StageNotRun("stage not run: no lm/eval.json or instruct/eval.json with generated examples, and no "
                          "open-ended answers in evaluate/<cohort>/predictions.jsonl")
    return ("<p>Greedy generations for held-out scans next to the reference descriptions, with the held-out "
            "metrics and their baselines (<code>fmrilm.lm.evaluate</code>, <code>fmrilm.instruct.evaluate</code>).</p>"
            + "".join(parts))
