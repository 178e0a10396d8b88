"""Synthetic image archives, deterministic by seed: demos, tests and benchmarks use them, nothing is downloaded.

    rayseg synth data/train --layout h5 --count 400 --shards 4 --seed 0
    rayseg synth data/unlabelled --layout parquet --count 1000 --shards 8
    rayseg synth s3://bucket/synth --layout tar --count 100 --storage-options '{"endpoint_url": "http://localhost:9000"}'

Sample `i` of seed `s` is drawn from its own generator seeded with (s, i), so an archive's content does not
depend on how it is sharded, and the same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import tarfile
from typing import Callable

import cv2
import numpy as np

from rayseg.cliutil import add_config_arguments, config_from_args
from rayseg.config import GENERATORS, LAYOUTS, SynthConfig
from rayseg.errors import UserError

# class 1 is a disc, class 2 a rectangle, ...; classes past the last kind cycle through them again
SHAPE_KINDS = ("disc", "rectangle", "triangle", "ellipse", "ring")
LABELLED_LAYOUTS = ("h5", "folders", "tar")
UNLABELLED_LAYOUTS = ("files", "tar", "h5", "parquet")
IMAGE_FORMATS = {"png": ".png", "jpeg": ".jpg"}
# below this, the smallest shapes shrink to a few pixels and stop being learnable
SMALLEST_SIZE = 16

Sample = tuple[np.ndarray, np.ndarray]


# ---- drawing ---------------------------------------------------------------------------------------


def class_names(num_classes: int, generator: str = "shapes") -> list[str]:
    """Names for the classes of an archive: background, then the shape kinds (disc-2, ... once they cycle)."""
    if generator == "blobs":
        return ["background", "blob"]
    names = ["background"]
    for c in range(1, num_classes):
        kind = SHAPE_KINDS[(c - 1) % len(SHAPE_KINDS)]
        cycle = (c - 1) // len(SHAPE_KINDS)
        names.append(kind if cycle == 0 else f"{kind}-{cycle + 1}")
    return names


def class_colour(c: int) -> np.ndarray:
    """The characteristic RGB colour of shape class c >= 1: saturated, unlike the greyish background."""
    # golden-ratio steps keep the first few hues far apart however many classes there are
    hue = ((c - 1) * 0.618034) % 1.0
    value = 0.95 if (c - 1) // len(SHAPE_KINDS) % 2 == 0 else 0.65
    return np.array(colorsys.hsv_to_rgb(hue, 0.85, value), np.float32) * 255


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth low-frequency texture: a coarse random grid, cubic-upsampled; greyish with a slight tint."""
    gh, gw = rng.integers(3, 7, size=2)
    grey = rng.uniform(70, 170, size=(gh, gw, 1))
    tint = rng.uniform(-15, 15, size=(gh, gw, 3))
    coarse = (grey + tint).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)


def _shape_footprint(rng: np.random.Generator, kind: str, height: int, width: int) -> np.ndarray:
    """A boolean HxW footprint of one shape. Drawn without anti-aliasing so mask and image agree on every pixel."""
    canvas = np.zeros((height, width), np.uint8)
    side = min(height, width)
    r = max(4.0, rng.uniform(0.08, 0.25) * side)
    cx = rng.uniform(r * 0.5, width - r * 0.5)
    cy = rng.uniform(r * 0.5, height - r * 0.5)
    center = (int(round(cx)), int(round(cy)))
    if kind == "disc":
        cv2.circle(canvas, center, int(round(r)), 1, thickness=-1, lineType=cv2.LINE_8)
    elif kind == "rectangle":
        box = ((cx, cy), (2 * r * rng.uniform(0.6, 1.0), 2 * r * rng.uniform(0.6, 1.0)), rng.uniform(0, 90))
        cv2.fillPoly(canvas, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1, lineType=cv2.LINE_8)
    elif kind == "triangle":
        angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3 + rng.uniform(-0.3, 0.3, 3)
        points = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1, lineType=cv2.LINE_8)
    elif kind == "ellipse":
        # clearly elongated, so it is not mistaken for a disc
        axes = (int(round(r)), int(round(r * rng.uniform(0.35, 0.6))))
        cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), 0, 360, 1, thickness=-1, lineType=cv2.LINE_8)
    elif kind == "ring":
        thickness = max(3, int(round(r * 0.35)))
        cv2.circle(canvas, center, int(round(r)), 1, thickness=thickness, lineType=cv2.LINE_8)
    else:
        raise ValueError(f"unknown shape kind {kind!r}")
    return canvas.astype(bool)


def _finish(image: np.ndarray, rng: np.random.Generator, noise_low: float, noise_high: float) -> np.ndarray:
    noisy = image + rng.normal(0, rng.uniform(noise_low, noise_high), size=image.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def make_sample(rng: np.random.Generator, height: int, width: int, num_classes: int) -> Sample:
    """(image RGB uint8 HxWx3, mask uint8 HxW): 1-4 shapes on a textured background; a later shape covers an earlier one."""
    image = _textured_background(rng, height, width)
    mask = np.zeros((height, width), np.uint8)
    if num_classes > 1:
        for _ in range(rng.integers(1, 5)):
            c = int(rng.integers(1, num_classes))
            inside = _shape_footprint(rng, SHAPE_KINDS[(c - 1) % len(SHAPE_KINDS)], height, width)
            brightness = rng.uniform(0.85, 1.1)
            image[inside] = class_colour(c) * brightness + rng.normal(0, 10, size=3)
            mask[inside] = c
    return _finish(image, rng, 4, 12), mask


def make_blobs(rng: np.random.Generator, height: int, width: int) -> Sample:
    """(image, mask) with two classes: bright elliptic blobs (1) on dark noise (0). Deliberately unlike make_sample."""
    image = np.full((height, width, 3), rng.uniform(40, 90), np.float32)
    image += rng.normal(0, 15, size=(height, width, 1))  # grey noise, the same in every channel
    mask = np.zeros((height, width), np.uint8)
    side = min(height, width)
    for _ in range(rng.integers(1, 6)):
        canvas = np.zeros((height, width), np.uint8)
        center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (max(2, int(side * rng.uniform(0.05, 0.2))), max(2, int(side * rng.uniform(0.05, 0.2))))
        cv2.ellipse(canvas, center, axes, rng.uniform(0, 180), 0, 360, 1, thickness=-1, lineType=cv2.LINE_8)
        inside = canvas.astype(bool)
        image[inside] = rng.uniform(170, 240) + rng.normal(0, 5, size=3)
        mask[inside] = 1
    return _finish(image, rng, 3, 8), mask


# ---- archive writing --------------------------------------------------------------------------------


def check_options(layout: str, count: int, *, labelled: bool, seed: int, num_classes: int, min_size: int,
                  max_size: int, shards: int, generator: str, image_format: str) -> None:
    """UserError for options no archive can be written with."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if labelled and layout not in LABELLED_LAYOUTS:
        raise UserError(f"layout {layout} holds no masks; use --no-labelled, or a labelled layout ({', '.join(LABELLED_LAYOUTS)})")
    if not labelled and layout not in UNLABELLED_LAYOUTS:
        raise UserError(f"layout {layout} is for images with masks; for images alone use --layout files")
    if generator not in GENERATORS:
        raise UserError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"unknown image format {image_format!r}; choose one of {', '.join(IMAGE_FORMATS)}")
    if count < 1:
        raise UserError("--count must be at least 1")
    if seed < 0:
        raise UserError("--seed must be zero or more")
    if not 2 <= num_classes <= 255:
        raise UserError("--num-classes must be between 2 and 255")
    if generator == "blobs" and num_classes != 2:
        raise UserError("the blobs generator has exactly 2 classes; leave out --num-classes or give 2")
    if min_size < SMALLEST_SIZE:
        raise UserError(f"--min-size must be at least {SMALLEST_SIZE}")
    if min_size > max_size:
        raise UserError(f"--min-size {min_size} is larger than --max-size {max_size}")
    if shards < 1:
        raise UserError("--shards must be at least 1")
    if shards > count and layout not in ("files", "folders"):
        raise UserError(f"--shards {shards} is more than --count {count}; a shard would be empty")


def sample_keys(count: int) -> list[str]:
    """img-000000, img-000001, ...: zero-padded so that they sort in order."""
    digits = max(6, len(str(count - 1)))
    return [f"img-{i:0{digits}d}" for i in range(count)]


def shard_ranges(count: int, shards: int) -> list[range]:
    """The sample indices of each shard: 0..count-1 cut into `shards` consecutive runs of near-equal size."""
    bounds = np.linspace(0, count, shards + 1).round().astype(int)
    return [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _encode(array: np.ndarray, ext: str) -> bytes:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, array, params)
    if not ok:
        raise RuntimeError(f"cv2 could not encode a {array.shape} array as {ext}")
    return buf.tobytes()


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # fixed owner and time: the same seed must give the same bytes
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _h5_bytes(images: np.ndarray, masks: np.ndarray | None) -> bytes:
    """An HDF5 file in memory: h5py needs a seekable file, which remote fsspec files opened "wb" are not."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        # one chunk per image, so a reader can take any one image without reading its neighbours
        f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]), track_times=False)
        if masks is not None:
            # masks are mostly runs of one value: gzip shrinks them a lot; noisy images it barely shrinks
            f.create_dataset("masks", data=masks, chunks=(1, *masks.shape[1:]), compression="gzip", track_times=False)
    return buffer.getvalue()


def _parquet_bytes(keys: list[str], encoded: list[bytes]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"key": pa.array(keys, pa.string()), "image": pa.array(encoded, pa.binary())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def write_archive(url: str, layout: str, count: int, *, labelled: bool, seed: int = 0, num_classes: int = 3,
                  min_size: int = 64, max_size: int = 128, shards: int = 1, generator: str = "shapes",
                  image_format: str = "png", metadata: bool = False, storage_options: dict | None = None) -> dict:
    """Write `count` synthetic images (and masks, if `labelled`) under `url` in one layout; returns a summary.

    Layouts: h5 (shard-NNNNN.h5: `images` (N,H,W,3), `masks` (N,H,W); one size per shard), folders
    (images/KEY.png, masks/KEY.png), tar (WebDataset shard-NNNNN.tar: KEY.png, KEY.mask.png, and KEY.json
    with `metadata`), files (KEY.png) and parquet (shard-NNNNN.parquet: `key` string, `image` encoded bytes).
    Images are .jpg instead of .png with image_format "jpeg"; masks are always PNG. `shards` is ignored by
    files and folders. The blobs generator always has 2 classes. A shard is built in memory, then uploaded.
    """
    import fsspec

    if generator == "blobs" and num_classes == 3:
        num_classes = 2  # the signature's default is the shapes one
    check_options(layout, count, labelled=labelled, seed=seed, num_classes=num_classes, min_size=min_size,
                  max_size=max_size, shards=shards, generator=generator, image_format=image_format)
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    keys = sample_keys(count)
    ext = IMAGE_FORMATS[image_format]

    def size(stream: int, n: int) -> tuple[int, int]:
        h, w = np.random.default_rng([seed, stream, n]).integers(min_size, max_size + 1, size=2)
        return int(h), int(w)

    def draw(i: int, hw: tuple[int, int] | None = None) -> Sample:
        h, w = hw or size(1, i)
        rng = np.random.default_rng([seed, 0, i])
        return make_blobs(rng, h, w) if generator == "blobs" else make_sample(rng, h, w, num_classes)

    written: list[str] = []
    folders: set[str] = set()  # each makedirs is a request on object stores: once per folder

    def put(relative: str, data: bytes) -> None:
        path = f"{root}/{relative}"
        folder = path.rsplit("/", 1)[0]
        if folder not in folders:
            fs.makedirs(folder, exist_ok=True)
            folders.add(folder)
        with fs.open(path, "wb") as f:
            f.write(data)
        written.append(f"{url.rstrip('/')}/{relative}")

    if layout in ("files", "folders"):
        for i, key in enumerate(keys):
            image, mask = draw(i)
            if layout == "files":
                put(f"{key}{ext}", _encode(image, ext))
            else:
                put(f"images/{key}{ext}", _encode(image, ext))
                put(f"masks/{key}.png", _encode(mask, ".png"))
    else:
        for shard, indices in enumerate(shard_ranges(count, shards)):
            _write_shard(put, layout, shard, indices, keys, draw, size, labelled, ext, metadata)
    return {"url": url, "layout": layout, "labelled": labelled, "count": count, "seed": seed, "generator": generator,
            "num_classes": num_classes, "class_names": class_names(num_classes, generator), "files": written}


def _write_shard(put: Callable[[str, bytes], None], layout: str, shard: int, indices: range, keys: list[str],
                 draw: Callable[..., Sample], size: Callable[[int, int], tuple[int, int]], labelled: bool,
                 ext: str, metadata: bool) -> None:
    name = f"shard-{shard:05d}"
    if layout == "h5":
        hw = size(2, shard)  # HDF5 datasets are rectangular: one size for the whole shard
        samples = [draw(i, hw) for i in indices]
        masks = np.stack([m for _, m in samples]) if labelled else None
        put(f"{name}.h5", _h5_bytes(np.stack([im for im, _ in samples]), masks))
    elif layout == "tar":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            # a sample's members are adjacent, as WebDataset readers expect
            for i in indices:
                image, mask = draw(i)
                _tar_member(tar, f"{keys[i]}{ext}", _encode(image, ext))
                if labelled:
                    _tar_member(tar, f"{keys[i]}.mask.png", _encode(mask, ".png"))
                if metadata:
                    _tar_member(tar, f"{keys[i]}.json", json.dumps({"key": keys[i]}).encode())
        put(f"{name}.tar", buffer.getvalue())
    elif layout == "parquet":
        encoded = [_encode(draw(i)[0], ext) for i in indices]
        put(f"{name}.parquet", _parquet_bytes([keys[i] for i in indices], encoded))
    else:
        raise ValueError(f"layout {layout!r} is not sharded")


# ---- command line -----------------------------------------------------------------------------------


def _complete(config: SynthConfig) -> SynthConfig:
    """Defaults that depend on other options, then the checks of check_options."""
    import dataclasses

    labelled = config.layout in LABELLED_LAYOUTS if config.labelled is None else config.labelled
    num_classes = (2 if config.generator == "blobs" else 3) if config.num_classes is None else config.num_classes
    config = dataclasses.replace(config, labelled=labelled, num_classes=num_classes)
    check_options(config.layout, config.count, labelled=config.labelled, seed=config.seed, num_classes=config.num_classes,
                  min_size=config.min_size, max_size=config.max_size, shards=config.shards, generator=config.generator,
                  image_format=config.image_format)
    return config


def run(config: SynthConfig) -> dict:
    config = _complete(config)
    return write_archive(config.out, config.layout, config.count, labelled=config.labelled, seed=config.seed,
                         num_classes=config.num_classes, min_size=config.min_size, max_size=config.max_size,
                         shards=config.shards, generator=config.generator, image_format=config.image_format,
                         metadata=config.metadata, storage_options=config.storage_options)


def main(args: argparse.Namespace) -> int:
    summary = run(config_from_args(SynthConfig, args))
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("synth", help="write a synthetic image archive (deterministic by seed)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, SynthConfig)
    parser.set_defaults(func=main)
    return parser
