"""The HTML report of a run (``fmrilm report DIR``) and the generated CLI reference (``docs/cli.md``)."""

from fmrilm.report.html import build_report

__all__ = ["build_report"]
