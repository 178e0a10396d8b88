"""The output folder's layout, and the fields every command's summary ends with. Imports neither torch nor Ray.

    OUT/images/*.parquet     one row per input image (stats.SCHEMA)
    OUT/objects/*.parquet    with --objects: one row per connected component (objects.OBJECT_SCHEMA)
    OUT/_rayseg.json         the summary of a segment run, written last: its presence means the run finished

Names starting with `_` or `.` are skipped by pyarrow, pandas, DuckDB and Spark when they read OUT/images.
"""

from __future__ import annotations

import datetime as dt
import time
from importlib import metadata

IMAGES_DIR = "images"
OBJECTS_DIR = "objects"
SUMMARY_FILE = "_rayseg.json"


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class Timeline:
    """When a command reached each of its steps, in seconds since it began: its own marks, and the wall-clock
    stamps its actors made (on a cluster, as exact as the nodes' clocks agree)."""

    def __init__(self):
        self.t0, self.wall0, self.marks = time.perf_counter(), time.time(), {}

    def mark(self, step: str) -> float:
        self.marks[step] = round(time.perf_counter() - self.t0, 3)
        return self.marks[step]

    def at(self, stamps: dict[str, float]) -> None:
        self.marks.update({step: round(t - self.wall0, 3) for step, t in stamps.items()})


def summary_tail(started: dt.datetime, t0: float) -> dict:
    """When the command ran and with what: the last fields of every summary."""
    from rayseg import __version__

    return {
        "started_at": started.isoformat(),
        "finished_at": now().isoformat(),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "rayseg_version": __version__,
        "ray_version": _version("ray"),
    }
