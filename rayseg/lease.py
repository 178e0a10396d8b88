"""One nightly run at a time per output folder: a lease object, OUT/_lease.json, that expires unless renewed.

A run takes the lease before it reads the table's state and keeps it until it has committed its last wave; a
thread renews it every third of its lifetime (--lease-seconds), and every commit renews it first, so a run that
lost it stops before writing anything more. A second run finds a live lease and waits (--lease-wait) or stops
with one sentence naming the holder. A lease left by a killed run expires and the next run takes it over; on the
host where the killed run lived, the next run takes it over at once, since it can see that the holder's process
is gone (its pid is free, or now names a process started at another time).

Expiry is timed by the waiting run, on its own monotonic clock: a lease expires once the waiter has seen the same
version of it (the same ETag or digest; every renewal writes a new one) for the lease's lifetime. The holder's
wall-clock timestamps are only shown to people, so two machines' clocks never need to agree.

Taking and renewing are compare-and-swap writes (rayseg/lease_store.py), so two runs can never both believe they
hold it; a run first checks that OUT's store keeps that promise (`check_store`) and stops with one sentence where
it cannot.

Each lease carries a generation number, raised by every take-over; commits record it as the table's application
transaction, so a commit from a run whose lease has passed to another is refused (rayseg/commit.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

from rayseg.errors import EnvError, UserError
from rayseg.lease_store import Conflict, UnsafeStore, _Store, check_store  # noqa: F401 - the lease's API

log = logging.getLogger("rayseg")

POLL_S = 1.0  # how often a waiting run looks at the lease again


class LeaseHeld(UserError):
    """Another live run holds OUT's lease (one sentence, exit 2)."""


class LeaseLost(EnvError):
    """This run's lease expired and another run took it: stop without committing more (one sentence, exit 1)."""


def describe(record: dict, seen_at: float | None = None) -> str:
    """The holder, and when its lease expires: `seen_at` (monotonic) is when this run first saw its current version;
    without it, the holder's own expiry time is shown as it wrote it."""
    left = max(0.0, _ttl(record) - (time.monotonic() - seen_at)) if seen_at is not None else max(0.0, record["expires_at"] - time.time())
    at = time.strftime("%H:%M:%S UTC", time.gmtime(time.time() + left))
    return (f"run {record['run_id']} (host {record['host']}, pid {record['pid']}, started {record['acquired_at']}) "
            f"holds it; its lease expires at {at} (in {left:.0f} s) unless renewed, and --lease-wait SECONDS waits for it")


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22); None if it is gone or a zombie."""
    stat = _read_text(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ", which may hold spaces: field 3 onwards
    return None if fields[0] in ("Z", "X") else int(fields[19])


def this_machine() -> dict | None:
    """What names this process uniquely on this machine: boot, PID namespace, pid and start time (Linux only).

    The boot id tells machines that share a host name apart (cloned VMs); the PID namespace, containers that
    share one (host networking)."""
    boot = _read_text("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    started = _start_ticks(os.getpid())
    if not boot or not pidns or started is None:
        return None
    return {"boot_id": boot.strip(), "pid_ns": pidns, "pid": os.getpid(), "start_ticks": started}


def dead_here(record: dict) -> bool:
    """Whether the lease's holder ran on this machine (same boot and PID namespace) and its process is gone.

    Only then can a run tell for sure; for a holder elsewhere, or a lease without this record, expiry decides."""
    held, here = record.get("process"), this_machine()
    if not held or not here or record.get("host") != socket.gethostname():
        return False
    if (held.get("boot_id"), held.get("pid_ns")) != (here["boot_id"], here["pid_ns"]):
        return False
    return _start_ticks(held["pid"]) != held["start_ticks"]


def _released(record: dict) -> bool:
    return bool(record.get("released")) or record.get("expires_at") == 0


def _ttl(record: dict, default: float = 0.0) -> float:
    return float(record.get("ttl_s") or default)


def _free(record: dict | None, seen_at: float, default_ttl: float) -> bool:
    """Whether a lease can be taken: none, released, its holder dead here, or unchanged for its lifetime since this
    run first saw this version of it (`seen_at`, on this run's monotonic clock)."""
    if record is None or _released(record) or dead_here(record):
        return True
    return time.monotonic() - seen_at >= _ttl(record, default_ttl)


def holder(output: str, storage_options: dict) -> dict | None:
    """The lease on OUT as --status shows it: None if there is none, it was released, its holder is dead here, or by
    the holder's own clock it has expired. Only for display: taking a lease over is decided by expiry on the
    waiting run's clock (Lease.acquire)."""
    record, _ = _Store(output, storage_options).read()
    if record is None or _released(record) or dead_here(record) or record["expires_at"] <= time.time():
        return None
    return record


class Lease:
    """`with Lease(OUT, so, run_id, ttl_s, wait_s) as lease:` holds OUT for this run, renewed in the background."""

    def __init__(self, output: str, storage_options: dict, run_id: str, ttl_s: float, wait_s: float = 0.0):
        self.store, self.output = _Store(output, storage_options), output
        self.run_id, self.ttl_s, self.wait_s = run_id, ttl_s, wait_s
        self.etag: str | None = None
        self.record: dict = {}
        self.previous: dict | None = None  # the expired lease this run took over (its last progress tells what was lost)
        self.progress: dict = {}
        self.lost = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._process = this_machine()

    def __enter__(self) -> Lease:
        self.acquire()
        self._thread = threading.Thread(target=self._heartbeat, name="rayseg-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if not self.lost and self.etag:  # released, not deleted: the generation number must only ever grow
            with self._lock, contextlib.suppress(Conflict):
                self.store.write({**self.record, "renewed_at": time.time(), "expires_at": 0, "released": True}, self.etag)

    def _record(self, generation: int) -> dict:
        t = time.time()
        return {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "generation": generation,
                "acquired_at": self.record.get("acquired_at") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)),
                "renewed_at": t, "expires_at": t + self.ttl_s, "ttl_s": self.ttl_s, "progress": self.progress,
                "process": self._process}

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        seen: tuple[str | None, float] | None = None  # (the lease's version, when this run first read it)
        while True:
            current, etag = self.store.read()
            if seen is None or seen[0] != etag:
                seen = (etag, time.monotonic())
            if _free(current, seen[1], self.ttl_s):
                # the same conditional write whether the holder expired or died here: of two runs racing, one wins
                try:
                    self.record = self._record((current or {}).get("generation", 0) + 1)
                    self.etag = self.store.write(self.record, etag)
                except Conflict:  # another run took it between our read and write: look again
                    continue
                if current is not None and not current.get("released"):
                    self.previous = current
                    self._log_takeover(current)
                return
            if time.monotonic() >= deadline:
                raise LeaseHeld(f"another nightly run is writing {self.output}: {describe(current, seen[1])}")
            time.sleep(min(POLL_S, max(0.05, deadline - time.monotonic())))

    @staticmethod
    def _log_takeover(current: dict) -> None:
        ago = time.time() - current["renewed_at"]  # as the two clocks tell it: for people only
        if dead_here(current):
            log.warning("took over the lease of run %s at once: its process (pid %s on this host) no longer exists "
                        "(last renewed %.0f s ago)", current["run_id"], current["pid"], ago)
        else:
            log.warning("took over the expired lease of run %s (unchanged for its lifetime, %.0f s, as this run timed it)",
                        current["run_id"], _ttl(current))

    @property
    def generation(self) -> int:
        return self.record["generation"]

    def at_least(self, generation: int) -> None:
        """Raise the generation past the table's (a lease object deleted by hand restarts the count)."""
        if self.generation < generation:
            with self._lock:
                record = {**self.record, "generation": generation}
                self.etag = self.store.write(record, self.etag)
                self.record = record

    def renew(self, progress: dict | None = None) -> None:
        """Extend the lease (and record progress); LeaseLost if another run has taken it."""
        with self._lock:
            if self.lost:
                raise LeaseLost(f"run {self.run_id} lost its lease on {self.output}")
            if progress is not None:
                self.progress = progress
            # a new version on every renewal (its counter): a waiting run times expiry from the last one it saw
            record = {**self._record(self.generation), "acquired_at": self.record["acquired_at"],
                      "renewal": self.record.get("renewal", 0) + 1}
            try:
                self.etag = self.store.write(record, self.etag)
                self.record = record
            except Conflict:
                self.lost = True
                raise LeaseLost(f"run {self.run_id} lost its lease on {self.output}: another run took it over") from None

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                log.error("%s", e)
                return
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat tries again, well before expiry
                log.warning("renewing the lease failed (%s: %s)", type(e).__name__, e)
