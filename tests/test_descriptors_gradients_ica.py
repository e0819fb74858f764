"""Diffusion-map gradients (against BrainSpace 0.3.0) and the group ICA descriptors (against planted sources)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from fmrilm.descriptors.common import column, correlation
from fmrilm.descriptors.gradients import (
    _diffusion_operator,
    affinity,
    clean_fc,
    diffusion_gradients,
    gradient_measures,
    group_gradients,
    procrustes_align,
)
from fmrilm.descriptors.ica import GroupICA, _subsample, ica_measures, spectral_measures
from fmrilm.errors import FmrilmError, FmrilmWarning

brainspace_gradient = pytest.importorskip("brainspace.gradient")


def block_scan(n_rois: int, n_blocks: int = 3, n_time: int = 160, seed: int = 0) -> np.ndarray:
    """(T, N) series: one latent signal per block, a shared signal, a graded signal across ROIs and noise."""
    rng = np.random.default_rng(seed)
    block = np.arange(n_rois) % n_blocks
    latent = rng.standard_normal((n_time, n_blocks))
    graded = np.linspace(0, 1, n_rois) * rng.standard_normal((n_time, 1))
    return latent[:, block] + 0.5 * rng.standard_normal((n_time, 1)) + graded + rng.standard_normal((n_time, n_rois))


def brainspace_fit(fc, k, sparsity=0.9, kernel="normalized_angle", alpha=0.5):
    from brainspace.gradient.embedding import DiffusionMaps

    maps = brainspace_gradient.GradientMaps(
        n_components=k, approach=DiffusionMaps(alpha=alpha), kernel=kernel, random_state=0,
    )
    return maps.fit(fc, sparsity=sparsity)


# -- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("n_rois", "k", "sparsity", "kernel", "alpha"), [
    (60, 3, 0.9, "normalized_angle", 0.5),
    (60, 10, 0.9, "normalized_angle", 0.5),
    (11, 3, 0.5, "normalized_angle", 0.5),
    (11, 9, 0.0, "normalized_angle", 0.5),
    (60, 3, 0.9, "cosine", 0.5),
    (60, 3, 0.8, "pearson", 1.0),
    (200, 10, 0.9, "normalized_angle", 0.0),
])
def test_diffusion_gradients_equal_brainspace(n_rois, k, sparsity, kernel, alpha):
    fc = correlation(block_scan(n_rois, seed=n_rois))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FmrilmWarning)
        gradients, lambdas = diffusion_gradients(fc, k, sparsity=sparsity, alpha=alpha, kernel=kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BrainSpace's "not fully connected" (ours: FmrilmWarning, tested below)
        expected = brainspace_fit(fc, k, sparsity, kernel, alpha)
    # Same operator, start vector and ARPACK call: equal without any sign alignment.
    np.testing.assert_allclose(gradients, expected.gradients_, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lambdas, expected.lambdas_, rtol=0, atol=1e-10)


def test_disconnected_affinity_warns():
    fc = np.kron(np.eye(2), np.full((10, 10), 0.9)) + np.eye(20) * 0.1  # two blocks, no correlation between
    with pytest.warns(FmrilmWarning, match="2 disconnected groups of ROIs"):
        diffusion_gradients(fc, 3, sparsity=0.5, kernel="cosine")


def test_dense_solver_is_exact_and_close_to_brainspace():
    fc = correlation(block_scan(60))
    arpack, arpack_lambdas = diffusion_gradients(fc, 3)
    dense, lambdas = diffusion_gradients(fc, 3, solver="dense")
    p, _ = _diffusion_operator(affinity(clean_fc(fc)), 0.5)
    mu = lambdas / (1 + lambdas)  # undo the multiscale scaling: eigenvalues of P
    np.testing.assert_allclose(p @ dense, dense * mu, atol=1e-12)
    assert np.abs(dense - arpack).max() < 0.02 * np.ptp(arpack, axis=0).max()
    np.testing.assert_allclose(lambdas, arpack_lambdas, rtol=0.02)


def test_procrustes_equals_brainspace():
    from brainspace.gradient.alignment import ProcrustesAlignment

    rng = np.random.default_rng(1)
    g, reference = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    expected = ProcrustesAlignment(n_iter=1).fit([g], reference=reference).aligned_[0]
    np.testing.assert_allclose(procrustes_align(g, reference), expected, atol=1e-12)
    fc, reference = correlation(block_scan(60)), rng.standard_normal((60, 4))
    maps = brainspace_gradient.GradientMaps(n_components=4, alignment="procrustes", random_state=0)
    maps.fit(fc, reference=reference)  # one matrix + reference: a single Procrustes step
    aligned = procrustes_align(diffusion_gradients(fc, 4)[0], reference)
    np.testing.assert_allclose(aligned, maps.aligned_, atol=1e-12)


def test_alignment_recovers_rotated_flipped_copy():
    rng = np.random.default_rng(2)
    reference = rng.standard_normal((40, 5))
    rotation, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    permuted_flipped = np.eye(5)[[2, 0, 4, 1, 3]] * np.array([1, -1, 1, -1, -1])
    for q in (rotation, permuted_flipped):
        np.testing.assert_allclose(procrustes_align(reference @ q, reference), reference, atol=1e-10)


def test_gradient_measures_columns_and_values():
    rng = np.random.default_rng(3)
    names, network_index = ["Vis", "Default", "Empty"], np.arange(60) % 2
    reference = group_gradients(np.mean([correlation(block_scan(60, seed=s)) for s in range(5)], axis=0))
    assert reference.shape == (60, 10)
    fc = correlation(block_scan(60, seed=9) + 0.3 * rng.standard_normal((160, 60)))
    values = gradient_measures(fc, reference, network_index, names)
    g = procrustes_align(diffusion_gradients(fc, 10)[0], reference)
    expected_columns = {f"fg.g{c}.{name}" for c in (1, 2, 3) for name in names}
    expected_columns |= {f"fg.g{c}.{m}" for c in (1, 2, 3) for m in ("range", "variance")} | {"fg.variance"}
    assert set(values) == expected_columns
    for c in range(3):
        for k, name in enumerate(names[:2]):
            members = [i for i in range(60) if network_index[i] == k]
            assert values[f"fg.g{c + 1}.{name}"] == pytest.approx(sum(g[i, c] for i in members) / len(members))
        assert np.isnan(values[f"fg.g{c + 1}.Empty"])
        assert values[f"fg.g{c + 1}.range"] == pytest.approx(max(g[:, c]) - min(g[:, c]))
        assert values[f"fg.g{c + 1}.variance"] == pytest.approx(np.mean((g[:, c] - np.mean(g[:, c])) ** 2))
    centroid = g[:, :3].mean(axis=0)
    assert values["fg.variance"] == pytest.approx(np.mean(np.sum((g[:, :3] - centroid) ** 2, axis=1)))


def test_constant_roi_gets_zero_correlation_and_unit_self_correlation():
    x = block_scan(60)
    x[:, 7] = 3.0
    fc = correlation(x)
    assert np.isnan(fc[7]).all()
    cleaned = clean_fc(fc)
    assert cleaned[7, 7] == 1 and not cleaned[7, np.arange(60) != 7].any()
    gradients, _ = diffusion_gradients(fc, 3)
    np.testing.assert_allclose(gradients, brainspace_fit(cleaned, 3).gradients_, atol=1e-10)
    reference = group_gradients(correlation(block_scan(60, seed=5)))
    values = gradient_measures(fc, reference, np.arange(60) % 3, ["A", "B", "C"])
    assert np.isfinite(list(values.values())).all()


@pytest.mark.parametrize(("call", "match"), [
    (lambda fc: diffusion_gradients(fc[:5]), r"shape \(5, 30\).*square"),
    (lambda fc: diffusion_gradients(fc, sparsity=1.0), r"sparsity 1.0 must be in \[0, 1\)"),
    (lambda fc: diffusion_gradients(fc, sparsity=0.99), r"sparsity 0.99 keeps no value of 30 ROIs"),
    (lambda fc: diffusion_gradients(fc, kernel="gaussian"), r"kernel 'gaussian' is unknown"),
    (lambda fc: diffusion_gradients(fc, n_components=29), r"29 gradients of 30 ROIs.*\[1, 28\]"),
    (lambda fc: diffusion_gradients(fc, alpha=2.0), r"alpha 2.0"),
    (lambda fc: diffusion_gradients(fc, solver="lobpcg"), r"solver 'lobpcg'"),
    (lambda fc: diffusion_gradients(np.where(np.eye(30) > 0, np.inf, fc)), r"infinite values"),
    (lambda fc: group_gradients(fc[:4, :4]), r"4 ROIs give 2 gradients.*>= 5 ROIs"),
    (lambda fc: procrustes_align(np.ones((30, 3)), np.ones((29, 3))), r"shape \(30, 3\).*\(29, 3\)"),
    (lambda fc: gradient_measures(fc, np.ones((30, 2)), np.zeros(30, int), ["A"]), r"shape \(30, 2\).*>= 3 columns"),
    (lambda fc: gradient_measures(fc, np.ones((30, 3)), np.zeros(29, int), ["A"]), r"network_index has shape \(29,\)"),
])
def test_gradient_errors(call, match):
    with pytest.raises(FmrilmError, match=match):
        call(correlation(block_scan(30)))


# -- group ICA -----------------------------------------------------------------------------------------
NAMES = ["Vis", "SomMot", "DorsAttn", "Default", "Subcortical", "Limbic"]


def planted(n_scans: int = 30, seed: int = 0):
    """5 Laplacian sources, each loading on the 8 ROIs of one network (a 6th network of 5 ROIs is noise)."""
    rng = np.random.default_rng(seed)
    network_index = np.r_[np.repeat(np.arange(5), 8), np.full(5, 5)]
    maps = np.zeros((5, 45))
    for k in range(5):
        maps[k, network_index == k] = rng.uniform(0.5, 1.5, 8)
    sources = [rng.laplace(size=(160, 5)) for _ in range(n_scans)]
    scans = [s @ maps + 0.5 * rng.standard_normal((160, 45)) for s in sources]
    scans = [(x - x.mean(axis=0)) / x.std(axis=0) for x in scans]
    return scans, sources, maps, network_index


@pytest.fixture(scope="module")
def fitted():
    scans, sources, maps, network_index = planted()
    model = GroupICA(5, random_state=0).fit((x for x in scans), network_index, NAMES)
    return model, scans, sources, maps


def test_ica_recovers_planted_maps_and_networks(fitted):
    model, _, _, maps = fitted
    assert model.maps_.shape == model.mixing_.shape == (5, 45) and model.n_scans_ == 30
    match = np.corrcoef(maps, model.maps_)[:5, 5:]
    best = match.argmax(axis=1)
    assert sorted(best) == list(range(5)) and (match.max(axis=1) > 0.9).all()
    assert [model.networks_[b] for b in best] == NAMES[:5]
    np.testing.assert_allclose(model.maps_.mean(axis=1), 0, atol=1e-12)
    np.testing.assert_allclose(model.maps_.std(axis=1), 1)
    assert (model.maps_.max(axis=1) > -model.maps_.min(axis=1)).all()  # largest loadings positive


def test_transform_recovers_time_courses(fitted):
    model, scans, sources, _ = fitted
    courses = model.transform(scans[3])
    r = np.corrcoef(sources[3].T, courses.T)[:5, 5:]
    assert (r.max(axis=1) > 0.95).all()
    np.testing.assert_allclose(courses, scans[3] @ np.linalg.pinv(model.mixing_))


def test_ica_measures_columns_and_values(fitted):
    model, scans, _, _ = fitted
    values = ica_measures(scans[0], model, tr=2.0)
    courses = model.transform(scans[0])
    present = NAMES[:5]  # Limbic holds no component: no column
    assert not [c for c in values if c.endswith("Limbic")]
    expected = {f"ica.{m}.{n}" for m in ("amplitude", "variability", "spectral_ratio", "fALFF") for n in present}
    expected |= {"ica.amplitude", "ica.variability", "ica.spectral_ratio"}
    expected |= {column("ica", "fnc", a, b) for i, a in enumerate(present) for b in present[i + 1:]}
    assert set(values) == expected  # one component per network: no within-network fnc
    k = model.networks_.index("Vis")
    assert values["ica.amplitude.Vis"] == pytest.approx(np.std(courses[:, k], ddof=1))
    assert values["ica.variability.Vis"] == pytest.approx(np.std(np.diff(courses[:, k]), ddof=1) / np.sqrt(2))
    assert values["ica.amplitude"] == pytest.approx(np.std(courses, axis=0, ddof=1).mean())
    j = model.networks_.index("Default")
    assert values["ica.fnc.Default.Vis"] == pytest.approx(np.arctanh(np.corrcoef(courses[:, k], courses[:, j])[0, 1]))
    assert abs(values["ica.fnc.Default.Vis"]) < 0.3  # independent planted sources
    assert 0.8 < values["ica.amplitude"] < 1.2  # unit-variance sources on the training scans


def toy_model(networks: list[str], names: list[str], n_rois: int = 6) -> GroupICA:
    mixing = np.eye(len(networks), n_rois) + 0.1
    config = {"format": "fmrilm.group_ica/1", "n_components": len(networks), "max_scans": 10, "random_state": 0,
              "names": names, "networks": networks, "n_scans": 10}
    return GroupICA.from_state(config, {"maps": mixing, "mixing": mixing})


def test_within_network_fnc_and_networks_without_components():
    model = toy_model(["A", "A", "B"], ["A", "B", "C"])
    rng = np.random.default_rng(4)
    shared = rng.standard_normal((160, 1))
    courses = np.c_[shared + 0.5 * rng.standard_normal((160, 2)), rng.standard_normal((160, 1))]
    values = ica_measures(courses @ model.mixing_, model)
    assert "ica.fnc.A.A" in values and "ica.fnc.B.B" not in values and not [c for c in values if c.endswith(".C")]
    assert values["ica.fnc.A.A"] == pytest.approx(np.arctanh(np.corrcoef(courses[:, 0], courses[:, 1])[0, 1]))
    z = (courses - courses.mean(axis=0)) / courses.std(axis=0)
    a_course = z[:, :2].mean(axis=1)
    assert values["ica.fnc.A.B"] == pytest.approx(np.arctanh(np.corrcoef(a_course, z[:, 2])[0, 1]))
    assert values["ica.amplitude.A"] == pytest.approx(np.std(courses[:, :2], axis=0, ddof=1).mean())


def test_spectral_measures_slow_versus_fast_sine():
    t = np.arange(160) * 2.0
    slow, fast = np.sin(2 * np.pi * 0.05 * t), np.sin(2 * np.pi * 0.2 * t)
    model = toy_model(["A", "B"], ["A", "B"], n_rois=4)
    values = ica_measures(np.c_[slow, fast] @ model.mixing_, model, tr=2.0)
    assert values["ica.spectral_ratio.A"] > 100 > 0.01 > values["ica.spectral_ratio.B"]
    assert values["ica.fALFF.A"] > 0.9 and values["ica.fALFF.B"] < 0.05
    ratio, falff = spectral_measures(np.c_[slow, fast], tr=2.0)
    assert values["ica.spectral_ratio"] == pytest.approx(ratio.mean())
    np.testing.assert_allclose(falff, [values["ica.fALFF.A"], values["ica.fALFF.B"]])


def test_state_round_trip_through_json_and_safetensors(fitted, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, scans, _, _ = fitted
    config, arrays = model.to_state()
    save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(tmp_path / "a.safetensors"))
    loaded = GroupICA.from_state(json.loads(json.dumps(config)), load_file(str(tmp_path / "a.safetensors")))
    assert loaded.networks_ == model.networks_ and loaded.names_ == model.names_
    np.testing.assert_array_equal(loaded.transform(scans[1]), model.transform(scans[1]))
    assert ica_measures(scans[1], loaded) == ica_measures(scans[1], model)


def test_subsample_sequence_and_stream():
    assert _subsample(list(range(12)), 5) == [0, 2, 5, 8, 11]
    assert _subsample(iter(range(12)), 5) == [0, 4, 8]  # stride doubled twice; never more than 5 held
    assert _subsample(iter(range(4)), 5) == [0, 1, 2, 3]
    scans, _, _, network_index = planted(12)
    assert GroupICA(3, max_scans=5).fit(iter(scans), network_index, NAMES).n_scans_ == 3


@pytest.mark.parametrize(("call", "match"), [
    (lambda s, i: GroupICA(5).fit(s[:3], i, NAMES), r"3 scans of 45 ROIs for 5 ICA components.*lower --ica-components"),
    (lambda s, i: GroupICA(50).fit(s * 2, i, NAMES), r"60 scans of 45 ROIs for 50 ICA components"),
    (lambda s, i: GroupICA(2).fit([s[0][:, :40]] + s, i, NAMES), r"ICA scan 0 has shape \(160, 40\)"),
    (lambda s, i: GroupICA(2).fit(s, i + 1, NAMES), r"index into the 6 network names"),
    (lambda s, i: GroupICA(2).transform(s[0]), r"group ICA is not fitted"),
    (lambda s, i: GroupICA(2).to_state(), r"group ICA is not fitted"),
    (lambda s, i: toy_model(["A"], ["A"]).transform(s[0]), r"scan of shape \(160, 45\).*6 ROIs"),
    (lambda s, i: ica_measures(np.ones((2, 6)), toy_model(["A"], ["A"])), r"2 time points.*T >= 3"),
    (lambda s, i: GroupICA.from_state({"format": "other"}, {}), r"format 'other'.*rebuild the reference"),
])
def test_ica_errors(call, match):
    scans, _, _, network_index = planted(30)
    with pytest.raises(FmrilmError, match=match):
        call(scans, network_index)
