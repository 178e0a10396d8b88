"""What every jobs/ entrypoint does: run one `rayseg` subcommand through its own parser, summary last.

The job's arguments are exactly the subcommand's (`--config FILE.yaml` included, flags override the file), so a
job and a terminal run are spelled the same. The exit status is the command's: 0 done, 2 a user error (one line
on stderr), anything else a bug with its traceback. The summary JSON the command prints is kept back until Ray
has shut down, so it is the last line of the job's log whatever Ray prints on the way out.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading

from rayseg.cli import exit_now  # noqa: F401 - the entrypoints exit through it: no module teardown after the summary


class _LastLineLast(io.TextIOBase):
    """A stdout that keeps back the latest line until `finish()`; after `hold()`, later output passes straight on."""

    def __init__(self, out):
        self.out, self.pending, self.partial, self.held = out, "", "", None
        self.lock = threading.Lock()  # Ray's log threads print worker output to sys.stdout too

    def write(self, s: str) -> int:
        with self.lock:
            lines = (self.partial + s).split("\n")
            self.partial = lines.pop()
            for line in lines:
                if self.held is not None:
                    self.out.write(line + "\n")
                    continue
                if self.pending:
                    self.out.write(self.pending)
                self.pending = line + "\n"
            self.out.flush()
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def hold(self) -> None:
        """The command is done: its last line (the summary) is the one kept back."""
        with self.lock:
            self.held, self.pending = self.pending, ""

    def finish(self) -> None:
        with self.lock:
            self.out.write(self.partial + ("\n" if self.partial else "") + (self.held or self.pending))
            self.out.flush()


def parse(command: str, argv: list[str]):
    """The namespace `rayseg COMMAND ARGV...` parses to (argparse errors exit 2 with usage and one line)."""
    from rayseg.cli import build_parser

    return build_parser().parse_args([command, *argv])


def run(command: str, argv: list[str] | None = None) -> int:
    from rayseg.cli import main

    argv = sys.argv[1:] if argv is None else argv
    stdout = _LastLineLast(sys.stdout)
    try:
        with contextlib.redirect_stdout(stdout):
            rc = main([command, *argv])
            stdout.hold()
            import ray

            if ray.is_initialized():
                ray.shutdown()
    finally:
        sys.stderr.flush()
        stdout.finish()
    return rc
