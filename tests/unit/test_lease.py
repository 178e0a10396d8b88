"""The lease on OUT: a live holder is respected, on this host or another; a dead holder on this host is taken
over at once, by one run only; the refusal says when the lease expires. Local disk and S3 (moto server)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from rayseg import lease
from rayseg.lease import Lease, LeaseHeld, _Store


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(OUT, storage options) on a local disk or in an S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "out"), {}
    bucket, opts = request.getfixturevalue("s3")
    return f"{bucket}/out", opts


def held_by(out: str, opts: dict, **changes) -> dict:
    """Write a live lease (60 s left) as this process would hold it, with `changes` applied; returns it."""
    record = {**Lease(out, opts, "holder", 60)._record(7), **changes}
    store = _Store(out, opts)
    store.write(record, store.read()[1])
    return record


def test_a_live_holder_in_another_process_is_respected_and_taken_over_once_killed(tmp_path, caplog):
    out = str(tmp_path / "out")
    code = ("import sys, time; from rayseg.lease import Lease\n"
            "with Lease(sys.argv[1], {}, 'holder-run', 60):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LeaseHeld) as refused:
            Lease(out, {}, "second", 60).acquire()
        sentence = str(refused.value)
        assert f"run holder-run (host {os.uname().nodename}, pid {proc.pid}," in sentence
        assert re.search(r"holds it; its lease expires at \d\d:\d\d:\d\d UTC \(in (59|60) s\) unless renewed, "
                         r"and --lease-wait SECONDS waits for it$", sentence), sentence
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        taken = Lease(out, {}, "second", 60)
        taken.acquire()
    assert time.monotonic() - t0 < 5  # at once, not after the 60 s lease
    assert taken.previous["run_id"] == "holder-run" and taken.generation == taken.previous["generation"] + 1
    assert [r.getMessage() for r in caplog.records if "took over" in r.getMessage()] == [
        f"took over the lease of run holder-run at once: its process (pid {proc.pid} on this host) no longer exists "
        f"(last renewed {time.time() - taken.previous['renewed_at']:.0f} s ago)"]


def test_a_holder_on_another_host_waits_for_expiry(where):
    out, opts = where
    held_by(out, opts, host="another-host", pid=999_999_999)
    with pytest.raises(LeaseHeld, match="host another-host, pid 999999999"):
        Lease(out, opts, "second", 60).acquire()
    held_by(out, opts, process={**lease.this_machine(), "boot_id": "another-boot", "pid": 999_999_999})  # a clone's name
    with pytest.raises(LeaseHeld):
        Lease(out, opts, "second", 60).acquire()
    held_by(out, opts, host="another-host", pid=999_999_999, ttl_s=1)  # not renewed: expires 1 s after it is first seen
    t0 = time.monotonic()
    taken = Lease(out, opts, "second", 60, wait_s=10)
    taken.acquire()
    assert 1 <= time.monotonic() - t0 < 4
    assert taken.previous["host"] == "another-host"


class SkewedLease(Lease):
    """A holder whose wall clock is `skew_s` off: every timestamp it writes (renewed, expires) is shifted by it."""

    def __init__(self, *args, skew_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.skew_s = skew_s

    def _record(self, generation: int) -> dict:
        r = super()._record(generation)
        return {**r, "renewed_at": r["renewed_at"] + self.skew_s, "expires_at": r["expires_at"] + self.skew_s}


@pytest.mark.parametrize("skew_h", [-3, 3])
def test_expiry_is_timed_on_the_waiters_clock_whatever_the_holders_says(where, skew_h, caplog):
    """A holder 3 h behind writes leases that look expired, one 3 h ahead leases that look good for hours: while it
    renews, a waiter never takes it over; once it stops renewing, the waiter takes it over one lifetime after it
    first saw the last renewal."""
    out, opts = where
    ttl = 2.5
    holder = SkewedLease(out, opts, "skewed", ttl, skew_s=skew_h * 3600).__enter__()  # renews every ttl/3
    try:
        with pytest.raises(LeaseHeld, match="run skewed "):
            Lease(out, opts, "waiter", ttl, wait_s=2.5 * ttl).acquire()  # sees several renewals, each a new version
        assert _Store(out, opts).read()[0]["renewal"] >= 4
    finally:
        holder._stop.set()  # the holder stalls: no more renewals, and no release
        holder._thread.join(timeout=30)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        taken = Lease(out, opts, "waiter", ttl, wait_s=6 * ttl)
        taken.acquire()
    waited = time.monotonic() - t0
    assert ttl <= waited < ttl + 3, waited
    assert taken.previous["run_id"] == "skewed" and taken.generation == taken.previous["generation"] + 1
    assert any("took over the expired lease of run skewed" in r.getMessage() for r in caplog.records)
    with pytest.raises(lease.LeaseLost):
        holder.renew()  # the stalled holder resumes: its compare-and-swap fails


def test_a_lease_without_a_process_record_waits_for_expiry(where):
    out, opts = where
    held_by(out, opts, pid=999_999_999, process=None)  # as written by an earlier release
    with pytest.raises(LeaseHeld):
        Lease(out, opts, "second", 60).acquire()


def test_a_reused_pid_is_a_dead_holder(where):
    """The pid is alive here, but it is another process than the holder (it started at another time)."""
    out, opts = where
    me = lease.this_machine()
    held_by(out, opts, process=me)  # this very process: alive
    with pytest.raises(LeaseHeld):
        Lease(out, opts, "second", 60).acquire()
    held_by(out, opts, process={**me, "start_ticks": me["start_ticks"] - 1})
    taken = Lease(out, opts, "second", 60)
    taken.acquire()
    assert taken.previous["run_id"] == "holder"


class ReadThenWait(_Store):
    """The real store, except that a racer's first read waits until every racer has read: all of them then try
    to take over the same lease version, the race a conditional write must settle."""

    def __init__(self, out: str, opts: dict, barrier: threading.Barrier):
        super().__init__(out, opts)
        self.barrier, self.first = barrier, True

    def read(self):
        got = super().read()
        if self.first:
            self.first = False
            self.barrier.wait(timeout=30)
        return got


def test_two_runs_racing_for_a_dead_holders_lease_cannot_both_win(where):
    out, opts = where
    me = lease.this_machine()
    held_by(out, opts, process={**me, "start_ticks": me["start_ticks"] - 1})  # dead
    barrier, results = threading.Barrier(3), []
    racers = [Lease(out, opts, f"racer{n}", 60) for n in range(3)]
    for racer in racers:
        racer.store = ReadThenWait(out, opts, barrier)

    def take(racer):
        try:
            racer.acquire()
            results.append(racer.run_id)
        except LeaseHeld as e:
            results.append(str(e))

    threads = [threading.Thread(target=take, args=(r,)) for r in racers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    winners = [r for r in results if r.startswith("racer")]
    assert len(results) == 3 and len(winners) == 1, results
    assert all(f"run {winners[0]} " in r for r in results if r not in winners)  # the losers name the winner
    assert _Store(out, opts).read()[0]["run_id"] == winners[0]
