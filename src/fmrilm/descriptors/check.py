"""The descriptor check (the paper's Fig. 3): how well does each descriptor domain predict a phenotype?

A simple classifier (standardised logistic regression; ridge regression for a continuous target) is
cross-validated on the z-scored descriptors of each domain and on all of them together, with folds split by
subject. On a simulated cohort, ``simulation.json`` says where each effect was planted, and every planted
domain must predict its target above chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.descriptors.common import DOMAINS
from fmrilm.errors import FmrilmError


def _design(z: pd.DataFrame, domain: str | None) -> np.ndarray:
    columns = [c for c in z.columns if c.split(".")[0] in DOMAINS and (domain is None or c.startswith(domain + "."))]
    values = z[columns].to_numpy(dtype=np.float64)
    keep = ~np.all(np.isnan(values), axis=0)
    return np.nan_to_num(values[:, keep])


def _cv_score(x: np.ndarray, y: np.ndarray, groups: np.ndarray, classify: bool, folds: int, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression, RidgeCV
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if classify:
        splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    else:
        splitter = GroupKFold(n_splits=folds)
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))
    predictions = np.empty(len(y), dtype=object if classify else np.float64)
    for train, test in splitter.split(x, y, groups):
        predictions[test] = model.fit(x[train], y[train]).predict(x[test])
    if classify:
        return float(np.mean(predictions == y))
    return float(np.corrcoef(predictions.astype(np.float64), y)[0, 1])


def descriptor_check(z: pd.DataFrame, phenotypes: pd.DataFrame, target: str, folds: int = 5, seeds: int = 3) -> pd.DataFrame:
    """Cross-validated score per domain and for all descriptors.

    Parameters
    ----------
    z
        ``descriptors_z.parquet``: scan_id, subject_id and descriptor columns.
    phenotypes
        One row per subject with the ``target`` column.
    target
        Phenotype column: text (classification, accuracy) or numeric (regression, Pearson r).

    Returns
    -------
    DataFrame with columns domain, metric, mean, std, chance, n_scans.
    """
    if target not in phenotypes.columns:
        raise FmrilmError(f"target {target!r} is not a phenotype column (columns: {', '.join(map(str, phenotypes.columns[1:8]))})")
    table = z.merge(phenotypes[["subject_id", target]], on="subject_id", how="left").dropna(subset=[target])
    y = table[target].to_numpy()
    classify = not pd.api.types.is_numeric_dtype(table[target])
    if classify and pd.Series(y).value_counts().min() < folds:
        raise FmrilmError(f"target {target!r}: the rarest class has fewer than {folds} scans; use fewer folds or more scans")
    groups = table["subject_id"].to_numpy()
    chance = float(pd.Series(y).value_counts(normalize=True).max()) if classify else 0.0
    rows = []
    for domain in (*DOMAINS, None):
        scores = [_cv_score(_design(table, domain), y, groups, classify, folds, seed) for seed in range(seeds)]
        rows.append({"domain": domain or "all", "metric": "accuracy" if classify else "pearson_r",
                     "mean": float(np.mean(scores)), "std": float(np.std(scores)), "chance": chance, "n_scans": len(y)})
    return pd.DataFrame(rows)


# Where each kind of planted effect (simulation.json "kind") shows among the descriptors.
_KIND_DOMAIN = {"pair": "fc", "within": "fc", "amplitude": "ica", "gradient": "fg", "segregation": "graph"}


def planted_domains(simulation: str | Path, target: str) -> set[str]:
    """Descriptor domains in which ``simulation.json`` planted an effect of ``target``."""
    path = Path(simulation)
    if not path.is_file():
        raise FmrilmError(f"--simulation {path}: file does not exist (it is written by 'fmrilm simulate')")
    effects = json.loads(path.read_text()).get("effects", [])
    return {effect.get("domain") or _KIND_DOMAIN[effect["kind"]] for effect in effects if effect.get("target") == target}


def run_check(descriptors: str | Path, cohort: str | Path, target: str, *, simulation: str | Path | None = None,
              folds: int = 5, seeds: int = 3) -> tuple[str, list[str]]:
    """Run :func:`descriptor_check`, write ``DESC/check_<target>.json``; return a printable table and the
    planted domains that missed.

    With ``simulation``, every domain in which an effect of ``target`` was planted should beat chance (by
    more than two SDs over seeds and at least 0.05 accuracy, or r > 0.1); those that do not are returned.
    """
    from fmrilm.data.cohort import load_cohort
    from fmrilm.descriptors.pipeline import load_descriptors
    from fmrilm.io import write_json_atomic

    with load_cohort(cohort) as opened:
        phenotypes = opened.phenotypes
    table = descriptor_check(load_descriptors(descriptors), phenotypes, target, folds=folds, seeds=seeds)
    planted = planted_domains(simulation, target) if simulation else set()
    table["planted"] = table["domain"].isin(planted)
    table["above_chance"] = [_beats_chance(row) for row in table.to_dict(orient="records")]
    write_json_atomic(Path(descriptors) / f"check_{target}.json", {"target": target, "rows": table.to_dict(orient="records")})
    missed = list(table.loc[table["planted"] & ~table["above_chance"], "domain"])
    return table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), missed


def _beats_chance(row: dict) -> bool:
    if row["metric"] == "accuracy":
        return row["mean"] - row["chance"] > max(0.05, 2 * row["std"])
    return row["mean"] > max(0.1, 2 * row["std"])
