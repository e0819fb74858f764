"""User-facing errors and warnings.

Every problem a user can cause (a bad file, a wrong option) raises :class:`FmrilmError` with one line that
names the offending file or value and says how to fix it. The CLI prints that line and exits with code 2;
anything else escaping is a bug in fmrilm.
"""

from __future__ import annotations


class FmrilmError(ValueError):
    """A problem with the user's input or configuration, explained in one line."""

    exit_code = 2


class FmrilmWarning(UserWarning):
    """Something worth knowing about the input that does not stop the run (counts of unmatched subjects...)."""
