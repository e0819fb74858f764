"""The CLI reference ``docs/cli.md``, generated from :func:`fmrilm.cli.build_parser` so it cannot drift.

Regenerate after changing any subcommand::

    .venv/bin/python -m fmrilm.report.cli_docs            # writes docs/cli.md of this checkout
    .venv/bin/python -m fmrilm.report.cli_docs OUT.md     # anywhere else

The text is built from each argparse action's attributes (names, metavar, default, choices, help), not from
argparse's own help formatter, so it does not change with the terminal width or the Python version.
A test (tests/test_docs.py) fails when the committed file differs from what the parser gives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = """# Command-line reference

Generated from the parser by `.venv/bin/python -m fmrilm.report.cli_docs`; do not edit by hand.
`fmrilm COMMAND --help` prints the same options. Errors in the input print one line (`fmrilm: error: ...`)
and exit with code 2.
"""


def _subcommands(parser: argparse.ArgumentParser) -> tuple[dict[str, argparse.ArgumentParser], dict[str, str]]:
    """({name: subparser}, {name: one-line help}) in registration order."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return dict(action.choices), helps


def _value(action: argparse.Action) -> str:
    """The placeholder an option takes (``DIR``, ``{a,b}``, ``N [N ...]``), empty for flags."""
    if action.nargs == 0:
        return ""
    name = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())
    if action.nargs in ("+", "*"):
        return f"{name} [{name} ...]" if action.nargs == "+" else f"[{name} ...]"
    return f"[{name}]" if action.nargs == "?" else name


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS) or action.required:
        return ""
    return f"`{action.default}`"


def _cell(text: str) -> str:
    """Text safe inside a Markdown table: no pipes, no newlines, no angle brackets read as HTML tags."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _synopsis(name: str, parser: argparse.ArgumentParser) -> str:
    parts = [f"fmrilm {name}"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            parts.append(_value(action))
        elif action.required:
            parts.append(f"{action.option_strings[-1]} {_value(action)}".strip())
    groups = [g for g in parser._mutually_exclusive_groups if g.required]
    for group in groups:
        parts.append("(" + " | ".join(f"{a.option_strings[-1]} {_value(a)}".strip() for a in group._group_actions) + ")")
    return " ".join(parts) + " [options]"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """Markdown table rows of every argument but --help."""
    rows = ["| argument | value | default | description |", "|---|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}` (positional)"
        value = _value(action) if action.option_strings else ""
        text = (action.help or "") + (" (required)" if action.required and action.option_strings else "")
        rows.append(f"| {names} | {_cell(f'`{value}`' if value else '')} | {_cell(_default(action))} | {_cell(text)} |")
    return rows


def cli_markdown(parser: argparse.ArgumentParser | None = None) -> str:
    """The text of docs/cli.md for ``parser`` (default: the ``fmrilm`` parser)."""
    if parser is None:
        from fmrilm.cli import build_parser

        parser = build_parser()
    commands, helps = _subcommands(parser)
    lines = [HEADER, "| command | what it does |", "|---|---|"]
    lines += [f"| [`{name}`](#fmrilm-{name}) | {_cell(helps.get(name, ''))} |" for name in commands]
    for name, sub in commands.items():
        lines += ["", f"## fmrilm {name}", "", _cell(helps.get(name, "")), "", "```", _synopsis(name, sub), "```", "",
                  *_options(sub)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write the reference to the given path (default: docs/cli.md of the checkout holding this package)."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path(__file__).resolve().parents[3] / "docs" / "cli.md"
    out.write_text(cli_markdown())
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
