"""Group ICA of the reference cohort and the temporal descriptors of each scan's component time courses.

Measures
--------
A scan's component time courses ``c`` (T, K) come from :meth:`GroupICA.transform` (dual regression stage 1).
Per component ``k``; a network's value is the mean over the components assigned to it (:class:`GroupICA`),
a network with no component has no column, and the global columns average over all K components:

``ica.amplitude.<net>``, ``ica.amplitude``
    Temporal amplitude, the SD of the time course: ``std(c_k)`` (ddof 1). Unit: component units, the SD
    of the component's source over the ICA training scans (so about 1 for a typical reference scan).
``ica.variability.<net>``, ``ica.variability``
    Temporal variability, the SD of the first difference over sqrt(2): ``std(c_k[t+1] - c_k[t]) / sqrt(2)``
    (ddof 1). Equals the amplitude for white noise and is smaller for slow fluctuations, so it measures how
    fast the course moves, not how far. Unit: component units.
``ica.spectral_ratio.<net>``, ``ica.spectral_ratio``
    Low-to-high frequency power ratio ``P(0.01 <= f < 0.1 Hz) / P(0.1 <= f <= 0.25 Hz)`` of the Welch power
    spectrum (band power = sum of the spectrum's bins in the band; the high band stops at Nyquist if that is
    lower; NaN when a band holds no bin or no power). Unit: ratio.
``ica.fALFF.<net>``
    Fractional amplitude of low-frequency fluctuations ``P(0.01 <= f <= 0.08 Hz) / P(0 <= f <= Nyquist)``
    on the same spectrum. Zou et al. (2008) sum amplitudes (square roots of power) of an FFT; this is the
    power version, in [0, 1]. Unit: ratio.
``ica.fnc.<A>.<B>``
    Functional network connectivity. Between networks A != B: Fisher z of the Pearson correlation of the
    two network time courses, each the mean of its components' z-scored (over time) courses. Within a
    network (``A == B``, only when it has >= 2 components): mean Fisher z over its component pairs.
    Unit: Fisher z.

Spectra: ``scipy.signal.welch`` with a Hann window of ``nperseg = min(T, round(128 s / TR))`` samples
(64 at TR 2 s: 4 half-overlapping windows of a 160-point scan, bins every 1/128 Hz), constant detrending.
The fALFF band is that of Zou et al. (2008); the low/high ratio is the spectral summary of GIFT-style
analyses of ICA time courses, with the two bands meeting at 0.1 Hz. Reference matched: the numpy/scipy
definitions above, tested against direct computations and on pure sines.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
import warnings

import numpy as np
from scipy.signal import welch

from fmrilm.descriptors.common import column, fisher_z, network_pairs
from fmrilm.errors import FmrilmError, FmrilmWarning

STATE_FORMAT = "fmrilm.group_ica/1"
WELCH_SECONDS = 128.0  # Welch window length in seconds, so the frequency resolution does not depend on TR
LOW_BAND, HIGH_BAND, ALFF_BAND = (0.01, 0.1), (0.1, 0.25), (0.01, 0.08)
TOP_SHARE = 0.10  # share of largest-|loading| ROIs that sets a map's sign


def _subsample(scans: Iterable[np.ndarray], max_scans: int) -> Iterable[np.ndarray]:
    """At most ``max_scans`` evenly spaced scans, without holding more than ``max_scans`` in memory.

    A sequence is indexed at ``linspace(0, n - 1, max_scans)`` (as the reference does); a stream keeps every
    ``stride``-th scan and doubles the stride when more than ``max_scans`` are held, so between
    ``max_scans / 2`` and ``max_scans`` evenly spaced scans are kept.
    """
    if isinstance(scans, Sequence) and not isinstance(scans, np.ndarray):
        indices = np.linspace(0, len(scans) - 1, min(len(scans), max_scans)).astype(int)
        return [scans[i] for i in np.unique(indices)]
    kept: list[tuple[int, np.ndarray]] = []
    stride = 1
    for i, scan in enumerate(scans):
        if i % stride == 0:
            kept.append((i, scan))
        if len(kept) > max_scans:
            stride *= 2
            kept = [(j, s) for j, s in kept if j % stride == 0]
    return [s for _, s in kept]


def _orient(mixing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z-scored maps (K, N), signs (K,)): each row z-scored over ROIs and flipped so that its top 10 %
    |loadings| sum to a positive value."""
    maps = mixing - mixing.mean(axis=1, keepdims=True)
    maps = maps / maps.std(axis=1, keepdims=True)
    n_top = max(1, int(round(TOP_SHARE * maps.shape[1])))
    top = np.argsort(-np.abs(maps), axis=1)[:, :n_top]
    signs = np.sign(np.take_along_axis(maps, top, axis=1).sum(axis=1))
    signs = np.where(signs == 0, 1.0, signs)
    return maps * signs[:, None], signs


class GroupICA:
    """Temporal-concatenation group ICA on ROI time series.

    GIFT's group ICA (Calhoun et al. 2001) is *spatial* ICA: voxels are the samples and the maps are
    independent. With ROI data there are only N (~450) spatial samples for K components, too few for a
    stable spatial ICA, while a cohort offers tens of thousands of time points. This class therefore runs
    ICA with time points as samples (Smith et al. 2012's temporal ICA): the up-to-``max_scans`` training
    scans (each demeaned per ROI) are concatenated in time, reduced by PCA to K dimensions over ROIs, and
    unmixed by FastICA (``whiten="unit-variance"``) into K independent time courses; the mixing matrix,
    taken back to ROI space, gives the spatial maps ``mixing_`` (K, N, data units: ``x ~ sources @
    mixing_``), and ``maps_`` is each of them z-scored over ROIs. Every map is sign-flipped so its
    largest loadings are positive (its top 10 % |z| sum > 0); maps are ordered by the variance of the
    training data they explain. A map is assigned to the network with the largest mean z-loading over
    its ROIs (a mean, not a count, so large networks are not favoured): ``networks_`` (K,).

    Memory: the kept scans are held as float32 (500 scans x 160 x 450 ROIs = 144 MB), which is what
    ``max_scans`` bounds; more scans are thinned to an evenly spaced subset (:func:`_subsample`).

    Parameters
    ----------
    n_components : int
        Number of components K (at most N and at most the number of scans).
    max_scans : int
        Most scans concatenated for the fit.
    random_state : int or None
        FastICA's seed.
    """

    def __init__(self, n_components: int = 20, max_scans: int = 500, random_state: int | None = 0):
        self.n_components = n_components
        self.max_scans = max_scans
        self.random_state = random_state

    def fit(self, scans: Iterable[np.ndarray], network_index: np.ndarray, names: list[str]) -> "GroupICA":
        """Fit on (T_i, N) scans (iterable, e.g. a generator); ``network_index`` (N,) indexes ``names``.

        Sets ``maps_`` and ``mixing_`` (K, N), ``networks_`` (K,) network names, ``names_`` and ``n_scans_``.
        """
        from sklearn.decomposition import FastICA
        from sklearn.exceptions import ConvergenceWarning

        network_index = np.asarray(network_index, dtype=np.int64)
        valid = network_index.ndim == 1 and network_index.size > 0
        if not valid or not 0 <= network_index.min() <= network_index.max() < len(names):
            raise FmrilmError(f"network_index must give each ROI's index into the {len(names)} network names; got shape "
                              f"{network_index.shape}: use common.network_labels(rois)")
        data = [self._check_scan(x, network_index.size, i) for i, x in enumerate(_subsample(scans, self.max_scans))]
        k, n = int(self.n_components), network_index.size
        if len(data) < k or n < k:
            raise FmrilmError(
                f"{len(data)} scans of {n} ROIs for {k} ICA components; the group ICA needs at least as many "
                "scans and ROIs as components: lower --ica-components or add scans"
            )
        covariance = sum(x.T.astype(np.float64) @ x for x in data)
        _, vectors = np.linalg.eigh(covariance)
        basis = vectors[:, ::-1][:, :k]  # (N, K) principal axes over ROIs
        reduced = np.concatenate([x @ basis for x in data])
        ica = FastICA(k, whiten="unit-variance", whiten_solver="eigh", max_iter=1000, random_state=self.random_state)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            ica.fit(reduced)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            warnings.warn(f"group ICA (FastICA, {k} components) did not converge in 1000 iterations: the sources are "
                          "close to Gaussian (common in synthetic data); ICA descriptors are less stable", FmrilmWarning, stacklevel=2)
        mixing = (basis @ ica.mixing_).T  # unit-variance sources: ||mixing_k||^2 is the variance explained
        mixing = mixing[np.argsort(-np.square(mixing).sum(axis=1), kind="stable")]
        self.maps_, signs = _orient(mixing)
        self.mixing_, self.names_, self.n_scans_ = mixing * signs[:, None], list(names), len(data)
        self.networks_ = self._assign(network_index)
        self._pinv = np.linalg.pinv(self.mixing_)
        return self

    @staticmethod
    def _check_scan(x: np.ndarray, n_rois: int, i: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != n_rois or x.shape[0] < 2 or not np.isfinite(x).all():
            raise FmrilmError(f"ICA scan {i} has shape {x.shape} or non-finite values; pass finite (T, {n_rois}) series")
        return (x - x.mean(axis=0)).astype(np.float32)

    def _assign(self, network_index: np.ndarray) -> list[str]:
        """Each map's network: the one with the largest mean z-loading over its ROIs."""
        counts = np.bincount(network_index, minlength=len(self.names_)).astype(np.float64)
        sums = np.zeros((len(self.maps_), len(self.names_)))
        np.add.at(sums.T, network_index, self.maps_.T)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = np.where(counts > 0, sums / counts, -np.inf)
        return [self.names_[j] for j in means.argmax(axis=1)]

    def _check_fitted(self) -> None:
        if not hasattr(self, "maps_"):
            raise FmrilmError("the group ICA is not fitted; call fit(scans, ...) or load it with GroupICA.from_state")

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Component time courses (T, K) of a (T, N) scan: ``x @ pinv(mixing_)``, least squares per time point.

        Dual regression stage 1: each time point's ROI pattern is regressed on the K spatial maps, here the
        sign-aligned ICA maps in data units (``mixing_``), so the courses are the ICA sources, of variance 1
        on the training data. Not on the z-scored ``maps_`` (FSL's ``--demean``): maps that tile the ROIs,
        as network components do, are nearly collinear once each is demeaned (condition number 26 against
        1.2 for the planted maps of the tests), and every course then picks up a shared signal.
        """
        self._check_fitted()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.maps_.shape[1]:
            raise FmrilmError(
                f"scan of shape {x.shape} but the ICA maps have {self.maps_.shape[1]} ROIs; use the reference's atlas"
            )
        return x @ self._pinv

    def to_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(JSON-safe config, {"maps", "mixing": (K, N) float64}) for saving as JSON + safetensors."""
        self._check_fitted()
        config = {
            "format": STATE_FORMAT, "n_components": int(self.n_components), "max_scans": int(self.max_scans),
            "random_state": None if self.random_state is None else int(self.random_state),
            "names": list(self.names_), "networks": list(self.networks_), "n_scans": int(self.n_scans_),
        }
        arrays = {"maps": self.maps_, "mixing": self.mixing_}
        return config, {name: np.ascontiguousarray(a, dtype=np.float64) for name, a in arrays.items()}

    @classmethod
    def from_state(cls, config: dict, arrays: dict[str, np.ndarray]) -> "GroupICA":
        """The model written by :meth:`to_state`."""
        if config.get("format") != STATE_FORMAT or not {"maps", "mixing"} <= set(arrays):
            raise FmrilmError(
                f"ICA state of format {config.get('format')!r}: expected {STATE_FORMAT} with maps and mixing; "
                "rebuild the reference"
            )
        maps, mixing = (np.asarray(arrays[name], dtype=np.float64) for name in ("maps", "mixing"))
        networks = list(config["networks"])
        if maps.ndim != 2 or mixing.shape != maps.shape or len(maps) != len(networks) or not np.isfinite(mixing).all():
            raise FmrilmError(f"ICA maps of shape {maps.shape} do not match {len(networks)} networks; rebuild the reference")
        model = cls(config["n_components"], config["max_scans"], config["random_state"])
        model.maps_, model.mixing_, model.names_, model.networks_ = maps, mixing, list(config["names"]), networks
        model.n_scans_, model._pinv = config["n_scans"], np.linalg.pinv(mixing)
        return model


def _band(freqs: np.ndarray, power: np.ndarray, low: float, high: float, closed: bool) -> np.ndarray:
    """Summed power (K,) of the bins with ``low <= f < high`` (``<= high`` when closed)."""
    mask = (freqs >= low) & ((freqs <= high) if closed else (freqs < high))
    return power[mask].sum(axis=0)


def spectral_measures(courses: np.ndarray, tr: float) -> tuple[np.ndarray, np.ndarray]:
    """(low/high power ratio (K,), fALFF (K,)) of (T, K) time courses sampled every ``tr`` seconds."""
    nperseg = min(len(courses), max(2, round(WELCH_SECONDS / tr)))
    freqs, power = welch(courses, fs=1.0 / tr, nperseg=nperseg, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        high = _band(freqs, power, *HIGH_BAND, closed=True)
        ratio = _band(freqs, power, *LOW_BAND, closed=False) / np.where(high > 0, high, np.nan)
        total = power.sum(axis=0)
        falff = _band(freqs, power, *ALFF_BAND, closed=True) / np.where(total > 0, total, np.nan)
    return ratio, falff


def _fnc(courses: np.ndarray, networks: np.ndarray, present: list[str]) -> dict[str, float]:
    """Between-network z of network-mean courses; within-network mean z over component pairs (module doc)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (courses - courses.mean(axis=0)) / courses.std(axis=0)
        z_pairs = fisher_z(np.corrcoef(z, rowvar=False))
        means = np.stack([z[:, networks == name].mean(axis=1) for name in present], axis=1)
        z_networks = fisher_z(np.corrcoef(means, rowvar=False).reshape(len(present), len(present)))
    values = {}
    for a, b in network_pairs(present):
        i, j = present.index(a), present.index(b)
        if a != b:
            values[column("ica", "fnc", a, b)] = float(z_networks[i, j])
        elif (members := np.flatnonzero(networks == a)).size >= 2:
            block = z_pairs[np.ix_(members, members)]
            values[column("ica", "fnc", a, b)] = float(block[np.triu_indices(members.size, 1)].mean())
    return values


def ica_measures(x: np.ndarray, model: GroupICA, tr: float = 2.0) -> dict[str, float]:
    """ICA descriptors of one scan (see the module docstring).

    Parameters
    ----------
    x : (T, N) array
        Standardized scan, T >= 3.
    model : GroupICA
        The reference's fitted group ICA.
    tr : float
        Repetition time in seconds.

    Returns
    -------
    dict
        ``ica.amplitude``, ``ica.variability``, ``ica.spectral_ratio`` globally and per network with
        components, ``ica.fALFF.<net>``, and ``ica.fnc.<A>.<B>``, networks in the order of ``model.names_``.
    """
    courses = model.transform(x)
    if len(courses) < 3 or not tr > 0:
        raise FmrilmError(f"scan of {len(courses)} time points at TR {tr}: ICA measures need T >= 3 and TR > 0")
    ratio, falff = spectral_measures(courses, tr)
    per_component = {
        "amplitude": courses.std(axis=0, ddof=1),
        "variability": np.diff(courses, axis=0).std(axis=0, ddof=1) / math.sqrt(2),
        "spectral_ratio": ratio,
        "fALFF": falff,
    }
    networks = np.asarray(model.networks_)
    assigned = set(model.networks_)
    present = [name for name in model.names_ if name in assigned]
    values: dict[str, float] = {}
    for measure, per in per_component.items():
        if measure != "fALFF":
            values[f"ica.{measure}"] = float(per.mean())
        values.update({column("ica", measure, name): float(per[networks == name].mean()) for name in present})
    values.update(_fnc(courses, networks, present))
    return values
