"""The reference cohort every scan is described against.

:class:`DescriptorReference` is fitted on the training scans of a cohort: the group-average FC and its
diffusion-map gradients (each scan's gradients are Procrustes-aligned to them), the group ICA model, and
the mean and SD of every raw measure. It then measures new scans and turns raw values into z-scores on
the same scale. ``save_pretrained`` writes ``config.json`` + ``arrays.safetensors`` (no pickle);
``from_pretrained`` loads them, so a new dataset can be described on an existing reference.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
import numpy as np
import pandas as pd

from fmrilm.data.cohort import Cohort
from fmrilm.descriptors import fc, gradients, graph, ica
from fmrilm.descriptors.common import correlation, network_labels
from fmrilm.errors import FmrilmError
from fmrilm.io import write_json_atomic

CONFIG_FILE = "config.json"
ARRAYS_FILE = "arrays.safetensors"


@dataclass
class DescribeConfig:
    """Settings of the descriptor measures; saved with every reference."""

    density: float = 0.10  # proportion of strongest |FC| edges kept for the graph measures
    gradient_sparsity: float = 0.9  # row-wise sparsity before the affinity kernel (BrainSpace default)
    gradient_alpha: float = 0.5  # diffusion-map anisotropic diffusion parameter (BrainSpace default)
    ica_components: int = 20  # group ICA components
    ica_max_scans: int = 500  # at most this many training scans are concatenated for the ICA fit (memory bound)
    top_k: int = 3  # most elevated / reduced network pairs named in the text
    seed: int = 0  # Louvain, ICA and template choice

    def __post_init__(self) -> None:
        if not 0 < self.density <= 1:
            raise FmrilmError(f"density {self.density} must be in (0, 1], e.g. 0.1 for the top 10 % of edges")
        if not 0 <= self.gradient_sparsity < 1:
            raise FmrilmError(f"gradient_sparsity {self.gradient_sparsity} must be in [0, 1)")
        if int(self.ica_components) < 2 or int(self.ica_max_scans) < 1 or int(self.top_k) < 1:
            raise FmrilmError("ica_components must be >= 2, ica_max_scans >= 1 and top_k >= 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DescribeConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise FmrilmError(f"unknown describe settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


class DescriptorReference:
    """Group models and per-measure statistics fitted on a reference cohort (see module docstring)."""

    def __init__(self, config: DescribeConfig | None = None):
        self.config = config or DescribeConfig()

    # -- fitting -------------------------------------------------------------------------------------
    def fit_models(self, cohort: Cohort, indices: np.ndarray) -> "DescriptorReference":
        """Fit the group gradients and group ICA on the training scans ``indices`` of ``cohort``.

        The group FC is a running mean over every training scan (memory does not grow with their number);
        the ICA sees at most ``ica_max_scans`` of them, evenly spaced.
        """
        indices = np.asarray(indices)
        if len(indices) < self.config.ica_components:
            raise FmrilmError(
                f"{len(indices)} training scans but {self.config.ica_components} ICA components; "
                "use more scans or lower --ica-components"
            )
        self.atlas_, self.tr_ = cohort.meta["atlas"], float(cohort.meta["tr"])
        self.rois_ = cohort.rois.reset_index(drop=True)
        self.names_, self.network_index_ = network_labels(self.rois_)
        total = np.zeros((len(self.rois_),) * 2)
        for index in indices:
            total += np.nan_to_num(correlation(cohort.scan(index)))
        self.group_fc_ = total / len(indices)
        self.group_gradients_ = gradients.group_gradients(
            self.group_fc_, sparsity=self.config.gradient_sparsity, alpha=self.config.gradient_alpha,
            random_state=self.config.seed,
        )
        self.ica_ = ica.GroupICA(self.config.ica_components, self.config.ica_max_scans, self.config.seed)
        subset = indices[np.linspace(0, len(indices) - 1, min(len(indices), self.config.ica_max_scans)).astype(int)]
        self.ica_.fit((cohort.scan(i) for i in subset), self.network_index_, self.names_)
        return self

    def fit_statistics(self, raw: pd.DataFrame) -> "DescriptorReference":
        """Store the mean and SD (ddof 1) of every measure column over the training scans' raw values."""
        if len(raw) < 2:
            raise FmrilmError(f"{len(raw)} training scans: z-scores need at least 2; add scans to the reference")
        self.columns_ = list(raw.columns)
        self.mean_ = raw.mean().to_numpy(dtype=np.float64)
        sd = raw.std(ddof=1).to_numpy(dtype=np.float64)
        self.sd_ = np.where(sd > 0, sd, np.nan)  # a measure constant over the reference has no z-score
        return self

    # -- use -----------------------------------------------------------------------------------------
    def measure(self, x: np.ndarray) -> dict[str, float]:
        """All raw measures of one standardized scan (T, N), keyed by descriptor column."""
        self._check_fitted("ica_")
        x = np.asarray(x, dtype=np.float64)
        r = correlation(x)
        values = fc.fc_measures(r, self.network_index_, self.names_)
        values.update(gradients.gradient_measures(
            r, self.group_gradients_, self.network_index_, self.names_,
            sparsity=self.config.gradient_sparsity, alpha=self.config.gradient_alpha, random_state=self.config.seed,
        ))
        values.update(ica.ica_measures(x, self.ica_, tr=self.tr_))
        values.update(graph.graph_measures(r, self.network_index_, self.names_, density=self.config.density, seed=self.config.seed))
        return values

    def zscore(self, raw: pd.DataFrame) -> pd.DataFrame:
        """z = (raw - reference mean) / reference SD, column by column (columns in the reference's order)."""
        self._check_fitted("mean_")
        missing = [c for c in self.columns_ if c not in raw.columns]
        if missing:
            raise FmrilmError(f"measures {missing[:3]} of the reference are missing; describe with the same atlas and settings")
        values = raw[self.columns_].to_numpy(dtype=np.float64)
        return pd.DataFrame((values - self.mean_) / self.sd_, columns=self.columns_, index=raw.index)

    def check_compatible(self, rois: pd.DataFrame, atlas: str) -> None:
        """Refuse describing scans of another atlas on this reference."""
        self._check_fitted("rois_")
        if len(rois) != len(self.rois_) or list(rois["name"]) != list(self.rois_["name"]):
            raise FmrilmError(
                f"the reference was built on atlas {self.atlas_!r} ({len(self.rois_)} ROIs) but the cohort uses "
                f"{atlas!r} ({len(rois)} ROIs); build a reference on this atlas or prepare the cohort with {self.atlas_!r}"
            )

    def _check_fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise FmrilmError("the descriptor reference is not fitted; fit it on a cohort or load one with --reference")

    # -- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``arrays.safetensors`` to ``directory`` (created if needed)."""
        from safetensors.numpy import save_file

        self._check_fitted("mean_")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        ica_config, ica_arrays = self.ica_.to_state()
        arrays = {
            "group_fc": self.group_fc_, "group_gradients": self.group_gradients_, "mean": self.mean_, "sd": self.sd_,
            **{f"ica.{k}": np.ascontiguousarray(v) for k, v in ica_arrays.items()},
        }
        tmp = directory / f".{ARRAYS_FILE}.tmp"
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}, str(tmp))
        tmp.replace(directory / ARRAYS_FILE)
        write_json_atomic(directory / CONFIG_FILE, {
            "format": "fmrilm.descriptor_reference/1", "config": self.config.to_dict(), "atlas": self.atlas_,
            "tr": self.tr_, "rois": self.rois_.to_dict(orient="list"), "columns": self.columns_, "ica": ica_config,
        })

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "DescriptorReference":
        """Load a reference written by :meth:`save_pretrained`."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / ARRAYS_FILE).is_file():
            raise FmrilmError(f"--reference {directory}: not a descriptor reference (needs {CONFIG_FILE} and {ARRAYS_FILE})")
        state = json.loads((directory / CONFIG_FILE).read_text())
        arrays = load_file(str(directory / ARRAYS_FILE))
        reference = cls(DescribeConfig.from_dict(state["config"]))
        reference.atlas_, reference.tr_ = state["atlas"], state["tr"]
        reference.rois_ = pd.DataFrame(state["rois"])
        reference.names_, reference.network_index_ = network_labels(reference.rois_)
        reference.group_fc_, reference.group_gradients_ = arrays["group_fc"], arrays["group_gradients"]
        reference.ica_ = ica.GroupICA.from_state(state["ica"], {k[4:]: v for k, v in arrays.items() if k.startswith("ica.")})
        reference.columns_, reference.mean_, reference.sd_ = state["columns"], arrays["mean"], arrays["sd"]
        return reference
