"""Functional-connectivity descriptors: mean Fisher z within and between networks.

Measures
--------
``fc.pair.<A>.<B>``
    Mean Fisher z of the ROI pairs joining networks A and B (names in alphabetical order; ``A == B`` for a
    within-network pair)::

        fc.pair.A.B = mean_{i in A, j in B, i != j} arctanh(r_ij)

    Within a network every unordered ROI pair (upper triangle, no diagonal) counts once; between two networks
    every cross pair counts once. Unit: Fisher z (dimensionless). ``r`` is plain Pearson correlation
    (:func:`fmrilm.descriptors.common.correlation`); ``arctanh`` is :func:`~fmrilm.descriptors.common.fisher_z`
    (r clipped to +-(1 - 1e-7)). Reference: the brute-force double loop in the tests.
``fc.mean``
    Mean Fisher z over all ROI pairs (upper triangle without diagonal). Unit: Fisher z.

Constant ROIs (NaN rows/columns of ``r``) are left out of every mean. A value is NaN only when it has no
pair left: a network whose ROIs are all constant (every pair involving it), or a single-ROI network (its
within-network pair).

The ranked descriptors ("most elevated / most reduced connectivity") are chosen by :func:`top_pairs` from the
``fc.pair`` z-scores against the descriptor reference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fmrilm.descriptors.common import column, fisher_z, network_pairs
from fmrilm.errors import FmrilmError

PAIR_PREFIX = "fc.pair."


def check_inputs(r: np.ndarray, network_index: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate an FC matrix against its ROI-to-network labels.

    Parameters
    ----------
    r : (N, N) array
        Correlation matrix (NaN rows/columns for constant ROIs).
    network_index : (N,) int array
        Index into ``names`` of each ROI's network.
    names : list of str
        Network names.

    Returns
    -------
    r : (N, N) float64 array
    network_index : (N,) int64 array
    """
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise FmrilmError(f"the FC matrix has shape {r.shape}; pass the square (N, N) correlation of the scan's N ROIs")
    index = np.asarray(network_index)
    if index.shape != (r.shape[0],):
        raise FmrilmError(
            f"network_index has shape {index.shape} but the FC matrix has {r.shape[0]} ROIs; "
            "give one network per ROI (the ROI table must match the atlas)"
        )
    if not np.issubdtype(index.dtype, np.integer):
        raise FmrilmError(
            f"network_index has dtype {index.dtype}; give integer network indices (see common.network_labels)"
        )
    if index.size and (index.min() < 0 or index.max() >= len(names)):
        raise FmrilmError(
            f"network_index values span [{index.min()}, {index.max()}] but there are {len(names)} network names; "
            f"use integers in [0, {len(names) - 1}] indexing names (see common.network_labels)"
        )
    return r, index.astype(np.int64)


def one_hot(network_index: np.ndarray, n_networks: int) -> np.ndarray:
    """(N, K) float matrix with M[i, k] = 1 when ROI i is in network k, so M.T @ A @ M sums A by network pair."""
    onehot = np.zeros((len(network_index), n_networks))
    onehot[np.arange(len(network_index)), network_index] = 1.0
    return onehot


def fc_measures(r: np.ndarray, network_index: np.ndarray, names: list[str]) -> dict[str, float]:
    """Mean Fisher z per network pair and over all ROI pairs.

    Parameters
    ----------
    r : (N, N) array
        Pearson correlation of one scan (``common.correlation``), NaN rows/columns for constant ROIs.
    network_index : (N,) int array
        Index into ``names`` of each ROI's network.
    names : list of str
        Network names (any grouping: Yeo-7 + Subcortical, lobes...).

    Returns
    -------
    dict
        ``fc.pair.<A>.<B>`` for every pair of :func:`common.network_pairs` (within pairs included) and
        ``fc.mean``; see the module docstring for NaN cases.
    """
    r, network_index = check_inputs(r, network_index, names)
    z = fisher_z(r)
    usable = np.isfinite(z)
    np.fill_diagonal(usable, False)
    z = np.where(usable, z, 0.0)
    onehot = one_hot(network_index, len(names))
    # Sums over ordered pairs; adding the transpose makes the result exactly symmetric even if r is not
    # (a within-network pair is then counted twice in both the sum and the count, so the mean is unchanged).
    sums = onehot.T @ z @ onehot
    counts = onehot.T @ usable.astype(np.float64) @ onehot
    with np.errstate(invalid="ignore", divide="ignore"):
        means = (sums + sums.T) / (counts + counts.T)
    lookup = {name: k for k, name in enumerate(names)}
    values = {column("fc", "pair", a, b): float(means[lookup[a], lookup[b]]) for a, b in network_pairs(names)}
    n_usable = usable.sum()
    values["fc.mean"] = float(z.sum() / n_usable) if n_usable else math.nan
    return values


def top_pairs(z: Mapping[str, float], k: int = 3) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The k most elevated and the k most reduced network pairs of one scan's z-scores.

    Parameters
    ----------
    z : mapping of column -> z-score
        One scan's z-scored descriptors (a dict or a pandas row); only ``fc.pair.*`` columns are ranked,
        NaN / None values are ignored.
    k : int
        How many pairs per list.

    Returns
    -------
    elevated : list of (column, z)
        Up to k pairs with z > 0, largest first.
    reduced : list of (column, z)
        Up to k pairs with z < 0, most negative first.

    Notes
    -----
    Only strictly positive z can be "elevated" and strictly negative z "reduced", so a pair never appears in
    both lists and a list may hold fewer than k pairs. Ties are broken by column name (alphabetical).
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise FmrilmError(f"top_pairs k={k!r}: give the number of pairs to report as an integer >= 0 (e.g. 3)")
    scored = [(name, float(value)) for name, value in z.items()
              if str(name).startswith(PAIR_PREFIX) and value is not None and math.isfinite(float(value))]
    elevated = sorted((item for item in scored if item[1] > 0), key=lambda item: (-item[1], item[0]))
    reduced = sorted((item for item in scored if item[1] < 0), key=lambda item: (item[1], item[0]))
    return elevated[:k], reduced[:k]
