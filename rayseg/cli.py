"""The `rayseg` command. Argument parsing only: each subcommand lives in its module as `register(subparsers)`.

A module's `register` adds its parser and sets `func(args) -> int`. UserError becomes one line and exit 2,
EnvError one line and exit 1. In a terminal, the commands that run on Ray get the rayseg console
(console.Console: Ray's own lines go to a log file whose path is printed at the end); `--verbose` turns it off.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import NoReturn

from rayseg.errors import EnvError, UserError

# command -> the module that registers it, in --help order
COMMANDS = {"segment": "segment", "synth": "synth", "train": "train", "plan": "plan", "evaluate": "evaluate", "demo": "demo",
            "nightly": "nightly", "report": "report", "bench": "bench", "doctor": "doctor", "export": "export"}
RAY_COMMANDS = {"segment", "train", "plan", "evaluate", "demo", "nightly", "bench"}  # the ones that start or join Ray


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `command` only that subcommand's (so `rayseg synth` doesn't import torch and Ray)."""
    from rayseg import __version__

    parser = argparse.ArgumentParser(prog="rayseg", description="Segment image archives at cluster scale on Ray.")
    parser.add_argument("--version", action="version", version=f"rayseg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(f"rayseg.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = None
    try:
        if args.command in RAY_COMMANDS:
            from rayseg.console import start_console

            console = start_console(args.command, _verbose(args))
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"rayseg {args.command}: error: {e}", file=sys.stderr)
        return 2
    except EnvError as e:
        print(f"rayseg {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"rayseg {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if console is not None:
            console.close()
            if os.path.getsize(console.path):
                print(f"Ray's own log lines: {console.path}", file=sys.stderr)


def _verbose(args) -> bool:
    """--verbose, from the command line or from the --config file (the same option either way)."""
    if hasattr(args, "verbose"):
        return bool(args.verbose)
    if getattr(args, "config", None):
        from rayseg.cliutil import load_yaml_config

        return bool(load_yaml_config(args.config).get("verbose"))
    return False


def run(argv: list[str] | None = None) -> NoReturn:
    """The `rayseg` console script (and `python -m rayseg.cli`): main(), then a quick exit.

    Once a command has printed its summary, Ray is shut down here, the streams are flushed and the process exits at
    once: Python's own teardown of the torch, Ray and pyarrow modules would add 1-2 s to every command and does
    nothing a finished command needs (docs/PERFORMANCE.md, start-up). Temporary folders are removed by the
    commands themselves. A command that fails with a traceback exits the ordinary way.
    """
    rc = main(argv)
    exit_now(rc)


def exit_now(rc: int) -> NoReturn:
    """Shut down the Ray this process started or joined, flush what was written, exit with `rc` without Python's
    module teardown."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`rayseg ... | head`): nothing more can be written anyway
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
