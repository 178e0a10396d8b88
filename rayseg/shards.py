"""Shard readers: image files, WebDataset tar, HDF5 and Parquet shards into rows of encoded bytes.

Every reader yields row dicts `{image_id, source, shard, data, format, error}`. `format` is "encoded"
(bytes of an image file) or "npy" (an array from HDF5, saved with np.save so decode reads it without pickle).
A shard that cannot be opened, or that breaks part-way, yields one error row for what it could not read:
nothing is dropped without a row saying so.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator

import numpy as np

from rayseg.storage import IMAGE_EXTS, RETRY_ATTEMPTS, filesystem, is_transient, redact_url, retry

ROW_COLUMNS = ("image_id", "source", "shard", "data", "format", "error")


def row(image_id: str, shard: str, data: bytes = b"", fmt: str = "encoded", error: str | None = None, source: str | None = None) -> dict:
    return {"image_id": image_id, "source": source or shard, "shard": shard, "data": data, "format": fmt, "error": error}


def error_reason(e: BaseException) -> str:
    """'ExceptionType: first line of its message', the part of an error row that says what went wrong."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_image_file(url: str, storage_options: dict) -> Iterator[dict]:
    try:
        fs, path = filesystem(url, storage_options)
        data = retry(fs.cat_file, path, what=f"reading {redact_url(url)}")
    except Exception as e:  # noqa: BLE001 - any storage failure is this image's error row
        tries = f" after {RETRY_ATTEMPTS} tries" if is_transient(e) else ""
        yield row(url, url, error=f"could not read the file{tries} ({error_reason(e)})")
        return
    yield row(url, url, data=data)


def _tar_key(name: str) -> tuple[str, str]:
    """WebDataset: the key is the member path up to the first dot of its basename; the rest is the extension."""
    d, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(d, stem), (dot + ext).lower()


def _unsafe_member(name: str) -> bool:
    """Absolute or climbing ('..') member paths: what tar path-traversal attacks use. Refused, never read."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def tar_samples(url: str, storage_options: dict) -> Iterator[tuple[str, str | None, dict[str, bytes] | None, str | None]]:
    """Stream a WebDataset tar shard as (image_id, key, {extension: bytes}, error) per sample.

    A sample is the run of adjacent members sharing a key. Member names are only ever keys, never filesystem
    paths; absolute or climbing names are refused. A key that comes back later is either more metadata for a
    sample already given (skipped) or a second image under that key (its own sample, id `key#2`). A shard
    that breaks part-way ends with one error naming how far it got; the samples before it stand.
    """
    key, members = None, {}
    seen: dict[str, int] = {}  # sample ids given so far, and how often

    def sample_id(name: str) -> str:
        n = seen.get(name, 0)
        seen[name] = n + 1
        return f"{url}::{name}" if n == 0 else f"{url}::{name}#{n + 1}"

    def flush():
        if seen.get(key) and not any(e in IMAGE_EXTS for e in members):
            return None
        return sample_id(key), key, members, None

    count = 0
    try:
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = (None, None) if _unsafe_member(member.name) else _tar_key(member.name)
                if key is not None and k != key and (done := flush()) is not None:
                    yield done
                if k is None:
                    count += 1
                    key, members = None, {}
                    yield sample_id(member.name), None, None, f"tar member {member.name!r} has an unsafe path (absolute or with '..'); it was refused, not read"
                    continue
                if k != key:
                    key, members = k, {}
                extracted = tar.extractfile(member)
                members[ext] = extracted.read() if extracted else b""
                count += 1  # members read whole: what "after N members" counts when the shard breaks
        if key is not None and (done := flush()) is not None:
            yield done
        elif count == 0:
            yield url, None, None, "tar shard holds no files"
    except Exception as e:  # noqa: BLE001 - a broken shard becomes an error row, the samples before it stand
        where = f"after {count} member{'s' if count > 1 else ''}" if count else "at its start"
        pending = f"{url}::{key}" if key is not None else f"{url}::#unreadable"
        yield pending, key, None, f"tar shard is unreadable {where} ({error_reason(e)})"


def member_kinds(members: dict[str, bytes]) -> str:
    return ", ".join(sorted(e or "a member without extension" for e in members)) or "nothing"


def read_tar(url: str, storage_options: dict) -> Iterator[dict]:
    for image_id, key, members, error in tar_samples(url, storage_options):
        images = [e for e in members or () if e in IMAGE_EXTS]
        if error is None and not images:
            error = f"tar sample {key!r} has no image member (found {member_kinds(members)})"
        yield row(image_id, url, error=error) if error else row(image_id, url, data=members[images[0]])


def read_h5(url: str, storage_options: dict, h5_key: str = "images", chunk: int = 32) -> Iterator[dict]:
    """Read an HDF5 shard straight from the fsspec file object, a slice of images at a time."""
    import h5py

    i = 0
    try:
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f, h5py.File(f, "r") as h5:
            if h5_key not in h5:
                names = ", ".join(sorted(h5.keys())) or "none"
                yield row(url, url, error=f"HDF5 shard has no dataset {h5_key!r} (datasets: {names}; see --h5-key)")
                return
            ds = h5[h5_key]
            if not isinstance(ds, h5py.Dataset):
                yield row(url, url, error=f"HDF5 entry {h5_key!r} is a group, not a dataset")
                return
            if ds.dtype.kind not in "biuf":
                yield row(url, url, error=f"HDF5 dataset {h5_key!r} has non-numeric dtype {ds.dtype}")
                return
            if ds.ndim not in (3, 4):
                yield row(url, url, error=f"HDF5 dataset {h5_key!r} has shape {ds.shape}; expected (N,H,W) or (N,H,W,C)")
                return
            n = ds.shape[0]
            for start in range(0, n, chunk):
                block = ds[start : start + chunk]
                for j, arr in enumerate(block):
                    buf = io.BytesIO()
                    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
                    yield row(f"{url}::{start + j}", url, data=buf.getvalue(), fmt="npy")
                i = start + len(block)
    except Exception as e:  # noqa: BLE001
        where = f"after {i} images" if i else "at open"
        yield row(f"{url}::{i}" if i else url, url, error=f"HDF5 shard is unreadable {where} ({error_reason(e)})")


def read_parquet(url: str, storage_options: dict, image_column: str = "image") -> Iterator[dict]:
    import pyarrow.parquet as pq

    i = 0
    try:
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if image_column not in names:
                yield row(url, url, error=f"Parquet shard has no column {image_column!r} (columns: {', '.join(names)}; see --image-column)")
                return
            for batch in pf.iter_batches(batch_size=64, columns=[image_column]):
                for value in batch.column(0).to_pylist():
                    image_id = f"{url}::{i}"
                    if value is None:
                        yield row(image_id, url, error=f"row {i} has a null {image_column!r}")
                    elif not isinstance(value, (bytes, bytearray)):
                        yield row(image_id, url, error=f"row {i}: column {image_column!r} holds {type(value).__name__}, not image bytes")
                    else:
                        yield row(image_id, url, data=bytes(value))
                    i += 1
    except Exception as e:  # noqa: BLE001
        where = f"after {i} rows" if i else "at open"
        yield row(f"{url}::{i}" if i else url, url, error=f"Parquet shard is unreadable {where} ({error_reason(e)})")


def read_shard(url: str, kind: str, storage_options: dict, h5_key: str = "images", image_column: str = "image") -> Iterator[dict]:
    if kind == "image":
        return read_image_file(url, storage_options)
    if kind == "tar":
        return read_tar(url, storage_options)
    if kind == "h5":
        return read_h5(url, storage_options, h5_key)
    if kind == "parquet":
        return read_parquet(url, storage_options, image_column)
    raise ValueError(f"unknown shard kind {kind}")


def to_batch(rows: list[dict], columns: tuple[str, ...] = ROW_COLUMNS) -> dict[str, np.ndarray]:
    return {c: np.array([r[c] for r in rows], dtype=object) for c in columns}


def batches(rows: Iterable[dict], columns: tuple[str, ...] = ROW_COLUMNS, size: int = 32) -> Iterator[dict[str, np.ndarray]]:
    """Row dicts -> batches of `size` rows (the last one shorter), pulled from `rows` as they are needed."""
    chunk: list[dict] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) >= size:
            yield to_batch(chunk, columns)
            chunk = []
    if chunk:
        yield to_batch(chunk, columns)


def read_units(batch: dict[str, np.ndarray], storage_options: dict, h5_key: str, image_column: str, rows_per_batch: int = 32) -> Iterator[dict]:
    """Ray Data stage: a batch of work units (shard URL + kind; image files come several to a unit) -> row batches.

    A generator, so a large shard streams out in blocks of `rows_per_batch` rows instead of all at once.
    """
    rows = (r for urls, kind in zip(batch["urls"], batch["kind"]) for url in urls
            for r in read_shard(url, kind, storage_options, h5_key, image_column))
    yield from batches(rows, ROW_COLUMNS, rows_per_batch)
