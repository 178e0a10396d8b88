"""URLs to fsspec filesystems: discovery of input shards, pyarrow wrappers, atomic writes, secret-free config."""

from __future__ import annotations

import errno
import json
import logging
import posixpath
import random
import time
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs

from rayseg.errors import UserError
from rayseg.slides import VENDOR_EXTENSIONS

log = logging.getLogger("rayseg")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", *VENDOR_EXTENSIONS)  # slides: TIFF inside
SHARD_KINDS = {".tar": "tar", ".h5": "h5", ".hdf5": "h5", ".parquet": "parquet", **{e: "image" for e in IMAGE_EXTS}}


@dataclass(frozen=True)
class Shard:
    url: str  # full URL with protocol: the stable prefix of every image_id read from it
    kind: str  # image | tar | h5 | parquet
    size: int
    version: str  # ETag or modification time: what nightly compares to find changed shards


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        return url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        proto = url.split("://")[0] if "://" in url else "file"
        hint = {"s3": "rayseg[s3]", "gs": "rayseg[gcs]", "gcs": "rayseg[gcs]", "az": "rayseg[azure]", "abfs": "rayseg[azure]"}.get(proto)
        extra = f"; install {hint}" if hint else ""
        raise UserError(f"cannot open {url}: {str(e).splitlines()[0]}{extra}") from None


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path)


def kind_of(path: str) -> str | None:
    return SHARD_KINDS.get(posixpath.splitext(path.lower())[1])


def _version(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            value = info[key]
            return str(value.isoformat() if hasattr(value, "isoformat") else value).strip('"')
    return ""


def discover(inputs: tuple[str, ...] | list[str], storage_options: dict | None = None) -> tuple[list[Shard], list[str]]:
    """Expand paths, folders and globs into shards. Returns (shards, ignored files of unknown kinds).

    A path or glob that matches nothing is the user's mistake: UserError, before any work starts.
    """
    shards: dict[str, Shard] = {}
    ignored: list[str] = []
    for inp in inputs:
        fs, path = filesystem(inp, storage_options)
        is_glob = any(ch in path for ch in "*?[")
        if is_glob:
            matches = fs.glob(path, detail=True)
            if not matches:
                raise UserError(f"the glob {inp} matches no files")
            infos = list(matches.values())
        else:
            try:
                info = fs.info(path)
            except FileNotFoundError:
                raise UserError(f"the input {inp} does not exist") from None
            except PermissionError:
                raise UserError(f"the input {inp} cannot be read: permission denied") from None
            infos = [info]
        for info in infos:
            if info["type"] == "directory":
                found = fs.find(info["name"], detail=True)
                files = [i for i in found.values() if i["type"] == "file"]
                if not files:
                    raise UserError(f"the folder {inp} holds no files")
                explicit = False
            else:
                files, explicit = [info], not is_glob  # a glob, like a folder, may catch files of other kinds
            for f in files:
                name = f["name"]
                kind = kind_of(name)
                if kind is None:
                    if explicit:
                        raise UserError(f"{full_url(fs, name)} is not a supported shard (images {', '.join(IMAGE_EXTS)}, .tar, .h5, .hdf5, .parquet)")
                    ignored.append(full_url(fs, name))
                    continue
                url = full_url(fs, name)
                shards[url] = Shard(url=url, kind=kind, size=int(f.get("size") or 0), version=_version(f))
    if not shards:
        raise UserError(f"no images or shards found in {' '.join(inputs)}")
    return sorted(shards.values(), key=lambda s: s.url), ignored


def pyarrow_filesystem(url: str, storage_options: dict | None = None):
    """(pyarrow FileSystem, path) for `url`, wrapping the fsspec one so every protocol fsspec knows works."""
    import pyarrow.fs as pafs

    fs, path = filesystem(url, storage_options)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem(), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_nonempty(url: str, storage_options: dict | None = None) -> bool:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.isdir(path) and bool(fs.ls(path))
    except FileNotFoundError:
        return False


def remove(url: str, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# Object stores answer 503 SlowDown, drop connections or time out for a moment; s3fs and botocore retry some of
# that. This is the layer above them: a few more tries spaced by exponential backoff, for any fsspec protocol.
RETRY_ATTEMPTS, RETRY_BASE_S, RETRY_MAX_S = 3, 1.0, 8.0
PERMANENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError, UserError)
TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
                    errno.EPIPE, getattr(errno, "EREMOTEIO", 121)}
TRANSIENT_WORDS = ("slowdown", "reduce your request rate", "serviceunavailable", "service unavailable", "internalerror",
                   "503", "500", "502", "504", "timed out", "timeout", "connection", "disconnected", "reset by peer",
                   "temporarily", "throttl")

# the same, as patterns for Ray Data's write retry (DataContext.retried_io_errors: substring, then regex)
RETRIED_IO_ERRORS = ("SlowDown", "reduce your request rate", "ServiceUnavailable", "Service Unavailable", "InternalError",
                     "Errno 16]", "Errno 121]", "Connection reset", "ConnectionClosed", "Server disconnected", "timed out")


def is_transient(e: BaseException) -> bool:
    """Worth another try: a busy, unreachable or timed-out store; never a missing file or a refused permission."""
    if isinstance(e, PERMANENT_ERRORS):
        return False
    if isinstance(e, (ConnectionError, TimeoutError)) or getattr(e, "errno", None) in TRANSIENT_ERRNOS:
        return True
    text = f"{type(e).__name__} {e}".lower()
    return any(w in text for w in TRANSIENT_WORDS)


def retry(fn, *args, what: str = "storage call", attempts: int = RETRY_ATTEMPTS, **kwargs):
    """fn(*args, **kwargs), tried again on transient storage errors with exponential backoff and jitter."""
    for attempt in range(1, attempts + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised unless transient and tries are left
            if attempt == attempts or not is_transient(e):
                raise
            delay = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("%s failed (%s); try %d of %d in %.1f s", what, type(e).__name__, attempt + 1, attempts, delay)
            time.sleep(delay)


def write_json(url: str, data: dict, storage_options: dict | None = None) -> None:
    """Write JSON so that a reader sees the old file or the whole new one (temp file, then move)."""
    retry(_write_json, url, data, storage_options, what=f"writing {redact_url(url)}")


def _write_json(url: str, data: dict, storage_options: dict | None = None) -> None:
    fs, path = filesystem(url, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
    with fs.open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
    fs.mv(tmp, path)


def read_json(url: str, storage_options: dict | None = None) -> dict:
    fs, path = filesystem(url, storage_options)
    with fs.open(path, "r") as f:
        return json.load(f)


def redact_url(url: str) -> str:
    """A URL without user:password@ (some fsspec URLs carry credentials there)."""
    proto, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{proto}://***@{rest.split('@', 1)[1]}"
    return url


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *[p.strip("/") for p in parts]])


SECRET_HINTS = ("key", "secret", "token", "password", "credential", "sas", "signature", "session")


def redact(options: dict) -> dict:
    """Storage options safe to log or write: values of anything that could be a credential replaced."""
    out = {}
    for k, v in options.items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(h in str(k).lower() for h in SECRET_HINTS):
            out[k] = "***"
        else:
            out[k] = v
    return out
