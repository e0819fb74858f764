"""Benchmark: how much of a scan's descriptors survive in the frozen LLM's pooled descriptor-text features.

Usage::

    .venv/bin/python benchmarks/bench_text_features.py --descriptors DESC [--cohort COHORT] [--llm smollm2-135m]
        [--scans 200] [--workdir DIR]

Stage 1 aligns pooled fMRI features with pooled LLM states of each scan's descriptor text (SigLIP). Retrieval can
only work if those text features tell scans apart in a way the descriptors predict. For several ways of making
the text features (which text fields, pooling, layer) this script reports, on a fixed 80/20 split of the scans:

- ``text->desc R2``: ridge regression from text features to the z-scored descriptor table (held-out R2);
- ``oracle top-1``: ridge from the descriptors to the text features, then held-out retrieval (f2t / t2f top-1
  among the held-out scans, cosine). This is the ceiling for a tokenizer whose pooled features were the
  descriptors themselves; ``chance`` is 1 / held-out scans.
- with ``--cohort`` (the cohort DESC describes), ``FC top-1``: the same retrieval from each scan's full Fisher-z FC
  matrix (upper triangle), what a linear read-out of perfectly computed connectivity would reach, and ``network FC
  top-1`` from its mean Fisher-z FC within and between networks (what ``contrast_pooling: network`` approximates).

Features are cached in the work directory (rerunning is instant).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import RidgeCV

from fmrilm.lm.backbone import load_backbone, text_features

DOMAINS = ("fc", "fg", "ica", "graph")
VARIANTS = (  # name, fields, pooling, depth
    ("whole paragraph, last token, final layer (paper)", ("text",), "last", 1.0),
    ("whole paragraph, mean, final layer", ("text",), "mean", 1.0),
    ("whole paragraph, mean, depth 0.8", ("text",), "mean", 0.8),
    ("four domains, mean, final layer", DOMAINS, "mean", 1.0),
    ("four domains, mean, depth 0.8", DOMAINS, "mean", 0.8),
)


def _standardise(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return (x - ref.mean(0)) / (ref.std(0) + 1e-6)


def _top1(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    p = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    t = true / np.linalg.norm(true, axis=1, keepdims=True)
    sim, diag = p @ t.T, np.arange(len(p))
    return float((sim.argmax(1) == diag).mean()), float((sim.argmax(0) == diag).mean())


ALPHAS = np.logspace(-2, 5, 15)


def _retrieval(inputs: np.ndarray, z: np.ndarray, train: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    """Ridge from ``inputs`` to standardised text features ``z``, then held-out top-1 (f2t, t2f)."""
    pred = RidgeCV(alphas=ALPHAS).fit(inputs[train], z[train]).predict(inputs[test])
    return _top1(pred, z[test])


def score(features: np.ndarray, descriptors: np.ndarray, train: np.ndarray, test: np.ndarray,
          fc: np.ndarray | None = None, network_fc: np.ndarray | None = None) -> dict:
    """Held-out R2 (text -> descriptors) and retrieval from descriptors (and FC) of (S, D) text features."""
    z = _standardise(features, features[train])
    r2 = RidgeCV(alphas=ALPHAS).fit(z[train], descriptors[train]).score(z[test], descriptors[test])
    f2t, t2f = _retrieval(descriptors, z, train, test)
    result = {"text_to_descriptors_r2": float(r2), "oracle_f2t_top1": f2t, "oracle_t2f_top1": t2f,
              "chance_top1": 1.0 / len(test)}
    if fc is not None:
        result["fc_f2t_top1"], result["fc_t2f_top1"] = _retrieval(_standardise(fc, fc[train]), z, train, test)
    if network_fc is not None:
        result["network_fc_f2t_top1"], result["network_fc_t2f_top1"] = _retrieval(
            _standardise(network_fc, network_fc[train]), z, train, test)
    return result


def fc_matrices(cohort: Path, scan_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(S, N (N - 1) / 2) Fisher-z correlations of each scan, in ``scan_ids`` order, and (S, K (K + 1) / 2) their
    means within and between the K networks of the cohort's ROI table (self-pairs left out)."""
    from fmrilm import load_cohort

    with load_cohort(cohort) as opened:
        row = {s: i for i, s in enumerate(opened.scans["scan_id"])}
        n_rois = opened.timeseries.shape[2]
        upper = np.triu_indices(n_rois, 1)
        labels = opened.rois["network"].astype(str).to_numpy()
        names = sorted(set(labels))
        full, networks = [], []
        for s in scan_ids:
            z = np.arctanh(np.clip(np.corrcoef(opened.scan(row[s]).T), -0.999, 0.999))
            np.fill_diagonal(z, np.nan)
            full.append(z[upper])
            networks.append([np.nanmean(z[np.ix_(labels == a, labels == b)]) for i, a in enumerate(names)
                             for b in names[i:]])
        return np.stack(full), np.nan_to_num(np.array(networks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--descriptors", required=True, type=Path, help="an 'fmrilm describe' output")
    parser.add_argument("--cohort", type=Path, default=None, help="the cohort DESC describes (adds the FC column)")
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=None, help="feature cache (default: a temporary directory)")
    args = parser.parse_args()
    records = [json.loads(line) for line in (args.descriptors / "texts.jsonl").read_text().splitlines()][: args.scans]
    ids = [r["scan_id"] for r in records]
    table = pd.read_parquet(args.descriptors / "descriptors_z.parquet").set_index("scan_id").loc[ids]
    descriptors = table.select_dtypes("number").fillna(0.0).to_numpy()
    order = np.random.default_rng(0).permutation(len(ids))
    test, train = order[: len(ids) // 5], order[len(ids) // 5 :]
    fc, network_fc = fc_matrices(args.cohort, ids) if args.cohort else (None, None)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmrilm-bench-text-"))
    model, tokenizer = load_backbone(args.llm, dtype=torch.bfloat16)
    print(f"{args.llm}, {len(ids)} scans ({len(train)} train / {len(test)} held out), chance top-1 {1 / len(test):.3f}")
    print("| text features | text->descriptors R2 | oracle f2t / t2f top-1 | FC f2t / t2f top-1 "
          "| network FC f2t / t2f top-1 | s |")
    print("|---|---|---|---|---|---|")
    for name, fields, pooling, depth in VARIANTS:
        start = time.perf_counter()
        parts = [text_features(model, tokenizer, [r[f] for r in records], pooling=pooling, depth=depth,
                               max_length=2048, cache=workdir / f"{f}_{pooling}_{depth}.safetensors")
                 for f in fields]
        result = score(torch.cat(parts, 1).numpy(), descriptors, train, test, fc, network_fc)
        cells = [f"{result[f'{k}_f2t_top1']:.3f} / {result[f'{k}_t2f_top1']:.3f}" if fc is not None else "-"
                 for k in ("fc", "network_fc")]
        print(f"| {name} | {result['text_to_descriptors_r2']:.3f} | {result['oracle_f2t_top1']:.3f} / "
              f"{result['oracle_t2f_top1']:.3f} | {cells[0]} | {cells[1]} | {time.perf_counter() - start:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
