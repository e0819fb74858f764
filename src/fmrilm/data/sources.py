"""What ingestion hands to preparation: one :class:`ScanSource` per scan, however the user stored it.

Readers for each input kind (ROI time-series files, 4D NIfTI, BIDS derivatives) only find scans and say how
to load them; :mod:`fmrilm.data.prepare` validates, preprocesses and stores them one at a time, so memory
never holds more than one scan.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from fmrilm.errors import FmrilmError

_UNSAFE_ID = re.compile(r"[/\\\x00-\x1f\x7f]")  # path separators and control characters


@dataclass
class ScanSource:
    """One scan to ingest.

    Attributes
    ----------
    scan_id
        Unique identifier of the scan in the cohort (file stem, or BIDS entities).
    subject_id
        Subject identifier without any ``sub-`` prefix; links the scan to the phenotype table.
    path
        The file the scan comes from (reported in errors and stored in the scan table).
    load
        Returns the native time series, shape (T, N), time along rows, any float dtype.
    tr
        Native repetition time in seconds, or None when it must come from ``--tr`` or a table.
    extra
        Further per-scan columns for the scan table (session, run, site, dataset...).
    """

    scan_id: str
    subject_id: str
    path: Path
    load: Callable[[], np.ndarray]
    tr: float | None = None
    extra: dict = field(default_factory=dict)


def check_identifier(value: str, what: str) -> str:
    """Return ``value`` if it is safe as a subject or scan id, else refuse it in one line starting with ``what``.

    Ids travel to tables, texts and, in tools built on fmrilm, file names: an empty id, ``.``/``..``, a path
    separator or a control character could address another file (path traversal), so they are refused.
    """
    text = str(value)
    if text.strip() in ("", ".", "..") or _UNSAFE_ID.search(text):
        raise FmrilmError(f"{what}: id {text!r} is empty, '.'/'..' or holds a path separator or control character; "
                          "use letters, digits, '-' and '_'")
    return text
