"""Subcommands of ``fmrilm`` that live outside :mod:`fmrilm.cli`, one module per area.

Each module listed in :data:`MODULES` defines ``register(sub)``, which adds its subparsers (each with
``set_defaults(func=...)``) to the ``fmrilm`` parser; :func:`fmrilm.cli.build_parser` calls them in this order.
A handler is a thin call into the library and reports user errors by raising :class:`fmrilm.errors.FmrilmError`.
"""

MODULES = (
    "fmrilm.commands.instruct",   # fmrilm instruct
    "fmrilm.commands.evaluate",   # fmrilm evaluate
    "fmrilm.commands.ask",        # fmrilm ask
    "fmrilm.commands.benchmark",  # fmrilm benchmark
    "fmrilm.commands.run",        # fmrilm run, fmrilm report
)
