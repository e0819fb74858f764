"""``fmrilm ask``: not yet available."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to the ``fmrilm`` parser (none yet)."""
