"""Tests of fmrilm.preprocess on seeded synthetic data with unequal (T, N) so transposes cannot hide."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.signal import resample_poly

from fmrilm.errors import FmrilmError
from fmrilm.preprocess import (
    PreprocessConfig,
    SiteVarianceNormalizer,
    fit_length,
    resample,
    robust_zscore,
    standardize_scan,
)


def sines(n: int, tr: float, freq: float, n_rois: int = 3) -> np.ndarray:
    """(n, n_rois) sines of one frequency with a different phase per ROI."""
    t = np.arange(n)[:, None] * tr
    return np.sin(2 * np.pi * freq * t + np.arange(n_rois)[None, :])


def amplitude(x: np.ndarray) -> np.ndarray:
    """Per-column peak amplitude, ignoring 20 points at each edge (filter transients)."""
    return np.abs(x[20:-20]).max(axis=0)


# ---------------------------------------------------------------- resample


def test_resample_keeps_sinusoid_frequency_phase_and_length():
    x = sines(1200, 0.72, 0.05)
    y = resample(x, 0.72, 2.0)
    assert y.shape == (432, 3)
    spectrum = np.abs(np.fft.rfft(y[:, 0] - y[:, 0].mean()))
    freqs = np.fft.rfftfreq(432, d=2.0)
    assert abs(freqs[spectrum.argmax()] - 0.05) <= freqs[1]
    # Same phase at the same wall-clock times, i.e. sample k of y is at time 2.0 * k.
    np.testing.assert_allclose(y[10:-10], sines(432, 2.0, 0.05)[10:-10], atol=0.01)


def test_resample_suppresses_aliasing():
    x = sines(1200, 0.72, 0.6)  # below the input Nyquist (0.69 Hz), above the output one (0.25 Hz)
    y = resample(x, 0.72, 2.0)
    assert np.all(amplitude(y) < 0.05)
    # Control: picking the nearest samples aliases the sine to 0.1 Hz at nearly full amplitude.
    naive = x[np.round(np.arange(432) * 2.0 / 0.72).astype(int).clip(max=1199)]
    assert np.all(amplitude(naive) > 0.5)


def test_resample_has_no_edge_ringing_on_raw_bold_scale():
    t = np.arange(1200)[:, None]
    x = 10000 + 30 * t / 1200 + 20 * sines(1200, 0.72, 0.03, 5)  # mean, drift and a slow oscillation
    y = resample(x, 0.72, 2.0)
    expected = 10000 + 30 * (np.arange(432)[:, None] * 2.0 / 0.72) / 1200 + 20 * sines(432, 2.0, 0.03, 5)
    assert np.abs(y - expected).max() < 0.1  # including the first and last samples
    # Control: without removing mean and trend, zero padding pulls the edges far off.
    assert np.abs(resample_poly(x, 9, 25, axis=0)[0] - expected[0]).min() > 1000


def test_resample_upsamples():
    x = sines(200, 3.0, 0.05, 4)
    y = resample(x, 3.0, 2.0)
    assert y.shape == (300, 4)
    np.testing.assert_allclose(y[10:-10], sines(300, 2.0, 0.05, 4)[10:-10], atol=0.02)


def test_resample_same_tr_returns_float_copy():
    x = np.arange(12, dtype=np.int32).reshape(4, 3)
    y = resample(x, 2.0, 2.0)
    y[0, 0] = 99
    assert y.dtype == np.float64 and x[0, 0] == 0
    np.testing.assert_array_equal(y[1:], x[1:])


@pytest.mark.parametrize("tr_in, tr_out", [(0.0, 2.0), (-1.0, 2.0), (float("nan"), 2.0), (0.72, float("inf"))])
def test_resample_rejects_bad_tr(tr_in, tr_out):
    with pytest.raises(FmrilmError, match=r"tr_(in|out)=.* is not a positive number"):
        resample(np.zeros((37, 11)), tr_in, tr_out)


def test_resample_rejects_non_2d():
    with pytest.raises(FmrilmError, match=r"shape \(37,\), expected 2-D"):
        resample(np.zeros(37), 0.72)


# ---------------------------------------------------------------- fit_length


def ramps(n: int, n_rois: int = 11) -> np.ndarray:
    """Column j is (j + 1) * t: each ROI has its own slope."""
    return np.arange(n)[:, None] * (np.arange(n_rois) + 1.0)[None, :]


def test_fit_length_clips_first_window():
    x = ramps(370)
    windows, flag = fit_length(x, 160)
    assert flag == "ok" and len(windows) == 1
    np.testing.assert_array_equal(windows[0], x[:160])


def test_fit_length_all_windows_are_consecutive():
    x = ramps(500)
    windows, flag = fit_length(x, 160, windows="all")
    assert flag == "ok" and len(windows) == 3
    for k, w in enumerate(windows):
        np.testing.assert_array_equal(w, x[160 * k : 160 * (k + 1)])


@pytest.mark.parametrize("mode", ["first", "all"])
def test_fit_length_interpolates_short_scan(mode):
    x = ramps(120)
    windows, flag = fit_length(x, 160, windows=mode, min_points=100)
    assert flag == "interpolated" and len(windows) == 1
    expected = np.linspace(0, 119, 160)[:, None] * (np.arange(11) + 1.0)[None, :]
    np.testing.assert_allclose(windows[0], expected, rtol=1e-12)


def test_fit_length_refuses_too_short_scan():
    with pytest.raises(FmrilmError, match=r"99 time points .* min_points=100.*--min-points"):
        fit_length(ramps(99), 160, min_points=100)


def test_fit_length_rejects_unknown_window_mode():
    with pytest.raises(FmrilmError, match=r"windows='some' is not one of"):
        fit_length(ramps(200), 160, windows="some")


# ---------------------------------------------------------------- robust_zscore


def scaled_data(seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(0.01, 1e4, 11)
    return rng.standard_t(3, (37, 11)) * scales + np.arange(11) * 100.0


def test_robust_zscore_median_zero_iqr_one_per_roi():
    z, constant = robust_zscore(scaled_data())
    assert z.shape == (37, 11) and z.dtype == np.float32 and constant.shape == (11,)
    assert not constant.any()
    q25, med, q75 = np.percentile(z.astype(np.float64), [25, 50, 75], axis=0)
    np.testing.assert_allclose(med, 0, atol=1e-6)
    np.testing.assert_allclose(q75 - q25, 1, rtol=1e-5)


def test_robust_zscore_is_independent_per_roi():
    x = scaled_data()
    z_before, _ = robust_zscore(x)
    x[:, 0] *= 1000  # one scalar for all ROIs would change every column
    z_after, _ = robust_zscore(x)
    np.testing.assert_array_equal(z_before[:, 1:], z_after[:, 1:])


def test_robust_zscore_flags_constant_rois_and_zeros_them():
    x = scaled_data()
    x[:, 3] = 5.0
    x[:, 7] = 0.0
    x[:, 9] = 10000.3 + np.random.default_rng(2).normal(0, 1e-10, 37)  # float noise on a constant
    z, constant = robust_zscore(x)
    assert np.flatnonzero(constant).tolist() == [3, 7, 9]
    assert np.all(z[:, [3, 7, 9]] == 0)
    assert np.all(np.abs(z[:, [0, 1, 2]]).max(axis=0) > 0.5)


# ---------------------------------------------------------------- SiteVarianceNormalizer


def pooled_sd(scans: list[np.ndarray]) -> np.ndarray:
    """Pooled within-scan SD per ROI, computed directly."""
    ss = sum(((s - s.mean(axis=0)) ** 2).sum(axis=0) for s in scans)
    return np.sqrt(ss / sum(len(s) - 1 for s in scans))


def two_sites() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(3)
    scale_a = np.linspace(1.0, 2.0, 11)
    scale_b = 4.0 * scale_a[::-1]
    return {
        "A": [rng.normal(0, 1, (37 + k, 11)) * scale_a for k in range(4)],
        "B": [rng.normal(0, 1, (41 + k, 11)) * scale_b + 2 for k in range(3)],
    }


def fitted(data: dict[str, list[np.ndarray]]) -> SiteVarianceNormalizer:
    norm = SiteVarianceNormalizer()
    for site, scans in data.items():
        for scan in scans:
            norm.partial_fit(scan, site)
    return norm.finalize()


def test_site_normalizer_equalises_site_sd_to_global_pooled_sd():
    data = two_sites()
    norm = fitted(data)
    glob = pooled_sd(data["A"] + data["B"])
    np.testing.assert_allclose(norm.global_scale_, glob, rtol=1e-12)
    np.testing.assert_allclose(norm.scale_["A"], pooled_sd(data["A"]), rtol=1e-12)
    assert norm.n_scans_ == {"A": 4, "B": 3}
    assert np.all(pooled_sd(data["B"]) / pooled_sd(data["A"]) > 1.5)  # sites really differ
    after_a = pooled_sd([norm.transform(s, "A") for s in data["A"]])
    after_b = pooled_sd([norm.transform(s, "B") for s in data["B"]])
    np.testing.assert_allclose(after_a, glob, rtol=1e-10)
    np.testing.assert_allclose(after_b, glob, rtol=1e-10)


def test_site_normalizer_leaves_unknown_site_and_zero_scale_roi_unchanged():
    data = two_sites()
    data["A"] = [s.copy() for s in data["A"]]
    for s in data["A"]:
        s[:, 2] = 7.0  # constant ROI -> zero scale at site A
    norm = fitted(data)
    x = np.random.default_rng(4).normal(0, 1, (37, 11)).astype(np.float32)
    for site in ("C", None):
        out = norm.transform(x, site)
        assert out.dtype == np.float32 and out is not x
        np.testing.assert_array_equal(out, x)
    out_a = norm.transform(x, "A")
    np.testing.assert_array_equal(out_a[:, 2], x[:, 2])
    assert not np.allclose(out_a[:, 0], x[:, 0])


def test_site_normalizer_json_round_trip_gives_identical_transform():
    data = two_sites()
    norm = fitted(data)
    restored = SiteVarianceNormalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert norm.to_dict()["sites"]["B"]["n_scans"] == 3
    x = data["B"][0]
    np.testing.assert_array_equal(restored.transform(x, "B"), norm.transform(x, "B"))
    assert restored.n_scans_ == norm.n_scans_
    # Restored accumulators keep fitting consistently.
    restored.partial_fit(x, "A").finalize()
    assert restored.n_scans_["A"] == 5


def test_site_normalizer_not_fitted():
    norm = SiteVarianceNormalizer().partial_fit(np.ones((37, 11)), "A")
    with pytest.raises(FmrilmError, match="not fitted; call partial_fit .* then finalize"):
        norm.transform(np.ones((37, 11)), "A")
    with pytest.raises(FmrilmError, match="not fitted; call finalize before saving"):
        norm.to_dict()


def test_site_normalizer_finalize_without_scans():
    with pytest.raises(FmrilmError, match="saw no training scans"):
        SiteVarianceNormalizer().finalize()


def test_site_normalizer_rejects_roi_count_mismatch():
    norm = fitted(two_sites())
    with pytest.raises(FmrilmError, match="scan has 12 ROIs but .* fitted on 11"):
        norm.transform(np.ones((37, 12)), "A")
    with pytest.raises(FmrilmError, match="scan has 12 ROIs but .* fitted on 11"):
        norm.partial_fit(np.ones((37, 12)), "A")


@pytest.mark.parametrize("site", [None, ""])
def test_site_normalizer_requires_site_for_training(site):
    with pytest.raises(FmrilmError, match=r"site=.* for a training scan.*site_variance=False"):
        SiteVarianceNormalizer().partial_fit(np.ones((37, 11)), site)


def test_site_normalizer_from_dict_rejects_bad_state():
    d = fitted(two_sites()).to_dict()
    with pytest.raises(FmrilmError, match="lacks or mangles 'global_scale'"):
        SiteVarianceNormalizer.from_dict({k: v for k, v in d.items() if k != "global_scale"})
    d["sites"]["A"]["scale"] = d["sites"]["A"]["scale"][:5]
    with pytest.raises(FmrilmError, match=r"sites.A.scale has shape \(5,\), expected \(11,\)"):
        SiteVarianceNormalizer.from_dict(d)


# ---------------------------------------------------------------- PreprocessConfig


def test_config_json_round_trip():
    config = PreprocessConfig(target_tr=0.8, length=120, windows="all", min_points=90, site_variance=False)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_tr": 0}, r"target_tr=0 is not a positive number"),
        ({"target_tr": float("nan")}, r"target_tr=nan is not a positive number"),
        ({"length": 0}, r"length=0 is not a positive integer"),
        ({"length": 160.5}, r"length=160.5 is not a positive integer"),
        ({"min_points": -3}, r"min_points=-3 is not a positive integer"),
        ({"windows": "last"}, r"windows='last' is not one of"),
        ({"max_constant_fraction": 1.0}, r"max_constant_fraction=1.0 is not in \[0, 1\)"),
        ({"max_constant_fraction": -0.1}, r"max_constant_fraction=-0.1 is not in \[0, 1\)"),
        ({"site_variance": "yes"}, r"site_variance='yes' is not a boolean"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(FmrilmError, match=message):
        PreprocessConfig(**kwargs)


def test_config_from_dict_rejects_unknown_option():
    with pytest.raises(FmrilmError, match=r"unknown preprocessing option\(s\) \['tr'\]"):
        PreprocessConfig.from_dict({"tr": 2.0})


# ---------------------------------------------------------------- standardize_scan


def raw_bold(n: int, n_rois: int = 11, seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1.0, 300.0, n_rois)
    return 10000 + np.cumsum(rng.normal(0, 1, (n, n_rois)), axis=0) * scales / 10


def test_standardize_scan_end_to_end():
    x = raw_bold(1200)
    windows, qc = standardize_scan(x, 0.72, PreprocessConfig())
    assert len(windows) == 1 and windows[0].shape == (160, 11) and windows[0].dtype == np.float32
    assert qc == {"length_flag": "ok", "n_constant_rois": 0, "resampled_length": 432}
    q25, med, q75 = np.percentile(windows[0], [25, 50, 75], axis=0)
    np.testing.assert_allclose(med, 0, atol=1e-5)
    np.testing.assert_allclose(q75 - q25, 1, rtol=1e-4)
    all_windows, _ = standardize_scan(x, 0.72, PreprocessConfig(windows="all"))
    assert len(all_windows) == 2
    np.testing.assert_array_equal(all_windows[0], windows[0])
    assert not np.allclose(all_windows[1], all_windows[0])


def test_standardize_scan_interpolates_short_scan():
    windows, qc = standardize_scan(raw_bold(300), 0.72, PreprocessConfig())
    assert qc["length_flag"] == "interpolated" and qc["resampled_length"] == 108
    assert windows[0].shape == (160, 11)


def test_standardize_scan_constant_fraction():
    x = raw_bold(1200)
    x[:, [2, 6]] = 10000.3  # 2 of 11 ROIs constant = 18 %
    with pytest.raises(FmrilmError, match=r"2 of 11 ROIs are constant .*max_constant_fraction=0.1.*--max-constant"):
        standardize_scan(x, 0.72, PreprocessConfig())
    windows, qc = standardize_scan(x, 0.72, PreprocessConfig(max_constant_fraction=0.2))
    assert qc["n_constant_rois"] == 2
    assert np.all(windows[0][:, [2, 6]] == 0)


def test_standardize_scan_refuses_non_finite():
    x = raw_bold(1200)
    x[5, 3] = np.nan
    x[7, 1] = np.inf
    with pytest.raises(FmrilmError, match="2 NaN/Inf values"):
        standardize_scan(x, 0.72, PreprocessConfig())


def test_standardize_scan_counts_rois_constant_in_any_window():
    x = raw_bold(400)  # already at TR 2.0, so no resampling blurs the step into the constant part
    x[160:, 4] = 10000.3  # constant in the second window only
    x[:160, 7] = 9000.0  # constant in the first window only
    windows, qc = standardize_scan(x, 2.0, PreprocessConfig(windows="all", max_constant_fraction=0.2))
    assert len(windows) == 2 and qc["n_constant_rois"] == 2
    assert np.all(windows[1][:, 4] == 0) and np.any(windows[0][:, 4] != 0)
    assert np.all(windows[0][:, 7] == 0) and np.any(windows[1][:, 7] != 0)


def test_resample_refuses_a_single_time_point():
    from fmrilm.preprocess import resample

    with pytest.raises(FmrilmError, match="1 time point"):
        resample(np.ones((1, 4)), 0.72, 2.0)
