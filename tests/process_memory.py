"""Memory of a run's whole process tree (Ray's raylet, GCS, workers and actors are this process's children), sampled
while the run goes on; and `rayseg segment` run as a user runs it, in a process with its own embedded Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path


def rss_of_tree() -> dict[int, int]:
    """pid -> resident memory (bytes) of every process below this one (Ray's raylet, GCS, workers)."""
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    me, out = os.getpid(), {}
    for pid in parent:
        p = pid
        while p in parent and p != me and p > 1:
            p = parent[p]
        if p == me and pid != me:
            try:
                m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
                out[pid] = int(m.group(1)) * 1024 if m else 0
            except OSError:
                pass
    return out


class PeakRSS(threading.Thread):
    """Samples the whole process tree's memory while a run goes on: peak of the sum, and of the largest process."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.total, self.largest = threading.Event(), 0, 0

    def run(self):
        while not self.stop.wait(0.05):
            rss = rss_of_tree()
            self.total, self.largest = max(self.total, sum(rss.values())), max(self.largest, max(rss.values()))


def peaks_during(run) -> tuple[int, int]:
    """(peak summed RSS of this process tree during `run()` over what it was just before, peak RSS of its largest
    process): the sum says what the run cost the machine, the largest process what the predictor actor held."""
    baseline = sum(rss_of_tree().values())
    meter = PeakRSS()
    meter.start()
    try:
        run()
    finally:
        meter.stop.set()
        meter.join()
    return meter.total - baseline, meter.largest


def segment_cli(folder: Path, out: Path, *flags: str) -> None:
    """`rayseg segment` in its own process with its own embedded Ray, as a user runs it."""
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "rayseg.cli", "segment", str(folder), "--output", str(out), "--quiet", *flags],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
