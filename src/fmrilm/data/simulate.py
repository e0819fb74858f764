"""Simulated cohorts shaped like real data: raw ROI time series at native TR, a participants table and the truth.

The generative model (docs/simulation.md gives every parameter with its units):

1. Template: a group correlation (N, N) with Yeo-7 + subcortical network structure - the real HCP group FC
   when available - minus part of the global signal (so Default turns anti-correlated with the attention
   networks), split into a positive-definite ROI-level part F (eigenvalue-clipped) and PSD network-pair
   means B0 (K, K).
2. Subject: R_s = F + clip(B0 + Delta_s)[network(i), network(j)] + individual random spatial modes, where
   Delta_s (K, K) sums the site offset, individual variability and the planted phenotype effects; only the
   small (K, K) matrix is eigenvalue-clipped per subject, so 450 ROIs stay fast.
3. Scan: X = baseline + sd * (Z @ chol(R_s).T) + white noise, where Z has the continuous-time spectrum
   1 / (1 + (f / f_knee)^slope), so autocorrelation and low-frequency power follow the TR as in real BOLD.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fmrilm.constants import DEFAULT_ATLAS, SUBCORTICAL, TARGET_TR, YEO7_NETWORKS
from fmrilm.errors import FmrilmError
from fmrilm.io import atomic_output_dir, check_output_dir, write_json_atomic

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets" / "simulate"
FORMATS = ("npy", "csv", "tsv")
KINDS = ("pair", "within", "segregation", "gradient", "amplitude")
NETWORKS = (*YEO7_NETWORKS, SUBCORTICAL)
HCP_DIR = Path("reference") / "hcp_group_fc_schaefer400"
_TEMPLATE_SEED = 20240607  # the template "brain" (baselines, amplitudes) is fixed; only subjects vary with seed

# Mean group-average r between networks (HCP, no global signal regression, rounded), order of NETWORKS;
# used when the HCP file is absent. Subcortical rows are weaker, as in real data.
_RAW_BLOCKS = np.array([
    [.38, .23, .26, .20, .08, .13, .13, .09],
    [.23, .32, .22, .21, .07, .10, .12, .09],
    [.26, .22, .36, .24, .07, .18, .09, .08],
    [.20, .21, .24, .29, .06, .16, .08, .10],
    [.08, .07, .07, .06, .10, .06, .10, .04],
    [.13, .10, .18, .16, .06, .28, .14, .09],
    [.13, .12, .09, .08, .10, .14, .24, .08],
    [.09, .09, .08, .10, .04, .09, .08, .25],
])
# Position of each network on the principal (unimodal -> transmodal) gradient, Margulies et al. 2016 order.
GRADIENT = {"Vis": -1.0, "SomMot": -0.8, "DorsAttn": -0.4, "SalVentAttn": -0.1, "Limbic": 0.3, "Cont": 0.5,
            "Default": 1.0, SUBCORTICAL: 0.0}
_ASEG = {"HIP": "hippo", "AMY": "amyg", "THA": "thal", "NAc": "accumb", "GP": "pal", "PUT": "put", "CAU": "caud"}


@dataclass(frozen=True)
class ModelParams:
    """Generative parameters shared by the presets; a preset's ``"model"`` object overrides any of them."""

    knee_hz: float = 0.08  # spectrum flat below the knee, falling as f^-slope above: BOLD power < 0.1 Hz
    slope: float = 4.0  # spectral exponent above the knee (haemodynamic low-pass)
    white_fraction: float = 0.15  # share of an ROI's variance that is white measurement noise
    global_removal: float = 0.8  # fraction of the global signal regressed out of the template (0 = none)
    eigen_floor: float = 0.15  # smallest eigenvalue kept in the template (positive-definite margin)
    block_floor: float = 0.01  # smallest eigenvalue kept in a subject's network-pair matrix (K, K)
    pair_sd: float = 0.04  # individual variability of each network-pair correlation (r)
    global_sd: float = 0.03  # individual offset of all correlations, arousal/motion-like (r)
    modes: int = 4  # individual random spatial modes: ROI-level variability of FC
    mode_sd: float = 0.15  # loading sd of those modes
    amplitude_sd: float = 0.15  # individual sd of log overall signal amplitude
    network_amplitude_sd: float = 0.1  # individual sd of log amplitude of each network
    psc: float = 1.0  # typical signal sd in percent of the baseline (raw BOLD fluctuates by ~1 %)


@dataclass(frozen=True)
class Template:
    """The fixed group brain of an atlas: ROI table, networks, PD correlation, baselines and amplitudes."""

    rois: pd.DataFrame
    networks: tuple[str, ...]  # the K networks present, in NETWORKS order
    net_index: np.ndarray  # (N,) network of each ROI
    fine: np.ndarray  # (N, N) positive-definite ROI-level part of the group correlation
    blocks: np.ndarray  # (K, K) PSD network-pair means; group correlation = fine + blocks[net, net]
    baseline: np.ndarray  # (N,) raw BOLD mean (hundreds to ~10000)
    psc: np.ndarray  # (N,) relative signal sd (mean ~1; lower in subcortex)
    source: str  # "hcp_group_fc" (ROI level), "hcp_network_blocks" or "network_blocks"


# ----------------------------------------------------------------------------------------------- presets
def list_presets() -> list[str]:
    """Names accepted by ``simulate_cohort(preset=...)``: the JSON files in ``presets/simulate``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str | os.PathLike) -> dict:
    """Load and check a simulation preset by name (see :func:`list_presets`) or from a JSON file path."""
    path = Path(name)
    if path.suffix != ".json":
        path = PRESET_DIR / f"{name}.json"
        if not path.is_file():
            raise FmrilmError(f"unknown simulation preset {str(name)!r}; choose one of {', '.join(list_presets())}")
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FmrilmError(f"simulation preset {path} is not readable JSON ({exc.__class__.__name__})") from None
    spec.setdefault("name", path.stem)
    _check_preset(spec, path)
    return spec


def _require(ok: bool, path: Path, message: str) -> None:
    if not ok:
        raise FmrilmError(f"simulation preset {path}: {message}")


def _check_preset(spec: dict, path: Path) -> None:
    for key in ("dataset", "id_prefix", "age", "female_fraction", "sites", "tasks", "targets", "effects"):
        _require(key in spec, path, f"missing key {key!r}; see docs/simulation.md for the schema")
    _require(all(k in spec["age"] for k in ("min", "max", "mean", "sd")), path, "age needs min, max, mean, sd")
    for site in spec["sites"]:
        _require(site.get("tr", 0) > 0 and site.get("length", 0) >= 10, path, f"site {site} needs tr > 0, length >= 10")
    known = ["age"]
    for name, target in spec["targets"].items():
        binary = target.get("type") == "binary"
        needed = ("positive", "negative", "prevalence") if binary else ("mean", "sd", "min", "max")
        _require(all(k in target for k in needed), path, f"target {name!r} needs {', '.join(needed)} and a type")
        unknown = sorted(set(target.get("depends_on", {})) - set(known))
        _require(not unknown, path, f"target {name!r} depends on {unknown}; use age or targets listed before it")
        known.append(name)
    for task in spec["tasks"]:
        _require(task in ("sex", "age") or task in spec["targets"], path, f"task {task!r} is not a target")
    fields = {f.name for f in dataclasses.fields(ModelParams)}
    _require(set(spec.get("model", {})) <= fields, path, f"unknown model keys {set(spec.get('model', {})) - fields}")
    for effect in spec["effects"]:
        _require(effect.get("target") in spec["tasks"], path, f"effect {effect} targets no listed task")
        _require(effect.get("kind") in KINDS, path, f"effect kind must be one of {', '.join(KINDS)}, got {effect}")
        _require(isinstance(effect.get("size"), (int, float)), path, f"effect {effect} needs a numeric size")
        pair_ok = effect["kind"] != "pair" or len(effect.get("networks", [])) == 2
        _require(pair_ok, path, f"pair effect {effect} needs exactly 2 networks")


# ---------------------------------------------------------------------------------------------- template
def _find_hcp_dir() -> Path | None:
    roots = [Path(os.environ["FMRILM_DATA"])] if os.environ.get("FMRILM_DATA") else []
    roots += [parent.parent / "shared" for parent in Path(__file__).resolve().parents]
    for root in roots:
        if (root / HCP_DIR / "funcMatrix_ctx_schaefer_400.csv").is_file():
            return root / HCP_DIR
    return None


def _read_hcp(directory: Path) -> tuple[np.ndarray, list[str], np.ndarray, list[str]]:
    """Cortex (400, 400) and subcortex (14, 400) group FC as Pearson r (the files hold Fisher z)."""
    def read(stem: str) -> tuple[np.ndarray, list[str]]:
        labels = (directory / f"funcLabels_{stem}.csv").read_text().strip().split(",")
        return np.tanh(np.loadtxt(directory / f"funcMatrix_{stem}.csv", delimiter=",")), labels
    return (*read("ctx_schaefer_400"), *read("sctx_schaefer_400"))


def _structure(name: str, network: str) -> str:
    """Sub-region token: Schaefer 'PFC' of 7Networks_LH_Default_PFC_3, Tian 'AMY' of lAMY-rh."""
    if network == SUBCORTICAL:
        return name.split("-")[0].lstrip("lmap")
    parts = name.split("_")
    return parts[3] if len(parts) > 4 else network


def _fine_structure(rois: pd.DataFrame, net_index: np.ndarray) -> np.ndarray:
    """ROI-level structure inside network blocks - neighbours (close parcel numbers, same hemisphere) and
    homologous sub-regions correlate more - demeaned per block so network-pair means stay as tabled."""
    hemi = rois["hemisphere"].to_numpy()
    token = np.array([_structure(n, w) for n, w in zip(rois["name"], rois["network"])])
    same_net = net_index[:, None] == net_index[None, :]
    order = np.arange(len(rois))
    near = 0.15 * np.exp(-np.abs(order[:, None] - order[None, :]) / 4.0) * same_net * (hemi[:, None] == hemi)
    fine = near + 0.06 * (token[:, None] == token) * (hemi[:, None] != hemi)
    onehot = np.eye(net_index.max() + 1)[net_index]
    block_mean = (onehot.T @ fine @ onehot) / np.outer(onehot.sum(0), onehot.sum(0))
    return fine - block_mean[np.ix_(net_index, net_index)]


def _hcp_blocks(ctx: np.ndarray, labels: list[str], sctx: np.ndarray) -> np.ndarray:
    """Network-pair means (8, 8, NETWORKS order) of the HCP matrices; subcortex-subcortex stays tabled."""
    index = np.array([YEO7_NETWORKS.index(label.split("_")[2]) for label in labels])
    blocks, onehot = _RAW_BLOCKS.copy(), np.eye(7)[index]
    blocks[:7, :7] = _block_means(ctx, index)
    blocks[7, :7] = blocks[:7, 7] = sctx.mean(0) @ onehot / onehot.sum(0)
    return blocks


def _group_fc(rois: pd.DataFrame, networks: tuple[str, ...], net_index: np.ndarray, use_hcp: bool):
    """Raw group correlation (N, N) before global-signal removal and clipping, and its source."""
    hcp = _find_hcp_dir() if use_hcp else None
    blocks, source = _RAW_BLOCKS, "network_blocks"
    if hcp is not None:
        ctx, labels, sctx, sctx_labels = _read_hcp(hcp)
        blocks, source = _hcp_blocks(ctx, labels, sctx), "hcp_network_blocks"
    pos = [NETWORKS.index(n) for n in networks]
    fc = blocks[np.ix_(pos, pos)][np.ix_(net_index, net_index)] + _fine_structure(rois, net_index)
    cortex = np.flatnonzero(rois["network"] != SUBCORTICAL)
    if hcp is None or list(rois["name"].iloc[cortex]) != labels:
        return fc, source  # not Schaefer-400: HCP (if any) sets the network-pair means only
    fc[np.ix_(cortex, cortex)] = ctx
    for i in np.flatnonzero(rois["network"] == SUBCORTICAL):  # Tian region -> its aseg structure's profile
        label = rois["hemisphere"].iloc[i] + _ASEG.get(_structure(rois["name"].iloc[i], SUBCORTICAL), "?")
        if label in sctx_labels:
            fc[i, cortex] = fc[cortex, i] = sctx[sctx_labels.index(label)]
    return fc, "hcp_group_fc"


@functools.lru_cache(maxsize=4)
def build_template(atlas: str, use_hcp: bool, global_removal: float, eigen_floor: float) -> Template:
    """The group template of an atlas (cached): see :class:`Template`; R0 is (N, N), positive definite."""
    from fmrilm.data.atlas import load_atlas

    rois = load_atlas(atlas, with_image=False).rois
    networks = tuple(n for n in NETWORKS if n in set(rois["network"]))
    if not set(YEO7_NETWORKS) & set(networks):
        raise FmrilmError(f"atlas {atlas} has no Yeo-7 network labels; simulate with schaefer400_tian_s3 or similar")
    net_index = np.array([networks.index(n) if n in networks else networks.index(SUBCORTICAL) for n in rois["network"]])
    fc, source = _group_fc(rois, networks, net_index, use_hcp)
    np.fill_diagonal(fc, 1.0)
    mean_r = fc.mean(1)  # covariance of each ROI with the global signal; partial regression keeps fc PSD
    fine, blocks = _split(fc - global_removal * np.outer(mean_r, mean_r) / mean_r.mean(), net_index, eigen_floor)
    rng = np.random.default_rng(_TEMPLATE_SEED)
    baseline = np.exp(rng.uniform(np.log(400), np.log(10000), len(rois)))
    psc = np.exp(rng.normal(0, 0.25, len(rois))) * np.where(rois["network"] == SUBCORTICAL, 0.7, 1.0)
    return Template(rois, networks, net_index, fine, blocks, baseline, psc, source)


def _split(fc: np.ndarray, net_index: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a correlation (N, N) into a positive-definite ROI-level part (N, N) and PSD network-pair means
    (K, K) that add up to unit diagonal; subjects then only vary the small (K, K) part, which stays cheap."""
    blocks = _clip(np.nan_to_num(_block_means(fc, net_index)), 0.0)  # a one-ROI network has no within mean
    lifted = blocks[np.ix_(net_index, net_index)]
    fine = _clip(fc - lifted, floor)
    scale = np.sqrt((1 - np.diag(lifted)) / np.diag(fine))  # congruence: stays PD, diagonal back to 1 - block
    return fine * np.outer(scale, scale), blocks


def _clip(matrix: np.ndarray, floor: float) -> np.ndarray:
    """Symmetric matrix with eigenvalues below ``floor`` raised to it (the nearest PSD matrix for floor 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.maximum(values, floor)) @ vectors.T


def _block_means(fc: np.ndarray, net_index: np.ndarray) -> np.ndarray:
    """Network-pair means (K, K) of a correlation matrix (N, N), the diagonal left out of within-network means."""
    onehot = np.eye(net_index.max() + 1)[net_index]
    sizes = onehot.sum(0)
    pairs = np.outer(sizes, sizes) - np.diag(sizes)
    off = fc - np.diag(np.diag(fc))
    return (onehot.T @ off @ onehot) / np.where(pairs > 0, pairs, np.nan)


# ------------------------------------------------------------------------------------------ participants
def _sample_participants(spec: dict, n: int, rng: np.random.Generator) -> tuple[pd.DataFrame, dict, np.ndarray]:
    """Participants table, effect codes per target (n,) and site index (n,)."""
    from scipy.stats import truncnorm

    weights = np.array([s.get("weight", 1.0) for s in spec["sites"]], float)
    site = rng.choice(len(weights), size=n, p=weights / weights.sum())
    female = rng.random(n) < spec["female_fraction"]
    a = spec["age"]
    age = truncnorm.rvs((a["min"] - a["mean"]) / a["sd"], (a["max"] - a["mean"]) / a["sd"], loc=a["mean"],
                        scale=a["sd"], size=n, random_state=rng)
    width = max(4, len(str(n)))
    table = {"participant_id": [f"sub-{spec['id_prefix']}{i + 1:0{width}d}" for i in range(n)],
             "sex": np.where(female, "F", "M"), "age": age.round(1),
             "site": [spec["sites"][s]["name"] for s in site], "dataset": spec["dataset"],
             "tr": [spec["sites"][s]["tr"] for s in site]}
    codes = {"sex": np.where(female, 0.5, -0.5), "age": (age - a["mean"]) / 10.0}  # age effects are per decade
    latent = {"age": (age - a["mean"]) / a["sd"]}
    for name, target in spec["targets"].items():
        if target["type"] == "binary":
            positive = rng.random(n) < target["prevalence"]
            table[name], codes[name] = np.where(positive, target["positive"], target["negative"]), positive - 0.5
            continue
        parents = target.get("depends_on", {})
        own = np.sqrt(max(1 - sum(w * w for w in parents.values()), 0.0))
        latent[name] = codes[name] = sum(w * latent[p] for p, w in parents.items()) + own * rng.standard_normal(n)
        value = np.clip(target["mean"] + target["sd"] * latent[name], target["min"], target["max"])
        table[name] = value.round(target.get("decimals", 1)).astype(int if target.get("decimals") == 0 else float)
    return pd.DataFrame(table), codes, site


# ----------------------------------------------------------------------------------------------- effects
def _pattern(effect: dict, networks: tuple[str, ...]) -> np.ndarray:
    """Unit pattern of an effect: (K, K) on network-pair correlation, or (K,) on log network amplitude."""
    k, names = len(networks), effect.get("networks", list(YEO7_NETWORKS))
    missing = [n for n in names if n not in networks]
    if missing:
        raise FmrilmError(f"effect {effect} names networks {missing} absent from the atlas; use {', '.join(networks)}")
    idx = [networks.index(n) for n in names]
    yeo = np.array([n in YEO7_NETWORKS for n in networks], float)
    if effect["kind"] == "amplitude":
        return np.isin(np.arange(k), idx).astype(float)
    if effect["kind"] == "pair":
        pattern = np.zeros((k, k))
        pattern[idx[0], idx[1]] = pattern[idx[1], idx[0]] = 1.0
        return pattern
    if effect["kind"] == "within":
        return np.diag(np.isin(np.arange(k), idx).astype(float))
    if effect["kind"] == "segregation":  # within-network up, between-network down: modularity
        return 0.5 * np.outer(yeo, yeo) * (2 * np.eye(k) - 1)
    g = np.array([GRADIENT[n] for n in networks])  # gradient: same-pole pairs up, opposite poles down
    return np.outer(g, g)


def _project(pattern: np.ndarray, fc: np.ndarray, amp: np.ndarray) -> np.ndarray:
    """Least-squares size of ``pattern`` in each scan's network FC (S, K, K) or amplitudes (S, K): (S,)."""
    data = amp if pattern.ndim == 1 else fc
    axes = tuple(range(1, data.ndim))
    return np.nansum(data * pattern, axis=axes) / np.sum(pattern**2)


# -------------------------------------------------------------------------------------------------- scans
def _coloured_noise(rng: np.random.Generator, n_time: int, n_rois: int, tr: float, p: ModelParams) -> np.ndarray:
    """Unit-variance noise (T, N) whose spectrum is defined in Hz, hence consistent across TRs."""
    n_fft = 1 << int(np.ceil(np.log2(2 * n_time)))  # padding keeps the circular wrap out of the crop
    gain = (1 + (np.fft.rfftfreq(n_fft, d=tr) / p.knee_hz) ** p.slope) ** -0.5
    gain[0] = 0.0  # no DC: the baseline is added separately
    power = (2 * np.sum(gain**2) - gain[0] ** 2 - gain[-1] ** 2) / n_fft
    white = rng.standard_normal((n_fft, n_rois), dtype=np.float32)
    spectrum = np.fft.rfft(white, axis=0) * gain[:, None].astype(np.float32)
    return np.fft.irfft(spectrum, n=n_fft, axis=0)[:n_time] / np.float32(np.sqrt(power))


def _subject_delta(rng, effects, codes, i, site, p: ModelParams, k: int, scale: float):
    """Network-pair change (K, K) and log network amplitude change (K,) of subject ``i``."""
    noise = rng.normal(0, p.pair_sd, (k, k))
    delta = np.triu(noise) + np.triu(noise, 1).T + site.get("fc_offset", 0.0) + rng.normal(0, p.global_sd)
    log_amp = rng.normal(0, p.network_amplitude_sd, k)
    for effect in effects:
        shift = scale * effect["size"] * codes[effect["target"]][i]
        if effect["pattern"].ndim == 1:
            log_amp += shift * effect["pattern"]
        else:
            delta += shift * effect["pattern"]
    return delta, log_amp


def _subject_factor(template: Template, delta: np.ndarray, rng, p: ModelParams) -> tuple[np.ndarray, bool]:
    """Lower factor L (N, N) with L @ L.T the subject's correlation; True when the exact diagonal was given up."""
    # Network means of real signals have PSD correlations: clip the subject's (K, K) network-pair matrix so the
    # ROI-level sum fine + blocks stays positive definite.
    blocks = _clip(template.blocks + delta, p.block_floor)
    idx = template.net_index
    modes = rng.normal(0, p.mode_sd, (len(idx), p.modes))  # individual ROI-level structure, a PSD addition
    base = template.fine + blocks[np.ix_(idx, idx)] + modes @ modes.T
    for exact in (True, False):
        corr = base - np.diag(np.diag(blocks - template.blocks)[idx]) if exact else base.copy()
        scale = 1 / np.sqrt(np.diag(corr))
        try:  # exact: within-network shifts keep unit size; else a congruence that is PD by construction
            return np.linalg.cholesky(corr * np.outer(scale, scale)), not exact
        except np.linalg.LinAlgError:
            continue
    raise AssertionError("fine + PSD blocks is positive definite by construction")


def _simulate_scan(template, delta, log_amp, site, rng, p: ModelParams) -> tuple[np.ndarray, bool]:
    """One raw scan (T, N) float32 at the site's native TR and length."""
    factor, renormalised = _subject_factor(template, delta, rng, p)
    n = len(template.net_index)
    signal = _coloured_noise(rng, site["length"], n, site["tr"], p) @ factor.T.astype(np.float32)
    unit = template.baseline * template.psc * p.psc / 100 * np.sqrt(site.get("variance_scale", 1.0))
    amp = unit * np.exp(rng.normal(0, p.amplitude_sd) + log_amp[template.net_index])
    noise_sd = unit * np.sqrt(p.white_fraction / (1 - p.white_fraction))  # scanner noise ignores neural amplitude
    noise = rng.standard_normal(signal.shape, dtype=np.float32) * noise_sd.astype(np.float32)
    baseline = template.baseline * np.exp(rng.normal(0, 0.05))
    return (baseline + signal * amp + noise).astype(np.float32), renormalised


def scan_features(x: np.ndarray, net_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Measured features of a raw scan ``x`` (T, N): network-pair mean Fisher-z FC (K, K) and log network
    amplitude (percent signal change) relative to the whole brain (K,)."""
    x = np.asarray(x, dtype=np.float64)
    z = np.arctanh(np.clip(np.corrcoef(x, rowvar=False), -0.999, 0.999))
    fc = _block_means(z, net_index)
    onehot = np.eye(net_index.max() + 1)[net_index]
    log_psc = np.log(x.std(0) / x.mean(0))
    return fc, onehot.T @ log_psc / onehot.sum(0) - log_psc.mean()


def _write_scan(path: Path, x: np.ndarray, fmt: str, names: list[str]) -> None:
    if fmt == "npy":
        np.save(path, x)
    else:
        np.savetxt(path, x, fmt="%.3f", delimiter="," if fmt == "csv" else "\t",
                   header=("," if fmt == "csv" else "\t").join(names), comments="")


# ------------------------------------------------------------------------------------------------- oracle
def _site_centred(values: np.ndarray, site: np.ndarray) -> np.ndarray:
    """Features minus their site mean: the oracle knows the site table, so site offsets are not signal."""
    out = values.astype(float).copy()
    for s in np.unique(site):
        out[site == s] -= np.nanmean(values[site == s])
    return out


def _oracle(effects: list[dict], code: np.ndarray, fc, amp, site, binary: bool, rng) -> dict:
    """Score each scan by its planted features weighted by the preset's effect sizes (unscaled, so the weights
    exist at effect_scale 0), then evaluate on half the subjects: a threshold fitted on the other half
    (accuracy) or the score's Pearson r with the target."""
    score = np.zeros(len(code))
    for effect in effects:
        feature = _site_centred(_project(effect["pattern"], fc, amp), site)
        score += effect["size"] * feature / max(np.var(feature), 1e-12)  # weight = d' per feature
    order = rng.permutation(len(code))
    fit, held = order[: len(code) // 2], order[len(code) // 2 :]
    result = {"metric": "accuracy" if binary else "pearson_r", "value": None, "n_fit": len(fit), "n_eval": len(held)}
    label = code > 0
    result["chance"] = float(max(label[held].mean(), 1 - label[held].mean())) if binary else 0.0
    if len(code) < 8 or np.std(code[fit]) == 0 or np.std(code[held]) == 0:
        return result  # too few subjects, or one class only: no score
    if not binary:
        return {**result, "value": float(np.corrcoef(score[held], code[held])[0, 1])}
    cuts = np.concatenate([[-np.inf], np.sort(score[fit])])
    accuracy = ((score[fit][None, :] > cuts[:, None]) == label[fit]).mean(1)
    best = cuts[int(np.argmax(accuracy))]
    return {**result, "value": float(((score[held] > best) == label[held]).mean()), "threshold": float(best)}


def _effect_record(effect: dict, run: "_Run", feature: np.ndarray, code: np.ndarray) -> dict:
    """A planted effect as documented in simulation.json, with its slope measured on the scans."""
    target, t = effect["target"], run.spec["targets"].get(effect["target"], {})
    per = {"sex": "female minus male", "age": "per decade of age"}.get(target) or (
        f"{t['positive']} minus {t['negative']}" if t.get("type") == "binary" else f"per SD of {target}")
    what = "log signal amplitude" if effect["kind"] == "amplitude" else "Pearson r of the noise-free signal"
    size = effect["size"] * run.scale
    ok = np.isfinite(feature)
    slope = float(np.cov(feature[ok], code[ok])[0, 1] / np.var(code[ok], ddof=1)) if np.var(code[ok]) > 0 else None
    return {**{k: v for k, v in effect.items() if k != "pattern"}, "applied_size": size, "units": f"{what}, {per}",
            "direction": "increase" if size > 0 else "decrease" if size < 0 else "none", "measured_slope": slope}


# ----------------------------------------------------------------------------------------------------- api
def _check_arguments(n_subjects, seed, fmt, effect_scale) -> None:
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 2:
        raise FmrilmError(f"n_subjects must be an integer >= 2, got {n_subjects!r}; pass e.g. --subjects 100")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise FmrilmError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. --seed 0")
    if fmt not in FORMATS:
        raise FmrilmError(f"unknown time-series format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not isinstance(effect_scale, (int, float)) or not np.isfinite(effect_scale) or effect_scale < 0:
        raise FmrilmError(f"effect_scale must be a finite number >= 0, got {effect_scale!r}; 1.0 is the preset size")


def simulate_cohort(
    preset: str,
    n_subjects: int,
    seed: int,
    out: str | os.PathLike,
    *,
    atlas: str = DEFAULT_ATLAS,
    fmt: str = "npy",
    effect_scale: float = 1.0,
    use_hcp_fc: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write a simulated cohort as a user would bring it, with the generative truth beside it.

    Parameters
    ----------
    preset
        A name from :func:`list_presets` (``ukb``, ``abcd``, ``hcp_aging``, ``adni``, ``adhd200``, ``abide2``)
        or a path to a preset JSON file.
    n_subjects
        Number of subjects (one scan each), an integer >= 2.
    seed
        Seed of everything random: the same seed gives byte-identical outputs.
    out
        Output directory; it appears complete or not at all, and an existing one is refused unless ``overwrite``.
    atlas
        Registry atlas whose ROIs are simulated (N = 450 for ``schaefer400_tian_s3``, 116 for
        ``schaefer100_tian_s1``).
    fmt
        ``npy`` (float32), ``csv`` or ``tsv`` (header row of ROI names).
    effect_scale
        Multiplies every planted phenotype effect; 0 gives a cohort without any.
    use_hcp_fc
        Seed the template with the real HCP group FC when its files are found.
    overwrite
        Replace an existing ``out``.

    Returns
    -------
    dict
        ``out`` (str), ``n_scans`` (int), ``oracle`` ({task: accuracy or Pearson r, None when too few subjects}).

    Notes
    -----
    Writes ``out/timeseries/<id>.<fmt>`` (T, N) per subject at the site's native TR and length,
    ``out/participants.tsv`` and ``out/simulation.json`` (sites, planted effects, oracle scores).
    """
    spec = load_preset(preset)
    _check_arguments(n_subjects, seed, fmt, effect_scale)
    check_output_dir(out, overwrite)  # refuse before any work
    params = ModelParams(**spec.get("model", {}))
    template = build_template(atlas, bool(use_hcp_fc), params.global_removal, params.eigen_floor)
    effects = [{**e, "pattern": _pattern(e, template.networks)} for e in spec["effects"]]
    run = _Run(spec, template, effects, params, float(effect_scale), int(seed), fmt, atlas)
    table, codes, site = _sample_participants(spec, int(n_subjects), np.random.default_rng(run.seed))
    with atomic_output_dir(out, overwrite) as tmp:
        fc, amp, n_renormalised = _write_scans(run, tmp, table, codes, site)
        table.to_csv(tmp / "participants.tsv", sep="\t", index=False)
        record = _record(run, table, codes, site, fc, amp, n_renormalised)
        write_json_atomic(tmp / "simulation.json", record)
    oracle = {task: r["value"] for task, r in record["oracle"].items()}
    return {"out": str(Path(out).absolute()), "n_scans": len(table), "oracle": oracle}


@dataclass(frozen=True)
class _Run:
    """Everything fixed for one simulate_cohort call."""

    spec: dict
    template: Template
    effects: list
    params: ModelParams
    scale: float
    seed: int
    fmt: str
    atlas: str


def _write_scans(run: _Run, tmp: Path, table: pd.DataFrame, codes: dict, site: np.ndarray):
    """Generate and write the scans one at a time; return features (S, K, K), (S, K) and the renormalised count."""
    (tmp / "timeseries").mkdir()
    names, k = list(run.template.rois["name"]), len(run.template.networks)
    fc, amp, n_renormalised = [], [], 0
    for i, pid in enumerate(table["participant_id"]):
        rng = np.random.default_rng([run.seed, i + 1])  # one stream per subject
        s = run.spec["sites"][site[i]]
        delta, log_amp = _subject_delta(rng, run.effects, codes, i, s, run.params, k, run.scale)
        x, renormalised = _simulate_scan(run.template, delta, log_amp, s, rng, run.params)
        _write_scan(tmp / "timeseries" / f"{pid[4:]}.{run.fmt}", x, run.fmt, names)
        n_renormalised += renormalised
        f, a = scan_features(x, run.template.net_index)
        fc.append(f)
        amp.append(a)
    return np.array(fc), np.array(amp), n_renormalised


def _record(run: _Run, table, codes, site, fc, amp, n_renormalised) -> dict:
    """The content of simulation.json: settings, site table, planted effects (with measured slopes), oracle."""
    spec, rng = run.spec, np.random.default_rng([run.seed, 0])
    sites = [{**s, "length_at_target_tr": int(s["length"] * s["tr"] / TARGET_TR),
              "n_subjects": int(np.sum(site == i))} for i, s in enumerate(spec["sites"])]
    effects = [_effect_record(e, run, _site_centred(_project(e["pattern"], fc, amp), site), codes[e["target"]])
               for e in run.effects]
    oracle = {}
    for task in spec["tasks"]:
        binary = task == "sex" or spec["targets"].get(task, {}).get("type") == "binary"
        task_effects = [e for e in run.effects if e["target"] == task]
        oracle[task] = _oracle(task_effects, codes[task], fc, amp, site, binary, rng)
    return {"preset": spec["name"], "description": spec.get("description", ""), "dataset": spec["dataset"],
            "seed": run.seed, "atlas": run.atlas, "n_rois": len(run.template.rois), "n_subjects": len(table),
            "format": run.fmt, "effect_scale": run.scale, "template": run.template.source,
            "networks": list(run.template.networks), "model": dataclasses.asdict(run.params),
            "target_tr": TARGET_TR, "sites": sites, "age": spec["age"], "female_fraction": spec["female_fraction"],
            "targets": spec["targets"], "tasks": spec["tasks"], "effects": effects, "oracle": oracle,
            "n_renormalised": int(n_renormalised)}
