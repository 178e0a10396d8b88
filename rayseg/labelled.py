"""Labelled data: image/mask pairs from any fsspec URL, as a Ray Dataset of {image_id, image, target, error} rows.

Three layouts, found from what `storage.discover` returns:
- HDF5 shards holding an `images` (N,H,W[,C]) and a `masks` (N,H,W) dataset (names: --h5-key, --mask-key);
- paired folders `images/KEY.<ext>` and `masks/KEY.png` under one root, matched by file stem;
- WebDataset tar shards with `KEY.<image ext>` and `KEY.mask.png` members.
Images keep their own dtype and channels (rayseg.decode.load). Masks are single-channel images (PNG, TIFF of any
integer type, or HDF5) of class indices; with `mask_mode="binary"` every non-zero value is class 1, so instance
masks (one id per object, as cellpose and stardist write them) train a foreground model. A pair that cannot be used (image undecodable, mask missing,
sizes differ, a class value >= K, dataset lengths differ) becomes a row with `error` set, so train and evaluate
can count and report it instead of failing or dropping it silently.
"""

from __future__ import annotations

import io
import logging
import posixpath
from collections.abc import Iterator

import cv2
import numpy as np

from rayseg import storage
from rayseg.decode import EMPTY, TIFF_MAGIC, errors_of, load, ragged_column
from rayseg.shards import batches, error_reason, member_kinds, tar_samples
from rayseg.storage import IMAGE_EXTS, filesystem

log = logging.getLogger("rayseg")

PAIR_COLUMNS = ("image_id", "source", "image_data", "image_format", "mask_data", "mask_format", "error")
MASK_EXT = ".mask.png"
NO_MASK = np.zeros((1, 1), np.uint8)  # stands in for the mask of an error row


def pair(image_id: str, source: str, image: bytes = b"", image_format: str = "encoded", mask: bytes = b"",
         mask_format: str = "encoded", error: str | None = None) -> dict:
    return {"image_id": image_id, "source": source, "image_data": image, "image_format": image_format,
            "mask_data": mask, "mask_format": mask_format, "error": error}


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


# ---- readers: one per layout, each yields pair rows -------------------------------------------------


def read_folder_pair(image_url: str, mask_url: str | None, storage_options: dict) -> Iterator[dict]:
    if mask_url is None:
        yield pair(image_url, image_url, error="mask missing (no masks/<same stem>.png next to images/)")
        return
    try:
        fs, image_path = filesystem(image_url, storage_options)
        image = fs.cat_file(image_path)
        mask = fs.cat_file(filesystem(mask_url, storage_options)[1])
    except Exception as e:  # noqa: BLE001 - any storage failure is this pair's error row
        yield pair(image_url, image_url, error=f"could not read the pair ({error_reason(e)})")
        return
    yield pair(image_url, image_url, image, mask=mask)


def read_tar_pairs(url: str, storage_options: dict) -> Iterator[dict]:
    """Stream a tar shard of `KEY.<image ext>` + `KEY.mask.png` samples (shards.tar_samples does the grouping)."""
    for image_id, key, members, error in tar_samples(url, storage_options):
        images = [e for e in members or () if e in IMAGE_EXTS]
        if error is None and not images:
            error = f"tar sample {key!r} has no image member (found {member_kinds(members)})"
        if error is None and MASK_EXT not in members:
            error = f"mask missing: tar sample {key!r} has no {key}{MASK_EXT} member"
        yield pair(image_id, url, error=error) if error else pair(image_id, url, members[images[0]], mask=members[MASK_EXT])


def read_h5_pairs(url: str, storage_options: dict, h5_key: str = "images", mask_key: str = "masks", chunk: int = 32) -> Iterator[dict]:
    import h5py

    i = 0
    try:
        fs, path = filesystem(url, storage_options)
        with fs.open(path, "rb") as f, h5py.File(f, "r") as h5:
            for key, flag in ((h5_key, "--h5-key"), (mask_key, "--mask-key")):
                if key not in h5 or not isinstance(h5[key], h5py.Dataset):
                    names = ", ".join(sorted(h5.keys())) or "none"
                    yield pair(url, url, error=f"HDF5 shard has no dataset {key!r} (datasets: {names}; see {flag})")
                    return
            images, masks = h5[h5_key], h5[mask_key]
            n, m = images.shape[0], masks.shape[0]
            for start in range(0, min(n, m), chunk):
                stop = min(start + chunk, n, m)
                for j, (img, msk) in enumerate(zip(images[start:stop], masks[start:stop])):
                    yield pair(f"{url}::{start + j}", url, _npy(img), "npy", _npy(msk), "npy")
                i = stop
            for j in range(min(n, m), max(n, m)):
                yield pair(f"{url}::{j}", url, error=f"lengths differ: {h5_key!r} has {n} entries, {mask_key!r} has {m}; entry {j} has no partner")
    except Exception as e:  # noqa: BLE001
        where = f"after {i} pairs" if i else "at open"
        yield pair(f"{url}::{i}" if i else url, url, error=f"HDF5 shard is unreadable {where} ({error_reason(e)})")


def unit_readers(kind: str, urls, masks, storage_options: dict, h5_key: str, mask_key: str) -> Iterator[Iterator[dict]]:
    """One pair reader per URL of a work unit."""
    if kind == "folder":
        return (read_folder_pair(u, m or None, storage_options) for u, m in zip(urls, masks))
    if kind == "tar":
        return (read_tar_pairs(u, storage_options) for u in urls)
    if kind == "h5":
        return (read_h5_pairs(u, storage_options, h5_key, mask_key) for u in urls)
    raise ValueError(f"unknown labelled unit kind {kind}")


def read_pair_units(batch: dict[str, np.ndarray], storage_options: dict, h5_key: str, mask_key: str,
                    rows_per_batch: int = 32) -> Iterator[dict]:
    """Ray Data stage: work units -> batches of pair rows (a generator, so a large shard streams out)."""
    rows = (r for kind, urls, masks in zip(batch["kind"], batch["urls"], batch["masks"])
            for reader in unit_readers(kind, urls, masks, storage_options, h5_key, mask_key) for r in reader)
    yield from batches(rows, PAIR_COLUMNS, rows_per_batch)


# ---- decoding ---------------------------------------------------------------------------------------


def decode_mask(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "npy":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    elif data[:4] in TIFF_MAGIC:
        import tifffile

        arr = tifffile.imread(io.BytesIO(data))  # 16- and 32-bit label images, which OpenCV reads only in part
    else:
        if len(data) == 0:
            raise ValueError("the mask file is empty (0 bytes)")
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None:
            raise ValueError("mask is not a decodable image")
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and (arr[..., :3] == arr[..., :1]).all():
        arr = arr[..., 0]  # a grey mask saved as RGB
    if arr.ndim != 2:
        raise ValueError(f"mask has shape {arr.shape}; expected a single-channel (H,W) image of class indices")
    if arr.dtype.kind not in "biu":
        raise ValueError(f"mask has dtype {arr.dtype}; expected integer class indices")
    return arr


def check_pair(image: np.ndarray, mask: np.ndarray, num_classes: int, mask_mode: str = "semantic") -> np.ndarray:
    """The mask as uint8 (binary mode: non-zero -> 1), or ValueError saying why the pair is unusable."""
    if mask_mode == "binary":
        mask = mask != 0
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size {image.shape[1]}x{image.shape[0]}")
    top = int(mask.max()) if mask.size else 0
    if top >= num_classes or (mask.size and int(mask.min()) < 0):
        bad = sorted(int(v) for v in np.unique(mask) if v >= num_classes or v < 0)
        hint = "; instance masks: --mask-mode binary" if top > num_classes else ""
        raise ValueError(f"mask holds class value(s) {bad[:5]} outside 0..{num_classes - 1} (--num-classes {num_classes}{hint})")
    return mask.astype(np.uint8)


def decode_pairs(batch: dict[str, np.ndarray], num_classes: int, max_pixels: int = 100_000_000,
                 mask_mode: str = "semantic") -> dict[str, np.ndarray]:
    """Ray Data stage: pair rows -> {image_id, source, image, dtype, target, height, width, error} (`dtype`: see
    decode.decode_batch)."""
    n = len(batch["image_id"])
    images, targets, errors = [], [], errors_of(batch)
    for i in range(n):
        img, msk = EMPTY, NO_MASK
        if errors[i] is None:
            try:
                img = load(batch["image_data"][i], batch["image_format"][i], max_pixels)
            except Exception as e:  # noqa: BLE001 - whatever the codec raised, it is this pair's error
                errors[i] = f"image undecodable ({e})"
        if errors[i] is None:
            try:
                msk = check_pair(img, decode_mask(batch["mask_data"][i], batch["mask_format"][i]), num_classes, mask_mode)
            except Exception as e:  # noqa: BLE001
                errors[i], img = str(e), EMPTY
        images.append(img)
        targets.append(msk)
    return {
        "image_id": batch["image_id"], "source": batch["source"], "image": ragged_column(images),
        "dtype": np.array([im.dtype.name for im in images], dtype=object), "target": ragged_column(targets),
        "height": np.array([im.shape[0] if e is None else 0 for im, e in zip(images, errors)], np.int32),
        "width": np.array([im.shape[1] if e is None else 0 for im, e in zip(images, errors)], np.int32),
        "error": np.array(errors, dtype=object),
    }


# ---- discovery and the dataset ----------------------------------------------------------------------


def _folder_root(url: str) -> tuple[str, str, str] | None:
    """(root, 'images' | 'masks', stem) for URLs like ROOT/images/a/b.png; None for anything else."""
    parts = url.split("/")
    for idx in range(len(parts) - 2, -1, -1):
        if parts[idx] in ("images", "masks"):
            rel = "/".join(parts[idx + 1 :])
            return "/".join(parts[:idx]), parts[idx], posixpath.splitext(rel)[0]
    return None


def pair_units(shards: list[storage.Shard], files_per_unit: int = 16) -> tuple[list[dict], list[str]]:
    """Work units for read_pair_units, and the loose files that belong to no pair layout (ignored)."""
    units, ignored = [], []
    images: dict[tuple[str, str], str] = {}
    masks: dict[tuple[str, str], str] = {}
    for s in shards:
        if s.kind in ("tar", "h5"):
            units.append({"kind": s.kind, "urls": [s.url], "masks": [""]})
        elif s.kind == "image" and (where := _folder_root(s.url)):
            root, side, stem = where
            (images if side == "images" else masks)[(root, stem)] = s.url
        else:
            ignored.append(s.url)  # Parquet shards and loose images hold no masks
    orphans = sorted(set(masks) - set(images))
    ignored += [masks[k] for k in orphans]  # a mask without an image is not a pair; listed, not counted as bad
    keys = sorted(images)
    for i in range(0, len(keys), files_per_unit):
        chunk = keys[i : i + files_per_unit]
        units.append({"kind": "folder", "urls": [images[k] for k in chunk], "masks": [masks.get(k, "") for k in chunk]})
    return units, ignored


def find_pairs(inputs, storage_options: dict | None = None) -> tuple[list[dict], list[str]]:
    """(work units, ignored URLs) of labelled inputs; UserError, before any Ray work, when they hold no pairs."""
    from rayseg.errors import UserError

    shards, ignored = storage.discover(tuple(inputs), storage_options)
    units, loose = pair_units(shards)
    if not units:
        raise UserError(f"no labelled data in {' '.join(inputs)}: expected HDF5 or tar shards, or images/ and masks/ folders")
    return units, ignored + loose


def read_labelled(inputs, num_classes: int, storage_options: dict | None = None, h5_key: str = "images",
                  mask_key: str = "masks", max_pixels: int = 100_000_000, batch_size: int = 16, units: list[dict] | None = None,
                  stage_cpus: tuple[float, float] = (1, 1), mask_mode: str = "semantic"):
    """(Ray Dataset of decoded pair rows, ignored URLs). `units` from find_pairs saves discovering `inputs` again;
    `stage_cpus` are the Ray CPUs of the read and decode tasks (fractions where predictor actors run beside them)."""
    import ray

    ignored: list[str] = []
    if units is None:
        units, ignored = find_pairs(inputs, storage_options)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    ds = ds.map_batches(read_pair_units, batch_size=1, fn_kwargs={"storage_options": storage_options or {}, "h5_key": h5_key, "mask_key": mask_key},
                        num_cpus=stage_cpus[0])
    ds = ds.map_batches(decode_pairs, batch_size=batch_size, fn_kwargs={"num_classes": num_classes, "max_pixels": max_pixels, "mask_mode": mask_mode},
                        num_cpus=stage_cpus[1])
    return ds, ignored


def split_errors(ds, what: str):
    """Materialize `ds`; returns (dataset of good pairs, number of good pairs, [(image_id, error)] of bad ones).

    Each bad pair gets a log line: the user sees which files to fix.
    """
    ds = ds.materialize()
    rows = ds.select_columns(["image_id", "error"]).take_all()
    bad = [(r["image_id"], r["error"]) for r in rows if isinstance(r["error"], str)]
    for image_id, error in bad:
        log.warning("%s: skipping %s: %s", what, image_id, error)
    if bad:
        log.warning("%s: skipped %d bad pair(s) of %d", what, len(bad), len(rows))
    good = ds.filter(lambda r: not isinstance(r["error"], str)) if bad else ds
    return good, len(rows) - len(bad), bad
