"""Functional gradients: diffusion-map embedding of FC, aligned to the reference cohort's group gradients.

Measures
--------
Each scan's FC is embedded with :func:`diffusion_gradients` (``k`` components, as many as the reference
gradients have, by default 10) and Procrustes-rotated onto the group gradients (:func:`procrustes_align`);
the measures use the first three aligned components G1, G2, G3 (columns of the (N, k) embedding ``g``).
Unit: gradient score, the dimensionless diffusion-map coordinate (eigenvector scaled by its multiscale
eigenvalue, below), squared for variances.

``fg.g1.<net>``, ``fg.g2.<net>``, ``fg.g3.<net>``
    Mean over the network's ROIs of the aligned gradient: ``mean_{i in net} g[i, c]``.
``fg.g1.range``, ``fg.g2.range``, ``fg.g3.range``
    Spread of the gradient over all ROIs: ``max_i g[i, c] - min_i g[i, c]``.
``fg.g1.variance``, ``fg.g2.variance``, ``fg.g3.variance``
    Population variance over ROIs: ``mean_i (g[i, c] - mean_j g[j, c])**2`` (ddof 0).
``fg.variance``
    Total variance of the 3-D embedding, ``fg.g1.variance + fg.g2.variance + fg.g3.variance`` = the mean
    squared distance of the ROIs from their centroid in (G1, G2, G3) space: a whole-brain analogue of the
    within-network gradient dispersion of Bethlehem et al. (2020).

Reference matched: BrainSpace 0.3.0 (Vos de Wael et al. 2020) ``GradientMaps(approach="dm",
kernel="normalized_angle").fit(fc, sparsity=0.9)`` for the embedding and ``ProcrustesAlignment`` for the
alignment: identical to the last bit on the test inputs (asserted to 1e-10). The embedding steps, in
BrainSpace's order:

1. keep, in each row of FC, its ``int(N * (1 - sparsity))`` largest values and zero the rest (row-wise,
   so the result is not symmetric; at sparsity 0.9 and N = 450 floating point makes that 44 values);
2. affinity = kernel between the sparsified rows, ``1 - arccos(cosine) / pi`` for "normalized_angle";
   negative affinities are set to 0. The kernel is applied here, once: pass FC, never an affinity;
3. anisotropic normalisation ``W = D^-alpha A D^-alpha`` (D = row sums of A), then the diffusion
   operator ``P = D_W^-1 W``;
4. the ``k + 1`` eigenpairs of P of largest magnitude; each eigenvector is divided by the first (trivial)
   one, eigenvalues by the first, and the trivial pair is dropped;
5. multiscale diffusion map (diffusion time 0): ``lambda -> lambda / (1 - lambda)``; each eigenvector is
   multiplied by its scaled eigenvalue and flipped so that its largest-magnitude entry is positive.

Step 4 runs ARPACK's *symmetric* Lanczos solver on the non-symmetric P with BrainSpace's start vector
(``RandomState(random_state).uniform(-1, 1, N)``), like BrainSpace. Its eigenvectors are therefore not exact:
on realistic FC the residual ``|P v - mu v|`` is ~1e-4 and G1-G3 differ from the exact eigenvectors by
~0.3-1 % of their range (more for nearly degenerate later gradients). ``solver="dense"`` gives the exact
decomposition (via the symmetric ``D_W^-1/2 W D_W^-1/2``); the default reproduces BrainSpace and is faster.

Constant ROIs (NaN rows/columns of FC) get correlation 0 with every other ROI and 1 with themselves, so
their affinity to every ROI is the kernel of orthogonal rows (0.5 for "normalized_angle") and the
embedding stays finite.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.linalg import eigh
from scipy.sparse.csgraph import connected_components
from scipy.sparse.linalg import eigsh
from sklearn.metrics.pairwise import cosine_similarity
from sklearn.utils import check_random_state

from fmrilm.descriptors.common import column
from fmrilm.descriptors.fc import check_inputs
from fmrilm.errors import FmrilmError, FmrilmWarning

KERNELS = ("normalized_angle", "cosine", "pearson")
SOLVERS = ("arpack", "dense")
N_MEASURED = 3  # gradients G1..G3 are described


def clean_fc(fc: np.ndarray) -> np.ndarray:
    """FC with NaN entries (constant ROIs) set to 0 and a NaN diagonal set to 1, as float64 (N, N)."""
    fc = np.array(fc, dtype=np.float64)
    if fc.ndim != 2 or fc.shape[0] != fc.shape[1]:
        raise FmrilmError(f"the FC matrix has shape {fc.shape}; pass the square (N, N) correlation of the scan's ROIs")
    diagonal = np.isnan(np.diag(fc))
    fc[np.isnan(fc)] = 0.0
    fc[diagonal, diagonal] = 1.0
    if not np.isfinite(fc).all():
        raise FmrilmError("the FC matrix holds infinite values; pass Pearson correlations in [-1, 1]")
    return fc


def affinity(fc: np.ndarray, sparsity: float = 0.9, kernel: str = "normalized_angle") -> np.ndarray:
    """Row-wise sparsified FC turned into a non-negative affinity (steps 1-2 of the module docstring).

    Parameters
    ----------
    fc : (N, N) array
        Cleaned FC (:func:`clean_fc`).
    sparsity : float
        Proportion of each row's smallest values set to 0 before the kernel; 0 keeps every value.
    kernel : {"normalized_angle", "cosine", "pearson"}
        Similarity between the sparsified rows.

    Returns
    -------
    (N, N) float64 array
    """
    if not 0 <= sparsity < 1:
        raise FmrilmError(f"gradient sparsity {sparsity} must be in [0, 1), e.g. 0.9 to keep each row's top 10 %")
    if kernel not in KERNELS:
        raise FmrilmError(f"gradient kernel {kernel!r} is unknown; use one of {', '.join(KERNELS)}")
    n = fc.shape[1]
    if sparsity > 0:
        keep = int(n * (1 - sparsity))  # BrainSpace's exact expression (float rounding included)
        if keep < 1:
            raise FmrilmError(f"gradient sparsity {sparsity} keeps no value of {n} ROIs; lower it below {1 - 1 / n:.3f}")
        # argpartition exactly as BrainSpace's dominant_set so ties keep the same entries.
        top = np.argpartition(fc, n - keep, axis=1)[:, -keep:]
        rows = np.arange(n)[:, None]
        sparse = np.zeros_like(fc)
        sparse[rows, top] = fc[rows, top]
        fc = sparse
    if kernel == "pearson":
        a = np.corrcoef(fc)
    else:
        a = cosine_similarity(fc)
        if kernel == "normalized_angle":
            a = 1 - np.arccos(np.clip(a, -1.0, 1.0)) / np.pi
    a[a < 0] = 0
    return a


def _diffusion_operator(a: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(P = D_W^-1 W, row sums of W) for W = D^-alpha A D^-alpha, with BrainSpace's operation order."""
    if not np.allclose(a, a.T, atol=1e-10):
        a = 0.5 * (a + a.T)
    w = a.copy()
    if alpha > 0:
        d = np.power(w.sum(axis=1, keepdims=True), -alpha)
        w *= d.T
        w *= d
    degree = w.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = w * np.power(degree, -1)
    if not np.isfinite(p).all():
        raise FmrilmError("an ROI has zero affinity to every ROI; use the 'normalized_angle' kernel or lower sparsity")
    n_groups = connected_components(w != 0, directed=False)[0]
    if n_groups > 1:  # BrainSpace warns too; "normalized_angle" is 0 only between exactly opposite rows
        warnings.warn(f"the affinity splits into {n_groups} disconnected groups of ROIs; the first gradients will "
                      "separate them (use the 'normalized_angle' kernel or lower sparsity)", FmrilmWarning, stacklevel=3)
    return p, degree[:, 0]


def _top_eigenpairs(p: np.ndarray, degree: np.ndarray, n: int, solver: str, random_state) -> tuple[np.ndarray, np.ndarray]:
    """The n eigenpairs of P of largest eigenvalue, descending: (values (n,), vectors (N, n))."""
    if solver == "arpack":
        v0 = check_random_state(random_state).uniform(-1, 1, p.shape[0])
        w, v = eigsh(p, k=n, which="LM", tol=0, v0=v0)
        return w[::-1], v[:, ::-1]
    # P = D^-1 W is similar to S = D^-1/2 W D^-1/2 (symmetric): P's right eigenvectors are D^-1/2 u.
    root = np.sqrt(degree)
    s = p * root[:, None] / root[None, :]
    s = 0.5 * (s + s.T)
    w, u = eigh(s, subset_by_index=[len(s) - n, len(s) - 1])
    return w[::-1], u[:, ::-1] / root[:, None]


def diffusion_gradients(
    fc: np.ndarray, n_components: int = 3, sparsity: float = 0.9, alpha: float = 0.5,
    kernel: str = "normalized_angle", random_state: int | None = 0, solver: str = "arpack",
) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion-map gradients of one FC matrix, equal to BrainSpace's ``GradientMaps(approach="dm")``.

    Parameters
    ----------
    fc : (N, N) array
        Pearson FC (NaN rows/columns for constant ROIs are allowed, see the module docstring). Not an
        affinity: the kernel is applied here.
    n_components : int
        Number of gradients k, ``1 <= k <= N - 2``.
    sparsity, kernel
        See :func:`affinity`.
    alpha : float
        Anisotropic diffusion parameter in [0, 1] (0.5: Fokker-Planck diffusion).
    random_state : int or None
        Seed of ARPACK's start vector (BrainSpace's ``random_state``).
    solver : {"arpack", "dense"}
        "arpack" reproduces BrainSpace; "dense" is the exact eigendecomposition (module docstring).

    Returns
    -------
    gradients : (N, k) float64 array
        BrainSpace's ``gradients_``.
    lambdas : (k,) float64 array
        Multiscale eigenvalues ``lambda / (1 - lambda)``, descending (BrainSpace's ``lambdas_``).
    """
    fc = clean_fc(fc)
    n = fc.shape[0]
    if not 1 <= n_components <= n - 2:
        raise FmrilmError(f"{n_components} gradients of {n} ROIs: n_components must be in [1, {n - 2}] (N - 2)")
    if not 0 <= alpha <= 1 or solver not in SOLVERS:
        raise FmrilmError(f"gradient alpha {alpha} / solver {solver!r}: alpha must be in [0, 1], solver one of {SOLVERS}")
    p, degree = _diffusion_operator(affinity(fc, sparsity, kernel), alpha)
    w, v = _top_eigenpairs(p, degree, n_components + 1, solver, random_state)
    v = v / v[:, [0]]  # the trivial eigenvector becomes all ones, fixing every vector's scale
    w = w / w[0]
    w, v = w[1:], v[:, 1:]
    w = w / (1 - w)  # multiscale diffusion map: sum over all diffusion times t >= 1
    v = v * w[None, :]
    v *= np.sign(v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])])
    return v, w


def procrustes_align(g: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Rotate (and reflect) an embedding onto a reference: ``g @ U V^T`` with ``U S V^T = svd(g^T reference)``.

    ``U V^T`` is the orthogonal matrix minimising ``||g R - reference||_F``, as in BrainSpace's
    ``procrustes`` (no centring, no scaling; ``GradientMaps(alignment="procrustes").fit(fc, reference=...)``
    with one matrix). It may reorder and flip components.

    Parameters
    ----------
    g, reference : (N, k) arrays
        Embedding to rotate and the target embedding.

    Returns
    -------
    (N, k) float64 array
    """
    g, reference = np.asarray(g, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if g.ndim != 2 or g.shape != reference.shape:
        raise FmrilmError(
            f"gradients of shape {g.shape} cannot be aligned to reference gradients of shape {reference.shape}; "
            "compute them on the reference's atlas with the reference's number of components"
        )
    u, _, vt = np.linalg.svd(g.T @ reference)
    return g @ (u @ vt)


def group_gradients(mean_fc: np.ndarray, n_components: int = 10, sparsity: float = 0.9, alpha: float = 0.5,
                    kernel: str = "normalized_angle", random_state: int | None = 0) -> np.ndarray:
    """Gradients of the reference cohort's group-average FC: (N, k) with ``k = min(n_components, N - 2)``.

    Ten components (not three) are kept so that each scan's first three gradients can be rotated onto the
    group's even when they come out in another order or mixed with a later gradient. Needs ``N >= 5`` ROIs.
    """
    n = np.shape(mean_fc)[0]
    k = min(n_components, n - 2)
    if k < N_MEASURED:
        raise FmrilmError(f"{n} ROIs give {max(k, 0)} gradients but {N_MEASURED} are described; use an atlas with >= 5 ROIs")
    return diffusion_gradients(mean_fc, k, sparsity, alpha, kernel, random_state)[0]


def gradient_measures(fc: np.ndarray, reference_gradients: np.ndarray, network_index: np.ndarray,
                      names: list[str], **kwargs) -> dict[str, float]:
    """Gradient descriptors of one scan (see the module docstring).

    Parameters
    ----------
    fc : (N, N) array
        The scan's Pearson FC (NaN rows/columns for constant ROIs).
    reference_gradients : (N, k) array
        :func:`group_gradients` of the reference cohort, k >= 3; the scan gets k gradients too.
    network_index : (N,) int array
        Index into ``names`` of each ROI's network.
    names : list of str
        Network names.
    **kwargs
        ``sparsity``, ``alpha``, ``kernel``, ``random_state``, ``solver`` of :func:`diffusion_gradients`
        (use the reference's).

    Returns
    -------
    dict
        ``fg.g{1,2,3}.<net>`` for every network of ``names`` (NaN for a network without ROIs),
        ``fg.g{1,2,3}.range``, ``fg.g{1,2,3}.variance`` and ``fg.variance``.
    """
    fc, network_index = check_inputs(fc, network_index, names)
    reference = np.asarray(reference_gradients, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[1] < N_MEASURED:
        raise FmrilmError(f"reference gradients of shape {reference.shape} need >= {N_MEASURED} columns; refit the reference")
    g = diffusion_gradients(fc, reference.shape[1], **kwargs)[0]
    g = procrustes_align(g, reference)[:, :N_MEASURED]
    counts = np.bincount(network_index, minlength=len(names)).astype(np.float64)
    sums = np.zeros((len(names), N_MEASURED))
    np.add.at(sums, network_index, g)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    values: dict[str, float] = {}
    variances = g.var(axis=0)
    for c in range(N_MEASURED):
        values.update({column("fg", f"g{c + 1}", name): float(means[k, c]) for k, name in enumerate(names)})
        values[f"fg.g{c + 1}.range"] = float(g[:, c].max() - g[:, c].min())
        values[f"fg.g{c + 1}.variance"] = float(variances[c])
    values["fg.variance"] = float(variances.sum())
    return values
