"""The `rayseg` command. Argument parsing only: each subcommand lives in its module as `register(subparsers)`.

A module's `register` adds its parser and sets `func(args) -> int`. UserError becomes one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rayseg.errors import UserError

# subcommand modules, in --help order
COMMANDS = ("pipeline", "synth", "train", "evaluate", "demo", "nightly", "report", "bench")


def build_parser() -> argparse.ArgumentParser:
    from rayseg import __version__

    parser = argparse.ArgumentParser(prog="rayseg", description="Segment image archives at cluster scale on Ray.")
    parser.add_argument("--version", action="version", version=f"rayseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rayseg.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"rayseg.{name}":  # a command not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rayseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rayseg {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
