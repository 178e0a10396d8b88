"""The rayseg console: in a terminal, rayseg's own lines and one progress line on the screen, Ray's lines in a log file.

Started by the CLI before Ray (`start_console`); runtime routes Ray's loggers to it once Ray is up, and progress
draws its line through it. Without a terminal, or with --verbose, there is none and Ray's output comes as it is.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings

import ray

# Ray's lines that say nothing is wrong. With the console they go to its log file only.
HARMLESS = (
    # Ray Data passes every pool actor object refs of its own (the plan, its context), so Ray core logs this at
    # error level for every actor pool (ray-project/ray#57733); rayseg's constructor arguments are not the cause
    # and cannot avoid it, and the refs live as long as the run. Its source is C++ writing to the process's stderr.
    "has constructor arguments in the object store",
    "Token authentication is enabled",  # a notice: the embedded Ray made its own token
    "tqdm is not installed", "Progress bars disabled", "A new progress UI is available",  # rayseg draws its own line
    "The minimum number of concurrent actors",  # a pool sized for the cluster met a small input: nothing is lost
)
CPP_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ ([DIWEF]) \d+ \d+\] ")  # Ray core's C++ log line prefix
RAY_DIR = os.path.dirname(ray.__file__) + os.sep
CLEAR_LINE = "\r\033[K"

_console: Console | None = None


def harmless(text: str) -> bool:
    return any(h in text for h in HARMLESS)


class ToScreen(logging.Filter):
    """What of a Ray logger reaches the screen: warnings and errors, less the harmless ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not harmless(record.getMessage())


class FileFormat(logging.Formatter):
    """Log records with time, level and logger; text that arrived as lines (C++, workers, warnings) as it came."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "rayseg.ray":
            return record.getMessage()
        return super().format(record)


class LogFile(logging.FileHandler):
    """The console's log file. Keeps its own format: ray.init restyles every handler of the "ray" logger."""

    def __init__(self, path: str):
        super().__init__(path, encoding="utf-8")
        self.formatter = FileFormat("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def setFormatter(self, fmt) -> None:
        pass


class ScreenFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"{CLEAR_LINE}{self.formatTime(record, '%H:%M:%S')} {level}{super().format(record)}"


class Console:
    """The rayseg console, in a terminal: rayseg's own lines and progress on the screen, Ray's in a log file.

    The file (`path`) gets Ray's Python log lines of every level, its workers' output, Ray's Python warnings and
    what Ray's C++ core writes to this process's stderr. The screen still gets Ray's errors and warnings, except
    the known harmless ones (HARMLESS). C++ writes to file descriptor 2 directly, so descriptor 2 becomes a pipe
    whose lines a thread sorts, and sys.stderr writes to the terminal itself.
    """

    def __init__(self, command: str):
        folder = os.environ.get("RAYSEG_LOG_DIR") or os.path.join(tempfile.gettempdir(), "rayseg", "logs")
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
        self.file = LogFile(self.path)
        self.file.setLevel(logging.INFO)
        self.lines = logging.getLogger("rayseg.ray")  # text that arrives as lines
        self.lines.propagate, self.lines.handlers = False, [self.file]
        self.lines.setLevel(logging.INFO)
        self.to_screen = ToScreen()
        self.lock = threading.Lock()
        self._showwarning = warnings.showwarning

    def start(self) -> "Console":
        sys.stderr.flush()
        old = sys.stderr
        screen = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        sys.stderr = io.TextIOWrapper(io.FileIO(screen, "w"), encoding=old.encoding, errors="backslashreplace", line_buffering=True)
        for h in logging.getLogger().handlers:  # the command's own lines: short, on the terminal
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(sys.stderr)
                h.setFormatter(ScreenFormat("%(message)s"))
                h.addFilter(self._from_rayseg)
        threading.Thread(target=self._sort, args=(r,), name="rayseg-stderr", daemon=True).start()
        warnings.showwarning = self._warning
        self.route_ray_loggers()
        return self

    @staticmethod
    def _from_rayseg(record: logging.LogRecord) -> bool:
        return not record.name.startswith("ray.") or ToScreen().filter(record)

    def _sort(self, fd: int) -> None:
        with open(fd, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", "backslashreplace").rstrip("\n")
                self.lines.info(text)
                m = CPP_LINE.match(text)
                if not harmless(text) and not (m and m.group(1) in "DIW"):
                    self.write(text + "\n")

    def write(self, text: str) -> None:
        """Text for the terminal, after clearing a progress line that may be drawn there."""
        with self.lock:
            sys.stderr.write(CLEAR_LINE + text)
            sys.stderr.flush()

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        if str(filename).startswith(RAY_DIR) or harmless(str(message)):
            self.lines.warning(warnings.formatwarning(message, category, filename, lineno, line).rstrip())
        else:
            self._showwarning(message, category, filename, lineno, file, line)

    def route_ray_loggers(self) -> None:
        """Every Ray logger with handlers of its own (Ray, Ray Data, ...): all to the file, to the screen through ToScreen."""
        names = [n for n in list(logging.root.manager.loggerDict) if n == "ray" or n.startswith("ray.")]
        for name in ["ray", *names]:
            logger = logging.getLogger(name)
            if not logger.handlers:
                continue
            for h in logger.handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and self.to_screen not in h.filters:
                    h.addFilter(self.to_screen)
            if self.file not in logger.handlers:
                logger.addHandler(self.file)

    def ray_started(self) -> None:
        """After ray.init: its loggers are set up, and its workers' output (log_to_driver) goes to the file."""
        import ray.data  # noqa: F401 - Ray Data sets up its loggers on import: now, so that they are routed too
        from ray._private import worker as ray_worker

        self.route_ray_loggers()
        self.lines.info("Ray's session logs: %s", ray_worker._global_node.get_logs_dir_path() if ray_worker._global_node else "?")
        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        if any(name == "ray_print_logs" for name, _ in dispatcher.handlers):
            dispatcher.remove_handler("ray_print_logs")
            dispatcher.add_handler("ray_print_logs", self._worker_output)

    def _worker_output(self, data: dict) -> None:
        who = " ".join(str(w) for w in (data.get("actor_name") or data.get("task_name"), f"pid={data.get('pid')}") if w)
        for line in data.get("lines", []):
            self.lines.info("(%s) %s", who, line)

    def close(self) -> None:
        warnings.showwarning = self._showwarning
        self.file.flush()
        time.sleep(0.05)  # the sorting thread's last lines


def start_console(command: str, verbose: bool) -> Console | None:
    """The rayseg console when stderr is a terminal and not --verbose; None (Ray's own output, as it comes) otherwise."""
    global _console
    if verbose or not sys.stderr.isatty() or _console is not None:
        return None
    _console = Console(command).start()
    return _console


def console() -> Console | None:
    return _console
