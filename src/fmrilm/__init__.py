"""fMRI-LM: resting-state fMRI and language in one model."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fmrilm")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from fmrilm.data.cohort import Cohort, load_cohort  # noqa: E402

__all__ = ["Cohort", "load_cohort", "__version__"]
