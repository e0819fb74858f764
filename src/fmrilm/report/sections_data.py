"""Report sections on the data and Stage 0: cohorts, connectivity, gradients, descriptor text.

Each function takes a :class:`RunDir` and returns the section's HTML body, or raises
:class:`StageNotRun` when its inputs are missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.data.cohort import describe_cohort, load_cohort
from fmrilm.descriptors.common import DOMAINS, correlation, network_labels
from fmrilm.descriptors.pipeline import REFERENCE_DIR, TEXTS_FILE, Z_FILE
from fmrilm.descriptors.reference import DescriptorReference
from fmrilm.report import figures
from fmrilm.report.common import RunDir, StageNotRun, esc, figure, number, read_json, table

PHENOTYPE_SUMMARY = ("sex", "age", "diagnosis", "site", "split")


def _phenotype_cell(phenotypes: pd.DataFrame) -> str:
    """Short summary of the common phenotype columns: counts for categories, mean ± SD for numbers."""
    parts = []
    for column in PHENOTYPE_SUMMARY:
        if column not in phenotypes.columns or phenotypes[column].isna().all():
            continue
        values = phenotypes[column].dropna()
        if pd.api.types.is_numeric_dtype(values):
            parts.append(f"{column} {values.mean():.1f} ± {values.std():.1f}")
        else:
            counts = values.astype(str).value_counts().head(4)
            parts.append(f"{column} " + "/".join(f"{k} {v}" for k, v in counts.items()))
    return esc("; ".join(parts) or "none")


def cohort_summary(run: RunDir) -> str:
    """One table row per prepared cohort, and the full ``fmrilm info`` text of each behind a disclosure."""
    cohorts = run.cohorts()
    if not cohorts:
        raise StageNotRun(f"stage not run: no prepared cohort in {run.path / 'cohorts'}")
    rows, details = [], []
    for name, path in cohorts:
        with load_cohort(path) as cohort:
            s, t, n = cohort.timeseries.shape
            rows.append([esc(name), str(s), str(cohort.scans["subject_id"].nunique()), f"{t} x {n}",
                         esc(cohort.meta["atlas"]), esc(", ".join(sorted(cohort.scans["dataset"].astype(str).unique()))),
                         _phenotype_cell(cohort.phenotypes)])
            details.append(f"<details><summary>fmrilm info {esc(name)}</summary><pre>{esc(describe_cohort(cohort))}</pre></details>")
    header = ["cohort", "scans", "subjects", "time x ROIs", "atlas", "datasets", "phenotypes"]
    return table(header, rows) + "".join(details)


def _example(run: RunDir) -> tuple[str, Path, Path, dict]:
    """(cohort name, cohort dir, DESC dir, first texts.jsonl record) of the first described cohort."""
    described = run.descriptors()
    if not described:
        raise StageNotRun(f"stage not run: no describe output in {run.path / 'descriptors'}")
    name, desc = described[0]
    cohort = run.cohort_path(read_json(desc / "meta.json").get("cohort"), name)
    with open(desc / TEXTS_FILE) as handle:
        record = json.loads(handle.readline())
    return name, cohort, desc, record


def _pair_matrix(z_row: pd.Series, names: list[str]) -> np.ndarray:
    """(K, K) network-pair z-scores from the ``fc.pair.<a>.<b>`` columns of one scan (NaN where absent)."""
    lookup = {n: i for i, n in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for column, value in z_row.items():
        parts = str(column).split(".")
        if parts[:2] == ["fc", "pair"] and len(parts) == 4 and parts[2] in lookup and parts[3] in lookup:
            i, j = lookup[parts[2]], lookup[parts[3]]
            matrix[i, j] = matrix[j, i] = float(value)
    return matrix


def connectivity(run: RunDir) -> str:
    """The example scan's ROI x ROI FC matrix and its network-pair z-scores against the reference."""
    name, cohort_dir, desc, record = _example(run)
    with load_cohort(cohort_dir) as cohort:
        index = int(np.flatnonzero(cohort.scans["scan_id"].astype(str) == record["scan_id"])[0])
        fc = np.nan_to_num(correlation(cohort.scan(index)))
        names, network_index = network_labels(cohort.rois)
    z = pd.read_parquet(desc / Z_FILE)
    z_row = z.loc[z["scan_id"].astype(str) == record["scan_id"]].iloc[0]
    title = f"{name}, scan {record['scan_id']}"
    return (
        f"<p>Scan <code>{esc(record['scan_id'])}</code> of cohort <code>{esc(name)}</code>: Pearson correlation of "
        "every ROI pair (ROIs grouped by network), and the mean connectivity of each network pair as a z-score "
        "against the reference cohort (the numbers the descriptor text states).</p>"
        '<div class="row">'
        + figure(figures.fc_matrix(fc, network_index, names, f"FC matrix, {title}"), "FC matrix")
        + figure(figures.network_pairs(_pair_matrix(z_row, names), names, f"network-pair FC z, {title}"),
                 "network-pair connectivity z-scores")
        + "</div>"
    )


def gradients(run: RunDir) -> str:
    """The reference cohort's group connectivity gradients, ROIs coloured by network."""
    name, _, desc, _ = _example(run)
    reference = DescriptorReference.from_pretrained(desc / REFERENCE_DIR)
    g = np.asarray(reference.group_gradients_)
    if g.ndim != 2 or g.shape[1] < 2:
        raise StageNotRun(f"the reference in {desc / REFERENCE_DIR} has fewer than two gradients")
    uri = figures.gradient_scatter(g, np.asarray(reference.network_index_), list(reference.names_),
                                   f"group gradients of the {name} reference")
    return ("<p>Diffusion-map gradients of the reference cohort's group-average FC (each scan's own gradients are "
            "Procrustes-aligned to these before its gradient descriptors are measured).</p>"
            + figure(uri, "gradient scatter"))


def _check_tables(run: RunDir) -> str:
    """The descriptor checks (``DESC/check_<target>.json`` of ``fmrilm check-descriptors``) of every cohort."""
    parts = []
    for name, desc in run.descriptors():
        for path in sorted(desc.glob("check_*.json")):
            check = read_json(path)
            rows = [[esc(r.get("domain", "")), esc(r.get("metric", "")), f"{r['mean']:.3f} ± {r.get('std', 0):.3f}",
                     number(r.get("chance")), "yes" if r.get("planted") else "", "yes" if r.get("above_chance") else "no"]
                    for r in check.get("rows", []) if isinstance(r.get("mean"), (int, float))]
            parts.append(table(["domain", "metric", "mean ± SD", "chance", "effect planted", "above chance"], rows,
                               caption=f"{name}: {check.get('target', path.stem[6:])} from each descriptor domain"))
    if not parts:
        return ""
    return ("<h3>Descriptor check</h3><p>How well each descriptor domain alone predicts a phenotype "
            "(subject-level cross-validation; the paper's Fig. 3).</p>" + "".join(parts))


def descriptor_text(run: RunDir) -> str:
    """The example scan's descriptor paragraph, its sentences per domain, and the descriptor checks."""
    name, _, _, record = _example(run)
    rows = [[esc(domain), esc(record.get(domain) or "")] for domain in (*DOMAINS, "semantic") if record.get(domain)]
    return (f"<p>Scan <code>{esc(record['scan_id'])}</code> of <code>{esc(name)}</code> "
            f"(<code>texts.jsonl</code> field <code>text</code>, what Stages 1-2 learn from):</p>"
            f"<blockquote>{esc(record.get('text', ''))}</blockquote>"
            + "<details><summary>the same scan per domain</summary>" + table(["domain", "sentences"], rows) + "</details>"
            + _check_tables(run))
