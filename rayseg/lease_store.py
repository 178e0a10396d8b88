"""The lease's object, OUT/_lease.json, and the compare-and-swap writes that keep two runs from both holding it.

- S3: PutObject with `IfNoneMatch="*"` to take a free lease, `IfMatch=<ETag>` to renew or take over an expired one.
- Local and mounted disks: the read-compare-write happens under an exclusive `flock` on OUT/.lease.lock.

Those promises are only as good as the store. At start-up a run checks them (`check_store`): it creates a probe
object exclusively twice, and the second create must be refused (on disks, a second `flock` must be refused too).
Where it is not (an S3-compatible server that ignores `If-None-Match`, a FUSE or NFS mount without exclusive create
or working locks), or where rayseg has no compare-and-swap write (GCS, Azure, HTTP, ... through fsspec), the run
stops with one sentence naming the store, unless --unsafe-single-writer says that only one run can ever write OUT.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid

from rayseg import storage
from rayseg.errors import EnvError

log = logging.getLogger("rayseg")

LEASE_FILE, LOCK_FILE = "_lease.json", ".lease.lock"


class UnsafeStore(EnvError):
    """OUT's store cannot keep two runs apart (one sentence, exit 1)."""


class Conflict(Exception):
    """A compare-and-swap write found the lease changed since it was read."""


class _Store:
    """The lease object: read -> (record, etag), and writes conditional on the etag (None: must not exist)."""

    def __init__(self, output: str, storage_options: dict):
        from fsspec.implementations.local import LocalFileSystem

        self.fs, self.root = storage.filesystem(output, storage_options)
        self.path = posixpath.join(self.root, LEASE_FILE)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.kind = "s3" if {"s3", "s3a"} & set(protocols) else "local" if isinstance(self.fs, LocalFileSystem) else "other"
        self.name = {"s3": _s3_name(self.fs), "local": "a local or mounted disk"}.get(self.kind, f"{protocols[0]}:// (fsspec)")
        if self.kind == "local":
            self.fs.makedirs(self.root, exist_ok=True)
            self.lock_path = os.path.join(self.root, LOCK_FILE)

    def create(self, path: str, body: bytes) -> None:
        """Create `path` only if it does not exist (Conflict if it does), the way a free lease is taken."""
        if self.kind == "s3":
            bucket, key = path.split("/", 1)
            try:
                self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
            except Exception as e:  # noqa: BLE001 - see _is_precondition_failure
                if _is_precondition_failure(e):
                    raise Conflict() from None
                raise
            return
        try:
            with self.fs.open(path, "xb") as f:  # O_EXCL on disks
                f.write(body)
        except FileExistsError:
            raise Conflict() from None

    def refuses_second_create(self) -> bool:
        """Whether the store refuses to create a probe object twice (and, on disks, a second exclusive flock)."""
        path = posixpath.join(self.root, f".probe-{uuid.uuid4().hex[:12]}")
        try:
            self.create(path, b"first")
            try:
                self.create(path, b"second")
            except Conflict:
                return self.kind != "local" or _flock_excludes(self.lock_path)
            return False
        finally:
            with contextlib.suppress(Exception):
                self.fs.rm(path)

    def read(self) -> tuple[dict | None, str | None]:
        if self.kind == "s3":
            bucket, key = self.path.split("/", 1)
            try:
                r = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return None, None
            body = _sync_read(self.fs, r["Body"])
            return json.loads(body), r["ETag"]
        try:
            with self.fs.open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None, None
        return json.loads(body), _digest(body)

    def write(self, record: dict, etag: str | None) -> str:
        """Write `record` if the lease is still at `etag` (None: if there is none); returns the new etag."""
        body = json.dumps(record, sort_keys=True).encode()
        if self.kind == "s3":
            bucket, key = self.path.split("/", 1)
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                return self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **cond)["ETag"]
            except Exception as e:  # noqa: BLE001 - 412 Precondition Failed / 409 ConditionalRequestConflict
                if _is_precondition_failure(e):
                    raise Conflict() from None
                raise
        with self._locked():
            _, current = self.read()
            if current != etag:
                raise Conflict()
            tmp = posixpath.join(posixpath.dirname(self.path), f".{LEASE_FILE}.{uuid.uuid4().hex[:8]}.tmp")
            with self.fs.open(tmp, "wb") as f:
                f.write(body)
            self.fs.mv(tmp, self.path)  # a rename on disks: readers see the old lease or the new one, whole
            return _digest(body)

    @contextlib.contextmanager
    def _locked(self):
        if self.kind != "local":
            yield
            return
        import fcntl

        with open(self.lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _s3_name(fs) -> str:
    endpoint = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    return f"the S3-compatible server at {endpoint}" if endpoint else "AWS S3"


def _flock_excludes(lock_path: str) -> bool:
    """Whether a second exclusive flock on the file is refused while a first is held (it is not on some mounts)."""
    import fcntl

    with open(lock_path, "a") as first, open(lock_path, "a") as second:
        fcntl.flock(first, fcntl.LOCK_EX)  # waits while a run renews its lease
        try:
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(second, fcntl.LOCK_UN)
            return False
        finally:
            fcntl.flock(first, fcntl.LOCK_UN)


def check_store(output: str, storage_options: dict, unsafe_single_writer: bool = False) -> str:
    """Refuse (UnsafeStore) an OUT whose store cannot keep two runs apart, unless `unsafe_single_writer`; returns
    the store's name."""
    store = _Store(output, storage_options)
    out = storage.redact_url(output)
    if store.kind == "other":
        why = f"{out} is on {store.name}, where rayseg has no compare-and-swap write for its lease"
    elif not store.refuses_second_create():
        why = f"{out} is on {store.name}, which did not refuse a second exclusive create of the same object"
    else:
        return store.name
    if unsafe_single_writer:
        log.warning("%s; running anyway (--unsafe-single-writer): two runs on it at once could lose or double rows", why)
        return store.name
    raise UnsafeStore(f"{why}, so two nightly runs could both take the lease and overwrite each other's commits: "
                      f"write OUT to local disk or to S3 with conditional writes, or pass --unsafe-single-writer if "
                      f"only one run can ever write it")


def _digest(body: bytes) -> str:
    import hashlib

    return hashlib.sha256(body).hexdigest()


def _sync_read(fs, body) -> bytes:
    from fsspec.asyn import sync

    async def read():
        return await body.read()

    return sync(fs.loop, read)


def _is_precondition_failure(e: Exception) -> bool:
    """412 Precondition Failed, or 409 ConditionalRequestConflict (two conditional writes raced); s3fs turns the
    first into FileExistsError for IfNoneMatch and into OSError(EINVAL) for IfMatch."""
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, FileExistsError) or any(w in text for w in ("precondition", "pre-condition", "conditionalrequestconflict"))
