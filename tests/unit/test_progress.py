"""rayseg.progress: the progress line a submitted job logs, its ETA, and when lines are wanted at all."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from conftest import png_bytes, random_image, tar_bytes
from rayseg import progress
from rayseg.progress import Reporter, format_duration, interval_s, line, wants_log_lines


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (0.4, "0s"), (59, "59s"), (59.6, "1m00s"), (60, "1m00s"),
                                          (185, "3m05s"), (3599, "59m59s"), (3600, "1h00m"), (3725, "1h02m"),
                                          (50 * 3600, "50h00m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def totals(units=0, read=0, done=0, errors=0) -> dict:
    return {"units": units, "read": read, "done": done, "errors": errors}


def test_line_format_and_eta_from_images_per_shard():
    # 12 of 40 shards held 1,200 images: 4,000 expected, 2,800 to go at 41.5 images/s
    text = line(totals(units=12, read=1200, done=1200, errors=3), 40, 1200 / 41.5)
    assert text == "progress: 1,200 images done (3 errors), 41.5 images/s, shards 12/40 read, ETA 1m07s"


def test_a_nightly_line_says_what_its_waves_have_committed():
    text = line(totals(units=12, read=1200, done=1200, errors=3), 40, 1200 / 41.5, committed=900)
    assert text == "progress: 1,200 images done (3 errors), 900 committed, 41.5 images/s, shards 12/40 read, ETA 1m07s"


def test_eta_once_every_shard_is_read_uses_the_exact_count():
    assert line(totals(units=40, read=1000, done=900), 40, 9.0).endswith("shards 40/40 read, ETA 1s")
    assert line(totals(units=40, read=1000, done=1000), 40, 10.0).endswith("ETA 0s")


@pytest.mark.parametrize("t,elapsed", [
    (totals(), 5.0),  # nothing read yet
    (totals(units=0, read=0, done=0), 0.0),  # the first poll
    (totals(units=3, read=300, done=0), 5.0),  # read, but nothing done: no rate yet
])
def test_eta_unknown_until_there_is_a_rate_and_a_shard(t, elapsed):
    text = line(t, 10, elapsed)
    assert text.endswith(", ETA unknown") and "0.0 images/s" in text


def test_eta_never_negative():
    # more done than the per-shard estimate expects (shards differ in size)
    assert line(totals(units=1, read=10, done=500), 2, 10.0).endswith("ETA 0s")


@pytest.mark.parametrize("value,seconds", [(None, 10.0), ("2.5", 2.5), ("0", 0.1), ("-3", 0.1), ("soon", 10.0)])
def test_interval_from_the_environment(monkeypatch, value, seconds):
    if value is None:
        monkeypatch.delenv("RAYSEG_PROGRESS_INTERVAL", raising=False)
    else:
        monkeypatch.setenv("RAYSEG_PROGRESS_INTERVAL", value)
    assert interval_s() == seconds


class Stderr:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("quiet,tty,wanted", [(False, False, True), (False, True, False), (True, False, False), (True, True, False)])
def test_wants_log_lines_only_where_no_bars_are_seen(monkeypatch, quiet, tty, wanted):
    monkeypatch.setattr("sys.stderr", Stderr(tty))
    assert wants_log_lines(quiet) is wanted


class Remote:
    """Stands in for an actor method: `.remote(...)` runs it at once."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return self.fn(*args)


class FakeCounter:
    """The Counter actor's interface, in-process."""

    def __init__(self):
        self.t = totals()
        self.rows_of = {}
        self.killed = False
        self.add_read = Remote(self._add_read)
        self.add_done = Remote(self._add_done)
        self.totals = Remote(lambda: dict(self.t))

    def _add_read(self, units, images, rows_of=None):
        self.t["units"] += units
        self.t["read"] += images
        self.rows_of.update(rows_of or {})

    def _add_done(self, images, errors):
        self.t["done"] += images
        self.t["errors"] += errors


def test_read_stage_reports_units_and_images_once_they_are_read(tmp_path):
    rng = np.random.default_rng(0)
    tars = [tmp_path / "a.tar", tmp_path / "b.tar"]
    for tar in tars:
        tar.write_bytes(tar_bytes({f"k{i}.png": png_bytes(random_image(rng, 4, 4)) for i in range(5)}))
    units = np.empty(2, dtype=object)
    units[0], units[1] = [str(tars[0])], [str(tars[1])]
    batch = {"urls": units, "kind": np.array(["tar", "tar"], dtype=object)}
    counter = FakeCounter()
    kwargs = {"storage_options": {}, "h5_key": "images", "image_column": "image", "rows_per_batch": 4}
    out = []
    for b in progress.read_stage(batch, counter, **kwargs):
        assert counter.t["units"] == 0, "counted once the work units are fully read"
        out.append(len(b["image_id"]))
    assert out == [4, 4, 2]
    assert counter.t == totals(units=2, read=10)
    assert counter.rows_of == {str(tars[0]): 5, str(tars[1]): 5}  # what nightly's waves wait for, shard by shard
    assert sum(len(b["image_id"]) for b in progress.read_stage(batch, None, **kwargs)) == 10


def test_reporter_logs_lines_while_running_and_a_final_one(monkeypatch, caplog):
    counter = FakeCounter()

    class FakeActorClass:
        def options(self, **kw):
            assert kw["name"].startswith("rayseg-progress-")
            return self

        def remote(self):
            return counter

    monkeypatch.setattr(progress, "Counter", FakeActorClass())
    monkeypatch.setattr(progress.ray, "get", lambda value, timeout=None: value)
    monkeypatch.setattr(progress.ray, "kill", lambda actor: setattr(actor, "killed", True))
    logged = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("progress: ") and "images done" in record.getMessage():
                logged.set()

    logger = logging.getLogger("rayseg")
    handler = Seen()
    logger.addHandler(handler)
    caplog.set_level(logging.INFO, logger="rayseg")
    try:
        with Reporter(units_total=4, interval=0.02) as rep:
            rep.counter.add_read.remote(2, 20)
            rep.counter.add_done.remote(20, 1)
            assert logged.wait(5), "a progress line within a few intervals"
            rep.finish(20)
    finally:
        logger.removeHandler(handler)
    assert counter.killed, "the counter actor is gone after the run"
    messages = [r.getMessage() for r in caplog.records]
    running = [m for m in messages if "images done" in m]
    assert running and all(m.startswith("progress: ") and "shards 2/4 read" in m for m in running)
    final = [m for m in messages if m.startswith("progress: finished")]
    assert len(final) == 1 and final[0].startswith("progress: finished, 20 images (1 errors) in ")
    n = len(caplog.records)
    time.sleep(0.1)
    assert len(caplog.records) == n, "no more lines once the run is over"
