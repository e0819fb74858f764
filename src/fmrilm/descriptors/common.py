"""Names and groupings every descriptor domain shares.

Columns are named ``<domain>.<measure>[.<network>[.<network>]]`` with domain in ``fc``, ``fg``, ``graph``,
``ica``; a network pair is written with its two names in alphabetical order (``fc.pair.Default.Vis``), a
within-network pair repeats the name (``fc.pair.Default.Default``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fmrilm.constants import SUBCORTICAL, YEO7_NETWORKS

DOMAINS = ("fc", "fg", "ica", "graph")
# Last name parts that are measures of a global quantity, never networks (fg.g1.range, fg.g1.variance).
MEASURE_SUFFIXES = ("range", "variance")


def network_order(networks: list[str] | pd.Series) -> list[str]:
    """Networks present, Yeo-7 order first, then Subcortical, then any others alphabetically."""
    present = set(networks)
    known = [n for n in (*YEO7_NETWORKS, SUBCORTICAL) if n in present]
    return known + sorted(present - set(known))


def network_labels(rois: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """(network names in :func:`network_order`, (N,) int array giving each ROI's network index)."""
    names = network_order(rois["network"].astype(str))
    lookup = {name: i for i, name in enumerate(names)}
    return names, np.array([lookup[n] for n in rois["network"].astype(str)], dtype=np.int64)


def network_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every unordered pair of networks including each network with itself, each pair sorted by name."""
    pairs = {tuple(sorted((a, b))) for i, a in enumerate(names) for b in names[i:]}
    return sorted(pairs)


def column(domain: str, measure: str, *networks: str) -> str:
    """A descriptor column name, e.g. ``column("fc", "pair", "Vis", "Default") == "fc.pair.Default.Vis"``."""
    parts = sorted(networks) if len(networks) == 2 else list(networks)
    return ".".join([domain, measure, *parts])


def fisher_z(r: np.ndarray) -> np.ndarray:
    """Fisher's z = arctanh(r), with r clipped to +-(1 - 1e-7) so perfect correlations stay finite."""
    return np.arctanh(np.clip(r, -1 + 1e-7, 1 - 1e-7))


def correlation(x: np.ndarray) -> np.ndarray:
    """Pearson correlation of the columns of a (T, N) series -> (N, N); constant ROIs give NaN rows/columns.

    Plain Pearson (no shrinkage: nilearn's ConnectivityMeasure default shrinks toward 0 and differs).
    """
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    norms = np.sqrt((centred**2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = centred / np.where(norms > 0, norms, np.nan)
    r = normalised.T @ normalised
    np.fill_diagonal(r, np.where(norms > 0, 1.0, np.nan))
    return np.clip(r, -1.0, 1.0)


# The named descriptors, one per sentence type (covering every row of the paper's Table 1). ``columns`` is the
# column prefix: kind "network" has columns ``<prefix>.<network>``, "pair" ``<prefix>.<A>.<B>``, "global" is
# the column itself, "ranked" is derived from the fc.pair z-scores (the k most elevated or reduced pairs).
DESCRIPTORS: tuple[dict, ...] = (
    {"name": "network_pair_connectivity", "domain": "fc", "kind": "pair", "columns": "fc.pair", "phrase": "functional connectivity", "unit": "mean Fisher z"},
    {"name": "top_connectivity", "domain": "fc", "kind": "ranked", "columns": "fc.pair", "phrase": "most elevated connectivity", "unit": "z-score"},
    {"name": "bottom_connectivity", "domain": "fc", "kind": "ranked", "columns": "fc.pair", "phrase": "most reduced connectivity", "unit": "z-score"},
    {"name": "mean_connectivity", "domain": "fc", "kind": "global", "columns": "fc.mean", "phrase": "overall connectivity", "unit": "mean Fisher z"},
    {"name": "network_gradient_1", "domain": "fg", "kind": "network", "columns": "fg.g1", "phrase": "principal gradient value", "unit": "gradient score"},
    {"name": "network_gradient_2", "domain": "fg", "kind": "network", "columns": "fg.g2", "phrase": "second gradient value", "unit": "gradient score"},
    {"name": "network_gradient_3", "domain": "fg", "kind": "network", "columns": "fg.g3", "phrase": "third gradient value", "unit": "gradient score"},
    {"name": "gradient_1_range", "domain": "fg", "kind": "global", "columns": "fg.g1.range", "phrase": "principal gradient range", "unit": "gradient score"},
    {"name": "gradient_2_range", "domain": "fg", "kind": "global", "columns": "fg.g2.range", "phrase": "second gradient range", "unit": "gradient score"},
    {"name": "gradient_3_range", "domain": "fg", "kind": "global", "columns": "fg.g3.range", "phrase": "third gradient range", "unit": "gradient score"},
    {"name": "gradient_variance", "domain": "fg", "kind": "global", "columns": "fg.variance", "phrase": "gradient variance", "unit": "gradient score squared"},
    {"name": "network_amplitude", "domain": "ica", "kind": "network", "columns": "ica.amplitude", "phrase": "temporal amplitude", "unit": "component units"},
    {"name": "network_variability", "domain": "ica", "kind": "network", "columns": "ica.variability", "phrase": "temporal variability", "unit": "component units"},
    {"name": "network_spectral_ratio", "domain": "ica", "kind": "network", "columns": "ica.spectral_ratio", "phrase": "low-to-high frequency power ratio", "unit": "ratio"},
    {"name": "network_fnc", "domain": "ica", "kind": "pair", "columns": "ica.fnc", "phrase": "functional network connectivity", "unit": "Fisher z"},
    {"name": "network_falff", "domain": "ica", "kind": "network", "columns": "ica.fALFF", "phrase": "fractional amplitude of low-frequency fluctuations", "unit": "ratio"},
    {"name": "overall_amplitude", "domain": "ica", "kind": "global", "columns": "ica.amplitude", "phrase": "overall temporal amplitude", "unit": "component units"},
    {"name": "overall_variability", "domain": "ica", "kind": "global", "columns": "ica.variability", "phrase": "overall temporal variability", "unit": "component units"},
    {"name": "overall_spectral_ratio", "domain": "ica", "kind": "global", "columns": "ica.spectral_ratio", "phrase": "overall low-to-high frequency power ratio", "unit": "ratio"},
    {"name": "network_strength", "domain": "graph", "kind": "network", "columns": "graph.strength", "phrase": "node strength", "unit": "sum of edge weights"},
    {"name": "modularity", "domain": "graph", "kind": "global", "columns": "graph.modularity", "phrase": "modularity", "unit": "Q"},
    {"name": "global_efficiency", "domain": "graph", "kind": "global", "columns": "graph.global_efficiency", "phrase": "global efficiency", "unit": "1 / path length"},
    {"name": "clustering", "domain": "graph", "kind": "global", "columns": "graph.clustering", "phrase": "average clustering coefficient", "unit": "Onnela coefficient"},
)
