"""Progress of a segment run: one line, redrawn in a terminal, logged at a steady interval in a job.

A tiny named actor counts what the read and encode stages have finished, and a driver thread reports it:

    progress: 1,200 images done (3 errors), 41.5 images/s, shards 12/40 read, ETA 3m05s

A nightly run also says what its waves have committed: "1,200 images done (3 errors), 900 committed, ...".

In a terminal with the rayseg console (console.Console) the line is redrawn in place twice a second. In a
submitted job there is no TTY, and a line is logged every RAYSEG_PROGRESS_INTERVAL seconds (default 10).
With --verbose in a terminal, Ray Data's own progress bars are left to do the job, as Ray shows them.

The number of images is not known upfront (tar, HDF5 and Parquet shards are only counted by reading them),
so the total is estimated from the images read per shard so far; until a shard has been read: "ETA unknown".
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import ray

from rayseg.shards import read_units
from rayseg.stats import encode_batch

log = logging.getLogger("rayseg")

DEFAULT_INTERVAL_S = 10.0
LIVE_INTERVAL_S = 0.5  # a redrawn line: often enough to look alive, rarely enough to cost nothing


def interval_s() -> float:
    try:
        return max(0.1, float(os.environ.get("RAYSEG_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


@ray.remote(num_cpus=0)
class Counter:
    """Totals the stages report. Takes no CPU, so it never holds back the pipeline on a small cluster.

    It also keeps how many rows each shard gave once the shard was read whole, so that a consumer of rows that
    arrive in any order (nightly's waves) knows when it holds all of a shard.
    """

    def __init__(self):
        self.units = self.read = self.done = self.errors = 0
        self.rows_of: dict[str, int] = {}
        self.read_order: list[str] = []  # shards in the order they were first read whole: shard_rows' cursor
        self.regions: dict[str, set[str]] = {}  # huge image -> its regions written (a set: a retried region counts once)

    def add_read(self, units: int, images: int, rows_of: dict[str, int] | None = None) -> None:
        self.units += units
        self.read += images
        for url, n in (rows_of or {}).items():  # set, not add: a retried read task reports the same counts again
            if url not in self.rows_of:
                self.read_order.append(url)
            self.rows_of[url] = n

    def shard_rows(self, since: int = 0) -> tuple[dict[str, int], int]:
        """({shard: rows} of the shards read whole after the first `since`, the cursor for the next call): a
        consumer asking often gets what is new, not every shard of the run again."""
        return {u: self.rows_of[u] for u in self.read_order[since:]}, len(self.read_order)

    def region_done(self, image: str, region: str) -> None:
        self.regions.setdefault(image, set()).add(region)

    def regions_written(self, images: list[str]) -> dict[str, int]:
        """{image: how many of its regions are written} for the huge images asked about."""
        return {i: len(self.regions.get(i, ())) for i in images}

    def add_done(self, images: int, errors: int) -> None:
        self.done += images
        self.errors += errors

    def totals(self) -> dict:
        return {"units": self.units, "read": self.read, "done": self.done, "errors": self.errors}


def read_stage(batch: dict[str, np.ndarray], counter=None, **kwargs) -> Iterator[dict]:
    """The read stage: shards.read_units, reporting to the counter (if any) once its work units are fully read."""
    rows_of = {str(u): 0 for urls in batch["urls"] for u in urls}
    for out in read_units(batch, **kwargs):
        for shard in out["shard"]:
            rows_of[str(shard)] = rows_of.get(str(shard), 0) + 1
        yield out
    if counter is not None:  # fire and forget: progress must never slow the stage
        counter.add_read.remote(len(batch["urls"]), sum(rows_of.values()), rows_of)


def encode_stage(batch: dict[str, np.ndarray], counter=None, **kwargs):
    """The encode stage: stats.encode_batch, reporting images and errors done to the counter (if any)."""
    table = encode_batch(batch, **kwargs)
    if counter is not None:
        counter.add_done.remote(table.num_rows, table.num_rows - table["error"].null_count)
    return table


def format_duration(s: float) -> str:
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def line(t: dict, units_total: int, elapsed: float, committed: int | None = None) -> str:
    """One progress line; `committed`: the images a nightly run has committed so far (its waves), where known."""
    rate = t["done"] / elapsed if elapsed > 0 else 0.0
    eta = "ETA unknown"
    if t["units"] and rate > 0:
        expected = t["read"] if t["units"] >= units_total else t["read"] / t["units"] * units_total
        eta = f"ETA {format_duration(max(0.0, expected - t['done']) / rate)}"
    kept = f"{committed:,} committed, " if committed is not None else ""
    return (f"progress: {t['done']:,} images done ({t['errors']:,} errors), {kept}{rate:.1f} images/s, "
            f"shards {t['units']:,}/{units_total:,} read, {eta}")


class Reporter:
    """Context manager for one run: creates the counter, reports from a daemon thread, reports a final line on exit.

    `live`: redraw one line on the console's terminal instead of logging lines (default: when the console is on).
    """

    def __init__(self, units_total: int, interval: float | None = None, live: bool | None = None):
        from rayseg.console import console

        self.console = console() if live is None or live else None
        self.live = self.console is not None
        self.units_total = units_total
        self.interval = interval if interval is not None else LIVE_INTERVAL_S if self.live else interval_s()
        self.counter = Counter.options(name=f"rayseg-progress-{uuid.uuid4().hex[:12]}").remote()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rayseg-progress", daemon=True)
        self.t0 = time.perf_counter()
        self.committed: Callable[[], int] | None = None  # a nightly run: the images its waves have committed, in each line

    def totals(self) -> dict:
        return ray.get(self.counter.totals.remote(), timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                committed = self.committed() if self.committed else None
                text = line(self.totals(), self.units_total, time.perf_counter() - self.t0, committed)
                if self.live:
                    self.console.write(text)
                else:
                    log.info(text)
            except Exception as e:  # noqa: BLE001 - a missed progress line must never fail the run
                log.debug("progress poll failed: %s", e)

    def __enter__(self) -> "Reporter":
        self._thread.start()
        return self

    def finish(self, rows: int) -> None:
        """Final line once the output is written; waits briefly for the last fire-and-forget counts to land."""
        deadline = time.perf_counter() + 5
        t = self.totals()
        while t["done"] < rows and time.perf_counter() < deadline:
            time.sleep(0.05)
            t = self.totals()
        elapsed = time.perf_counter() - self.t0
        self._stop.set()  # no redraw after the final line
        self._thread.join(timeout=5)
        log.info("progress: finished, %s images (%s errors) in %s, %.1f images/s", f"{t['done']:,}", f"{t['errors']:,}",
                 format_duration(elapsed), t["done"] / elapsed if elapsed > 0 else 0.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        ray.kill(self.counter)


def wants_log_lines(quiet: bool) -> bool:
    """A Reporter wherever Ray Data's bars aren't shown: not --quiet, and stderr is no terminal or the console is on."""
    import sys

    from rayseg.console import console

    return not quiet and (not sys.stderr.isatty() or console() is not None)
