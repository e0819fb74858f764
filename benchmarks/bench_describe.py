"""Benchmark ``fmrilm describe`` per-scan speed against a pipeline built the authors' way.

Usage::

    .venv/bin/python benchmarks/bench_describe.py [--scans 40] [--atlas schaefer400_tian_s3]

Both run in this one process on the same standardized scans (450 ROIs x 160 points by default):

* ours: :meth:`DescriptorReference.measure` - FC, gradients (BrainSpace-identical), group-ICA measures and
  weighted graph measures (one FC per scan, vectorised, numpy Louvain);
* authors' way: numpy FC and a Python loop over network pairs, BrainSpace ``GradientMaps`` with Procrustes
  alignment, networkx threshold graph + Louvain + modularity + (unweighted) global efficiency + clustering,
  no ICA (their pipeline's ICA inputs were private).

Prints a markdown table with scans/s for each and the ratio. The authors' way needs brainspace and networkx
(setup.sh installs brainspace without its plotting dependencies).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def _cohort(n_scans: int, atlas: str, workdir: Path):
    from fmrilm.data.ingest import prepare_from_args
    from fmrilm.cli import build_parser
    from fmrilm.data.simulate import simulate_cohort

    simulate_cohort("ukb", n_scans, 0, workdir / "raw", atlas=atlas, overwrite=True)
    args = build_parser().parse_args(["prepare", "--timeseries", str(workdir / "raw" / "timeseries"), "--phenotypes",
                                      str(workdir / "raw" / "participants.tsv"), "--atlas", atlas, "--out", str(workdir / "cohort")])
    return prepare_from_args(args)


def authors_way(x: np.ndarray, networks: np.ndarray, group_gradients: np.ndarray) -> dict:
    import networkx as nx
    from brainspace.gradient import GradientMaps

    fc = np.corrcoef(x.T)
    values = {}
    names = sorted(set(networks))
    for i, a in enumerate(names):
        for b in names[i:]:
            block = fc[np.ix_(networks == a, networks == b)]
            values[f"fc.{a}.{b}"] = float(np.mean(np.arctanh(np.clip(block, -0.999999, 0.999999))))
    gm = GradientMaps(n_components=3, approach="dm", kernel="normalized_angle", alignment="procrustes", random_state=0)
    gm.fit(fc, reference=group_gradients[:, :3])
    values["fg.g1.range"] = float(np.ptp(gm.aligned_[:, 0]))
    w = np.abs(fc)
    np.fill_diagonal(w, 0)
    cut = np.quantile(w[np.triu_indices_from(w, 1)], 0.9)
    graph = nx.from_numpy_array(np.where(w >= cut, w, 0))
    communities = nx.community.louvain_communities(graph, weight="weight", seed=0)
    values["graph.modularity"] = nx.community.modularity(graph, communities, weight="weight")
    values["graph.global_efficiency"] = nx.global_efficiency(graph)
    values["graph.clustering"] = nx.average_clustering(graph, weight="weight")
    return values


def _rate(fn, scans) -> float:
    start = time.perf_counter()
    for x in scans:
        fn(x)
    return len(scans) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=40)
    parser.add_argument("--atlas", default="schaefer400_tian_s3")
    args = parser.parse_args()
    from fmrilm.descriptors.reference import DescriptorReference

    with tempfile.TemporaryDirectory() as tmp:
        cohort = _cohort(args.scans, args.atlas, Path(tmp))
        reference = DescriptorReference().fit_models(cohort, np.arange(len(cohort)))
        scans = [cohort.scan(i) for i in range(len(cohort))]
        networks = cohort.rois["network"].to_numpy()
        ours = _rate(reference.measure, scans)
        theirs = _rate(lambda x: authors_way(x, networks, reference.group_gradients_), scans)
    n = scans[0].shape[1]
    print(f"| pipeline ({n} ROIs x {scans[0].shape[0]} points, {len(scans)} scans, 1 process) | scans/s |")
    print("|---|---|")
    print(f"| fmrilm describe measures (FC, gradients, ICA, weighted graph) | {ours:.2f} |")
    print(f"| authors' way (numpy FC, BrainSpace, networkx; no ICA) | {theirs:.2f} |")
    print(f"| ratio | {ours / theirs:.1f}x |")


if __name__ == "__main__":
    main()
