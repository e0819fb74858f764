"""Per-scan standardisation of ROI time series, as in fMRI-LM.

Every scan goes through the same chain so that scans from any scanner look alike to the model:
resample to ``target_tr`` (2.0 s) -> fit to ``length`` (160) points -> robust z-score per ROI, and then,
across the cohort, site-wise variance normalisation fitted on training scans only. Arrays are time-major,
shape (T, N): time along rows, ROIs along columns.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from numbers import Integral, Real

import numpy as np
from scipy.signal import resample_poly

from fmrilm.constants import TARGET_LENGTH, TARGET_TR
from fmrilm.errors import FmrilmError

WINDOW_MODES = ("first", "all")
_MAX_DENOMINATOR = 1000  # TR ratios are known to ~1e-6 relative; keeps the polyphase filter short
_CONSTANT_RTOL = 1e-9  # IQR below this fraction of a ROI's magnitude is float noise, not signal


@dataclass
class PreprocessConfig:
    """Options of the per-scan standardisation.

    Attributes
    ----------
    target_tr
        Repetition time in seconds every scan is resampled to.
    length
        Time points per standardized scan (window).
    windows
        ``"first"``: one window per scan; ``"all"``: consecutive non-overlapping windows as extra scans.
    min_points
        Scans with fewer points than this after resampling are refused as too short.
    max_constant_fraction
        Scans with a larger fraction of constant ROIs are refused (usually an atlas/mask mismatch).
    site_variance
        Whether to apply site-wise variance normalisation (:class:`SiteVarianceNormalizer`).
    """

    target_tr: float = TARGET_TR
    length: int = TARGET_LENGTH
    windows: str = "first"
    min_points: int = 100
    max_constant_fraction: float = 0.1
    site_variance: bool = True

    def __post_init__(self) -> None:
        _check_tr(self.target_tr, "target_tr")
        for name in ("length", "min_points"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
                raise FmrilmError(f"{name}={value!r} is not a positive integer; give a whole number such as 160")
        _check_windows(self.windows)
        frac = self.max_constant_fraction
        if isinstance(frac, bool) or not isinstance(frac, Real) or not 0 <= frac < 1:
            raise FmrilmError(f"max_constant_fraction={frac!r} is not in [0, 1); give a fraction such as 0.1")
        if not isinstance(self.site_variance, bool):
            raise FmrilmError(f"site_variance={self.site_variance!r} is not a boolean; give true or false")

    def to_dict(self) -> dict:
        """Return the options as a JSON-safe dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        """Build a config from :meth:`to_dict` output; missing keys take their defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FmrilmError(f"unknown preprocessing option(s) {unknown}; valid options are {sorted(known)}")
        return cls(**d)


def _check_tr(tr: object, name: str) -> None:
    if isinstance(tr, bool) or not isinstance(tr, Real) or not math.isfinite(tr) or tr <= 0:
        raise FmrilmError(f"{name}={tr!r} is not a positive number of seconds; give the repetition time, e.g. 2.0")


def _check_windows(windows: object) -> None:
    if windows not in WINDOW_MODES:
        raise FmrilmError(f"windows={windows!r} is not one of {list(WINDOW_MODES)}; use 'first' or 'all'")


def _check_2d(x: np.ndarray, what: str = "time series") -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise FmrilmError(f"{what} has shape {x.shape}, expected 2-D (time points, ROIs); reshape it to (T, N)")
    return x


def resample(x: np.ndarray, tr_in: float, tr_out: float = TARGET_TR) -> np.ndarray:
    """Resample ROI time series to another repetition time with an anti-aliasing polyphase filter.

    The TR ratio is approximated by a fraction ``up/down`` (denominator <= 1000) and
    :func:`scipy.signal.resample_poly` is applied along time; when downsampling its FIR low-pass removes
    frequencies above the new Nyquist instead of aliasing them. Each ROI's mean and linear trend are removed
    first and added back (evaluated at the new sample times) afterwards, and the residual is extended past
    both ends by odd reflection (as :func:`scipy.signal.filtfilt` does) rather than zeros: a zero-padded
    signal with a mean near 10000 (raw BOLD), or any step left at the ends, would ring at both edges.

    Parameters
    ----------
    x
        Time series, shape (T, N).
    tr_in
        Repetition time of ``x`` in seconds.
    tr_out
        Repetition time of the output in seconds.

    Returns
    -------
    np.ndarray
        float64, shape (T', N) with ``T' = round(T * tr_in / tr_out)``; a copy when the TRs are equal.
    """
    _check_tr(tr_in, "tr_in")
    _check_tr(tr_out, "tr_out")
    x = _check_2d(x).astype(np.float64)  # always a copy
    n_in = x.shape[0]
    if n_in < 2 and tr_in != tr_out:  # scipy's resampler dies with SIGFPE on one sample
        raise FmrilmError(f"cannot resample a scan of {n_in} time point(s) from TR {tr_in} s to {tr_out} s; "
                          "a scan needs at least 2 time points")
    n_out = int(math.floor(n_in * tr_in / tr_out + 0.5))
    ratio = Fraction(tr_in / tr_out).limit_denominator(_MAX_DENOMINATOR)
    up, down = ratio.numerator, ratio.denominator
    if up == down or n_in == 0:
        return x
    t = np.arange(n_in) - (n_in - 1) / 2.0
    mean = x.mean(axis=0)
    denom = float(t @ t)
    slope = (t @ (x - mean)) / denom if denom > 0 else np.zeros(x.shape[1])
    resid = x - mean - np.outer(t, slope)
    y = resample_poly(resid, up, down, axis=0, padtype="antireflect")
    if y.shape[0] < n_out:  # only when the fraction rounds the other way; pad with the last sample
        y = np.pad(y, ((0, n_out - y.shape[0]), (0, 0)), mode="edge")
    t_out = np.arange(n_out) * (down / up) - (n_in - 1) / 2.0  # output times in input-sample units
    return y[:n_out] + mean + np.outer(t_out, slope)


def fit_length(
    x: np.ndarray, length: int = TARGET_LENGTH, windows: str = "first", min_points: int = 100
) -> tuple[list[np.ndarray], str]:
    """Cut or stretch a (resampled) scan to windows of exactly ``length`` points.

    Parameters
    ----------
    x
        Time series at the target TR, shape (T, N).
    length
        Points per window.
    windows
        ``"first"`` keeps the first ``length`` points; ``"all"`` keeps ``T // length`` consecutive
        non-overlapping windows (the remainder is dropped).
    min_points
        Scans with ``T < min_points`` are refused. Scans with ``min_points <= T < length`` are linearly
        interpolated onto ``length`` evenly spaced positions spanning the scan, as the paper does.

    Returns
    -------
    windows : list of np.ndarray
        Each of shape (length, N), a copy.
    flag : str
        ``"ok"`` when the scan was clipped/windowed, ``"interpolated"`` when it was stretched.
    """
    x = _check_2d(x)
    _check_windows(windows)
    n = x.shape[0]
    if n < min_points:
        raise FmrilmError(
            f"scan has {n} time points after resampling, fewer than min_points={min_points}; "
            "drop the scan or lower the minimum with --min-points"
        )
    if n < length:
        old = np.arange(n)
        new = np.linspace(0, n - 1, length)
        stretched = np.empty((length, x.shape[1]))
        for j in range(x.shape[1]):
            stretched[:, j] = np.interp(new, old, x[:, j])
        return [stretched], "interpolated"
    n_windows = 1 if windows == "first" else n // length
    return [x[k * length : (k + 1) * length].copy() for k in range(n_windows)], "ok"


def robust_zscore(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Robust z-score of each ROI over time: ``(x - median) / IQR``.

    Median and interquartile range (75th minus 25th percentile) are computed per ROI (column), so ROIs of
    very different amplitude all end with median 0 and IQR 1.

    Constant-ROI policy: a ROI whose IQR is zero (constant, all zero, or constant apart from a few
    outliers) cannot be scaled; its output column is all zeros and it is flagged in the returned mask. The
    caller decides whether too many flagged ROIs make the scan unusable (``max_constant_fraction``). "Zero"
    means IQR <= 1e-9 times the ROI's largest absolute value, so float rounding noise left by resampling a
    constant signal counts as constant.

    Parameters
    ----------
    x
        Time series, shape (T, N).

    Returns
    -------
    z : np.ndarray
        float32, shape (T, N).
    constant : np.ndarray
        bool, shape (N,); True for ROIs with zero IQR.
    """
    x = _check_2d(x).astype(np.float64, copy=False)
    q25, median, q75 = np.percentile(x, [25, 50, 75], axis=0)
    iqr = q75 - q25
    scale = np.abs(x).max(axis=0) if x.shape[0] else np.zeros(x.shape[1])
    constant = iqr <= _CONSTANT_RTOL * scale
    safe_iqr = np.where(constant, 1.0, iqr)
    z = np.where(constant, 0.0, (x - median) / safe_iqr)
    return z.astype(np.float32), constant


class SiteVarianceNormalizer:
    """Site-wise variance normalisation, fitted on training scans one scan at a time.

    After :func:`robust_zscore` every ROI has IQR 1 within each scan, but the distribution shape (tails)
    and therefore the residual scale still differ by scanner and site; a model could learn the site from
    that. This equalises, for every ROI, the standard deviation across sites: for each site it estimates
    the pooled within-scan SD of each ROI over that site's training scans (sum over scans of squared
    deviations from the scan's mean, divided by the sum of ``T - 1``), and the same pooled SD over all
    training scans of all sites (``global_scale_``). :meth:`transform` multiplies a scan of site ``s`` by
    ``global_scale_ / scale_[s]`` per ROI, so every site ends on the common global scale. Scans of sites not
    seen in training (or with no site) are returned unchanged, as are ROIs whose site or global scale is 0.

    Fit only on training scans (so validation/test statistics do not leak), then :meth:`finalize`. Calling
    :meth:`partial_fit` again afterwards keeps accumulating; call :meth:`finalize` again to refresh.

    Attributes
    ----------
    scale_ : dict[str, np.ndarray]
        Site -> per-ROI pooled SD, shape (N,), float64.
    global_scale_ : np.ndarray
        Per-ROI pooled SD over all sites, shape (N,), float64.
    n_scans_ : dict[str, int]
        Site -> number of training scans.
    """

    def __init__(self) -> None:
        self._sum_sq: dict[str, np.ndarray] = {}
        self._count: dict[str, int] = {}
        self._n_scans: dict[str, int] = {}
        self._n_rois: int | None = None

    def _check_rois(self, x: np.ndarray) -> np.ndarray:
        x = _check_2d(x)
        if self._n_rois is not None and x.shape[1] != self._n_rois:
            raise FmrilmError(
                f"scan has {x.shape[1]} ROIs but the site normaliser was fitted on {self._n_rois}; "
                "use the same atlas for every scan"
            )
        return x

    def partial_fit(self, x: np.ndarray, site: str) -> SiteVarianceNormalizer:
        """Accumulate one training scan of shape (T, N) from ``site``."""
        if site is None or str(site) == "":
            raise FmrilmError(
                f"site={site!r} for a training scan; give every scan a site or set site_variance=False"
            )
        x = self._check_rois(x).astype(np.float64, copy=False)
        site = str(site)
        self._n_rois = x.shape[1]
        dev = x - x.mean(axis=0)
        self._sum_sq[site] = self._sum_sq.get(site, np.zeros(x.shape[1])) + (dev * dev).sum(axis=0)
        self._count[site] = self._count.get(site, 0) + max(x.shape[0] - 1, 0)
        self._n_scans[site] = self._n_scans.get(site, 0) + 1
        return self

    def finalize(self) -> SiteVarianceNormalizer:
        """Compute ``scale_``, ``global_scale_`` and ``n_scans_`` from the accumulated scans."""
        if not self._sum_sq:
            raise FmrilmError("the site normaliser saw no training scans; fit it on at least one scan")
        self.scale_ = {s: _pooled_sd(self._sum_sq[s], self._count[s]) for s in self._sum_sq}
        total_sq = np.sum(list(self._sum_sq.values()), axis=0)
        self.global_scale_ = _pooled_sd(total_sq, sum(self._count.values()))
        self.n_scans_ = dict(self._n_scans)
        return self

    def transform(self, x: np.ndarray, site: str | None) -> np.ndarray:
        """Put a scan of shape (T, N) from ``site`` on the global scale; returns a new array of x's dtype."""
        if not hasattr(self, "scale_"):
            raise FmrilmError("the site normaliser is not fitted; call partial_fit on training scans, then finalize")
        x = self._check_rois(x)
        out_dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
        site_scale = self.scale_.get(str(site)) if site is not None else None
        if site_scale is None:
            return x.astype(out_dtype, copy=True)
        valid = (site_scale > 0) & (self.global_scale_ > 0)
        factor = np.where(valid, self.global_scale_ / np.where(valid, site_scale, 1.0), 1.0)
        return (x * factor).astype(out_dtype, copy=False)

    def to_dict(self) -> dict:
        """Return the fitted state as a JSON-safe dict (per-site scale, n_scans and accumulators)."""
        if not hasattr(self, "scale_"):
            raise FmrilmError("the site normaliser is not fitted; call finalize before saving it")
        sites = {
            s: {
                "n_scans": int(self._n_scans[s]),
                "count": int(self._count[s]),
                "sum_sq": self._sum_sq[s].tolist(),
                "scale": self.scale_[s].tolist(),
            }
            for s in self.scale_
        }
        return {"n_rois": int(self._n_rois), "global_scale": self.global_scale_.tolist(), "sites": sites}

    @classmethod
    def from_dict(cls, d: dict) -> SiteVarianceNormalizer:
        """Rebuild a fitted normaliser from :meth:`to_dict` output."""
        try:
            n_rois = int(d["n_rois"])
            norm = cls()
            norm._n_rois = n_rois
            norm.global_scale_ = _vector(d["global_scale"], n_rois, "global_scale")
            norm.scale_ = {}
            for s, entry in d["sites"].items():
                norm.scale_[s] = _vector(entry["scale"], n_rois, f"sites.{s}.scale")
                norm._sum_sq[s] = _vector(entry["sum_sq"], n_rois, f"sites.{s}.sum_sq")
                norm._count[s] = int(entry["count"])
                norm._n_scans[s] = int(entry["n_scans"])
        except FmrilmError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise FmrilmError(
                f"site normaliser state lacks or mangles {exc}; regenerate it with SiteVarianceNormalizer.to_dict"
            ) from None
        norm.n_scans_ = dict(norm._n_scans)
        return norm


def _pooled_sd(sum_sq: np.ndarray, count: int) -> np.ndarray:
    return np.sqrt(sum_sq / count) if count > 0 else np.zeros_like(sum_sq)


def _vector(values: list, n: int, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (n,):
        raise FmrilmError(f"site normaliser field {name} has shape {v.shape}, expected ({n},); regenerate it")
    return v


def standardize_scan(x: np.ndarray, tr: float, config: PreprocessConfig) -> tuple[list[np.ndarray], dict]:
    """Standardise one scan: resample to ``config.target_tr``, fit to ``config.length``, robust z-score.

    Site-wise variance normalisation is not applied here; it needs the whole training cohort.

    Parameters
    ----------
    x
        Native time series, shape (T, N), finite values.
    tr
        Native repetition time in seconds.
    config
        Preprocessing options.

    Returns
    -------
    windows : list of np.ndarray
        float32, each of shape (config.length, N); one per window.
    qc : dict
        ``"length_flag"`` (``"ok"``/``"interpolated"``), ``"n_constant_rois"`` (ROIs constant in any
        window), ``"resampled_length"`` (points after resampling).
    """
    x = _check_2d(x)
    if not np.all(np.isfinite(x)):
        raise FmrilmError(f"time series has {int(np.sum(~np.isfinite(x)))} NaN/Inf values; clean or drop the scan")
    resampled = resample(x, tr, config.target_tr)
    raw_windows, flag = fit_length(resampled, config.length, config.windows, config.min_points)
    zs, masks = zip(*(robust_zscore(w) for w in raw_windows))
    n_constant = int(np.logical_or.reduce(masks).sum())
    n_rois = x.shape[1]
    if n_rois and n_constant / n_rois > config.max_constant_fraction:
        raise FmrilmError(
            f"{n_constant} of {n_rois} ROIs are constant ({n_constant / n_rois:.0%}), more than "
            f"max_constant_fraction={config.max_constant_fraction}; check the atlas/mask or raise "
            "--max-constant-fraction"
        )
    qc = {"length_flag": flag, "n_constant_rois": n_constant, "resampled_length": int(resampled.shape[0])}
    return list(zs), qc
