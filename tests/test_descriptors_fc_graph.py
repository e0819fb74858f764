"""FC and graph descriptors against brute force, hand-computed values and bctpy (GPL-3, used only here)."""

from __future__ import annotations

import math

import bct
import networkx as nx
import numpy as np
import pytest

from fmrilm.descriptors import fc, graph
from fmrilm.descriptors.common import column, correlation, fisher_z, network_pairs
from fmrilm.errors import FmrilmError

NAMES = ["Vis", "Default", "Limbic", "Amygdala"]  # not alphabetical: pair columns must sort their two names


def small_scan(seed: int = 0, n_time: int = 37) -> tuple[np.ndarray, np.ndarray]:
    """A (37, 11) series with networks of unequal sizes 4, 3, 3, 1 scattered over the ROIs."""
    rng = np.random.default_rng(seed)
    index = rng.permutation(np.repeat(np.arange(4), [4, 3, 3, 1]))
    x = rng.standard_normal((n_time, len(index))) + rng.standard_normal((n_time, 4))[:, index]
    return x, index


def brute_force_fc(r: np.ndarray, index: np.ndarray, names: list[str]) -> dict[str, float]:
    """Mean Fisher z per network pair by a double loop over ROI pairs i < j, skipping NaN correlations."""
    pairs: dict[str, list[float]] = {column("fc", "pair", a, b): [] for a, b in network_pairs(names)}
    everything = []
    for i in range(len(r)):
        for j in range(i + 1, len(r)):
            if np.isfinite(r[i, j]):
                z = float(fisher_z(r[i, j]))
                pairs[column("fc", "pair", names[index[i]], names[index[j]])].append(z)
                everything.append(z)
    out = {key: float(np.mean(values)) if values else math.nan for key, values in pairs.items()}
    out["fc.mean"] = float(np.mean(everything))
    return out


def assert_dicts_close(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        np.testing.assert_allclose(actual[key], expected[key], rtol=rtol, atol=1e-12, err_msg=key)


# -- fc ---------------------------------------------------------------------------------------------------
def test_fc_pairs_match_brute_force():
    x, index = small_scan()
    r = correlation(x)
    values = fc.fc_measures(r, index, NAMES)
    assert_dicts_close(values, brute_force_fc(r, index, NAMES))
    assert "fc.pair.Default.Vis" in values and "fc.pair.Vis.Default" not in values
    assert math.isnan(values["fc.pair.Amygdala.Amygdala"])  # a single-ROI network has no within pair
    assert sum(math.isnan(v) for v in values.values()) == 1


def test_fc_constant_roi_is_left_out():
    x, index = small_scan(1)
    x[:, 2] = 0.0
    r = correlation(x)
    assert np.isnan(r[2]).all()
    values = fc.fc_measures(r, index, NAMES)
    assert_dicts_close(values, brute_force_fc(r, index, NAMES))
    keep = np.arange(len(index)) != 2
    assert_dicts_close(values, fc.fc_measures(correlation(x[:, keep]), index[keep], NAMES))


def test_fc_whole_constant_network_is_nan_only_there():
    x, index = small_scan(2)
    x[:, index == NAMES.index("Limbic")] = 0.0
    values = fc.fc_measures(correlation(x), index, NAMES)
    for key, value in values.items():
        involves_limbic = "Limbic" in key.split(".")
        assert math.isnan(value) == (involves_limbic or key == "fc.pair.Amygdala.Amygdala"), key
    assert np.isfinite(values["fc.mean"])


@pytest.mark.parametrize(
    ("r", "index", "message"),
    [
        (np.zeros((3, 4)), np.zeros(3, int), "square"),
        (np.eye(3), np.zeros(4, int), "one network per ROI"),
        (np.eye(3), np.array([0, 1, 4]), "network names"),
        (np.eye(3), np.array([0, -1, 1]), "network names"),
        (np.eye(3), np.array([0.0, 1.0, 1.0]), "dtype float64; give integer"),
    ],
)
def test_fc_input_errors(r, index, message):
    with pytest.raises(FmrilmError, match=message):
        fc.fc_measures(r, index, NAMES)
    with pytest.raises(FmrilmError, match=message):
        graph.graph_measures(r, index, NAMES)


def test_top_pairs_ranks_ignores_nan_and_breaks_ties_by_name():
    z = {
        "fc.pair.A.B": 2.0, "fc.pair.A.A": 2.0, "fc.pair.B.B": 3.5, "fc.pair.A.C": float("nan"),
        "fc.pair.B.C": -1.0, "fc.pair.C.C": -2.5, "fc.pair.A.D": -1.0, "fc.pair.D.D": 0.1,
        "fc.mean": 9.0, "graph.modularity": -9.0, "fc.pair.C.D": None,
    }
    elevated, reduced = fc.top_pairs(z, k=3)
    assert elevated == [("fc.pair.B.B", 3.5), ("fc.pair.A.A", 2.0), ("fc.pair.A.B", 2.0)]
    assert reduced == [("fc.pair.C.C", -2.5), ("fc.pair.A.D", -1.0), ("fc.pair.B.C", -1.0)]


def test_top_pairs_only_signed_values_and_k():
    z = {"fc.pair.A.A": 1.0, "fc.pair.A.B": 0.0, "fc.pair.B.B": 0.5}
    elevated, reduced = fc.top_pairs(z, k=5)
    assert [name for name, _ in elevated] == ["fc.pair.A.A", "fc.pair.B.B"] and reduced == []
    assert fc.top_pairs(z, k=0) == ([], [])
    for bad in (-1, 1.5, True):
        with pytest.raises(FmrilmError, match="top_pairs k="):
            fc.top_pairs(z, k=bad)


# -- graph building blocks --------------------------------------------------------------------------------
def fc_graph(n: int, density: float, seed: int, n_blocks: int = 4, amplitude: float = 0.5) -> np.ndarray:
    """A thresholded |FC| graph of a random scan with ``n_blocks`` planted networks."""
    rng = np.random.default_rng(seed)
    blocks = np.arange(n) % n_blocks
    x = rng.standard_normal((160, n)) + amplitude * rng.standard_normal((160, n_blocks))[:, blocks]
    return graph.proportional_threshold(graph.weight_matrix(correlation(x)), density)


def disconnected_graph() -> np.ndarray:
    """Two separate weighted clusters (10 and 8 nodes) plus 2 isolated nodes."""
    rng = np.random.default_rng(5)
    w = np.zeros((20, 20))
    for block in (slice(0, 10), slice(10, 18)):
        size = block.stop - block.start
        part = np.triu(rng.uniform(0.1, 1.0, (size, size)) * (rng.random((size, size)) < 0.5), 1)
        w[block, block] = part + part.T
    return w


GRAPHS = {
    "sparse": lambda: fc_graph(40, 0.05, 0),
    "default": lambda: fc_graph(40, 0.10, 1),
    "dense": lambda: fc_graph(30, 0.40, 2, amplitude=0.0),
    "disconnected": disconnected_graph,
}


def test_weight_matrix_is_abs_r_without_diagonal_or_nan():
    x, _ = small_scan()
    x[:, 3] = 0.0
    r = correlation(x)
    w = graph.weight_matrix(r)
    assert np.all(np.diag(w) == 0) and np.all(w[3] == 0) and np.allclose(w, w.T)
    off = ~np.eye(len(r), dtype=bool) & np.isfinite(r)
    np.testing.assert_allclose(w[off], np.abs(r[off]), rtol=1e-12)
    assert w.min() >= 0 and w.max() <= 1


@pytest.mark.parametrize("density", [0.05, 0.1, 0.37, 1.0])
def test_proportional_threshold_keeps_the_strongest(density):
    w = graph.weight_matrix(correlation(np.random.default_rng(3).standard_normal((50, 25))))
    kept = graph.proportional_threshold(w, density)
    upper = np.triu(np.ones_like(w, dtype=bool), 1)
    expected = math.floor(density * 25 * 24 / 2 + 0.5)
    assert np.count_nonzero(kept[upper]) == expected
    assert np.array_equal(kept, kept.T) and np.all(np.diag(kept) == 0)
    on = kept[upper] > 0
    np.testing.assert_array_equal(kept[upper][on], w[upper][on])  # weights are not changed
    if not on.all():
        assert w[upper][on].min() >= w[upper][~on].max()
    np.testing.assert_allclose(kept, bct.threshold_proportional(w, density))


def test_proportional_threshold_ties_and_missing_edges():
    w = np.full((6, 6), 0.5)
    np.fill_diagonal(w, 0)
    kept = graph.proportional_threshold(w, 0.2)  # 3 of 15 equal edges: the first in row-major order
    assert sorted(zip(*np.nonzero(np.triu(kept)))) == [(0, 1), (0, 2), (0, 3)]
    sparse = np.zeros((5, 5))
    sparse[0, 1] = sparse[1, 0] = 0.3
    np.testing.assert_array_equal(graph.proportional_threshold(sparse, 1.0), sparse)  # zeros are not edges


@pytest.mark.parametrize("name", GRAPHS)
def test_efficiency_and_clustering_match_bctpy(name):
    w = GRAPHS[name]()
    np.testing.assert_allclose(graph.global_efficiency(w), bct.efficiency_wei(w.copy()), rtol=1e-6)
    expected = bct.clustering_coef_wu(w.copy())
    np.testing.assert_allclose(graph.clustering_coefficients(w), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(graph.clustering(w), expected.mean(), rtol=1e-6)


def test_networkx_global_efficiency_ignores_weights():
    """Why we do not use networkx: its global_efficiency counts hops, so it only agrees on binary graphs."""
    w = fc_graph(30, 0.2, 4)
    weighted = nx.from_numpy_array(w)
    assert abs(nx.global_efficiency(weighted) - graph.global_efficiency(w)) > 0.1
    binary = (w > 0).astype(float)
    hops = nx.global_efficiency(nx.from_numpy_array(binary))
    np.testing.assert_allclose(graph.global_efficiency(binary), hops, rtol=1e-12)


def test_n_components_ignores_isolated_nodes():
    assert graph.n_components(disconnected_graph()) == 2
    assert graph.n_components(fc_graph(40, 0.3, 0)) == 1


# -- modularity -------------------------------------------------------------------------------------------
def test_modularity_q_hand_computed():
    triangles = np.zeros((6, 6))
    for a, b in [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5)]:
        triangles[a, b] = triangles[b, a] = 1.0
    assert graph.modularity_q(triangles, [0, 0, 0, 1, 1, 1]) == pytest.approx(0.5)  # 2 * (1/2 - (1/2)^2)
    assert graph.modularity_q(triangles, np.zeros(6)) == pytest.approx(0.0)
    assert math.isnan(graph.modularity_q(np.zeros((3, 3)), [0, 1, 2]))
    with pytest.raises(FmrilmError, match="one community label per node"):
        graph.modularity_q(triangles, [0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modularity_q_equals_bctpy_for_bctpy_partitions(seed):
    w = fc_graph(60, 0.15, seed, amplitude=0.4)
    ci, q = bct.community_louvain(w.copy(), seed=seed)
    assert graph.modularity_q(w, ci) == pytest.approx(q, rel=1e-9)
    # bct.modularity_und (spectral) fails under numpy 2 in bctpy 0.6.1; its older Louvain is a second partition
    ci_old, q_old = bct.modularity_louvain_und(w.copy(), seed=seed)
    assert graph.modularity_q(w, ci_old) == pytest.approx(q_old, rel=1e-9)


@pytest.mark.parametrize(("amplitude", "seed"), [(0.3, 0), (0.3, 2), (0.6, 1), (1.0, 3)])
def test_louvain_q_close_to_bctpy(amplitude, seed):
    w = fc_graph(90, 0.15, seed, n_blocks=5, amplitude=amplitude)
    _, q_bct = bct.community_louvain(w.copy(), seed=seed)
    assert abs(graph.modularity(w, seed) - q_bct) < 0.02


def test_louvain_deterministic_and_finds_planted_blocks():
    w = fc_graph(60, 0.25, 7, n_blocks=3, amplitude=1.5)  # dense enough that no node is isolated
    labels = graph.louvain(w, seed=3)
    np.testing.assert_array_equal(labels, graph.louvain(w, seed=3))
    np.testing.assert_array_equal(labels, np.arange(60) % 3)  # numbered by smallest node: 0, 1, 2, 0, 1...
    assert graph.louvain(np.zeros((4, 4))).tolist() == [0, 1, 2, 3]


def test_more_modular_graph_has_larger_q():
    planted = fc_graph(60, 0.1, 8, amplitude=1.0)
    unstructured = fc_graph(60, 0.1, 8, amplitude=0.0)
    assert graph.modularity(planted) > graph.modularity(unstructured) + 0.2


# -- graph_measures ---------------------------------------------------------------------------------------
def scan_fc(n: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    index = rng.permutation(np.arange(n) % 4)
    x = rng.standard_normal((160, n)) + 0.8 * rng.standard_normal((160, 4))[:, index]
    return x, correlation(x), index


def test_graph_measures_columns_and_values():
    _, r, index = scan_fc()
    values = graph.graph_measures(r, index, NAMES, density=0.15, seed=1)
    strength_columns = [f"graph.strength.{name}" for name in NAMES]
    globals_ = {"graph.global_efficiency", "graph.modularity", "graph.clustering", "graph.n_components"}
    assert set(values) == globals_ | set(strength_columns)
    w = graph.proportional_threshold(graph.weight_matrix(r), 0.15)
    assert values["graph.global_efficiency"] == pytest.approx(bct.efficiency_wei(w.copy()), rel=1e-6)
    assert values["graph.clustering"] == pytest.approx(bct.clustering_coef_wu(w.copy()).mean(), rel=1e-6)
    assert values["graph.modularity"] == pytest.approx(graph.modularity_q(w, graph.louvain(w, 1)))
    for k, name in enumerate(NAMES):
        assert values[f"graph.strength.{name}"] == pytest.approx(w.sum(axis=1)[index == k].mean())
    assert values == graph.graph_measures(r, index, NAMES, density=0.15, seed=1)  # deterministic


def test_graph_measures_constant_roi_is_removed_from_the_graph():
    x, _, index = scan_fc(seed=1)
    x[:, 5] = 0.0
    values = graph.graph_measures(correlation(x), index, NAMES)
    assert all(np.isfinite(v) for v in values.values())
    keep = np.arange(len(index)) != 5
    assert_dicts_close(values, graph.graph_measures(correlation(x[:, keep]), index[keep], NAMES), rtol=1e-12)


def test_graph_measures_constant_network_strength_is_nan():
    x, _, index = scan_fc(seed=2)
    x[:, index == 2] = 0.0
    values = graph.graph_measures(correlation(x), index, NAMES)
    assert [key for key, value in values.items() if math.isnan(value)] == ["graph.strength.Limbic"]


def test_graph_measures_when_the_graph_falls_apart():
    _, r, index = scan_fc(seed=3)
    values = graph.graph_measures(r, index, NAMES, density=0.01)
    assert values["graph.n_components"] > 1 and 0 < values["graph.global_efficiency"] < 0.1


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan"), "dense", None])
def test_graph_measures_rejects_bad_density(density):
    _, r, index = scan_fc()
    with pytest.raises(FmrilmError, match=r"density=.* must be a proportion in \(0, 1\]"):
        graph.graph_measures(r, index, NAMES, density=density)
    with pytest.raises(FmrilmError, match="must be a proportion"):
        graph.proportional_threshold(np.eye(3), density)


def test_graph_measures_too_few_edges():
    _, r, index = scan_fc()
    with pytest.raises(FmrilmError, match="raise density .* not constant"):
        graph.graph_measures(r, index, NAMES, density=1e-4)  # 0.11 of an edge rounds to 0
    constant = correlation(np.zeros((160, len(index))))
    with pytest.raises(FmrilmError, match="0 edge"):
        graph.graph_measures(constant, index, NAMES)


def test_graph_measures_at_450_rois_are_finite_and_connected():
    rng = np.random.default_rng(0)
    index = np.sort(rng.integers(0, 8, 450))
    x = rng.standard_normal((160, 450)) + 0.3 * rng.standard_normal((160, 8))[:, index]
    r = correlation(x.astype(np.float32))
    names = [f"net{k}" for k in range(8)]
    values = graph.graph_measures(r, index, names)  # speed: benchmarks/bench_describe.py
    assert all(np.isfinite(v) for v in values.values()) and values["graph.n_components"] == 1
