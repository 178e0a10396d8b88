"""The fingerprint of a labelled training set: what `rayseg.plan` decides from, measured as nnU-Net measures a dataset.

One distributed pass over the decoded pairs (Ray Data's map_batches in `rayseg train` and `rayseg plan`, a plain
loop in tests) gives, per image, its size, channels and dtype, its intensity range and percentiles, the share of
pixels that are exactly 0, its class pixel counts and the areas of its objects; the driver folds those small rows
into one `Fingerprint`. The same pass carries `intensity.partial_stats` with sums, so the training set's channel
counts, dtypes and foreground sums (for `--intensity dataset`) need no pass of their own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from rayseg.intensity import combine_stats, partial_stats, percentile_window

LOW_Q, HIGH_Q = 0.5, 99.5  # per-image percentiles kept: nnU-Net's clip window
MAX_OBJECTS = 256  # object areas kept per image and class: enough for their median and 90th percentile


def image_summary(img: np.ndarray, target: np.ndarray) -> dict:
    """One decoded image (H, W, C in its own dtype) and its class mask -> the numbers the fingerprint folds."""
    lo, hi = percentile_window(img, LOW_Q, HIGH_Q)
    target = np.asarray(target)
    classes = np.bincount(target.ravel()).tolist()
    areas = {}
    for c in range(1, len(classes)):
        if classes[c]:
            n, _, stats, _ = cv2.connectedComponentsWithStats((target == c).astype(np.uint8), connectivity=8)
            areas[c] = sorted(stats[1:, cv2.CC_STAT_AREA].tolist(), reverse=True)[:MAX_OBJECTS]
    return {"h": int(img.shape[0]), "w": int(img.shape[1]), "c": int(img.shape[-1]), "dtype": img.dtype.name,
            "min": float(img.min()), "max": float(img.max()), "low": float(np.mean(lo)), "high": float(np.mean(hi)),
            "zero": float(np.mean(img == 0)), "classes": classes, "areas": areas}


def partial_fingerprint(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage: one batch of decoded pairs -> one row: its images' summaries (JSON) beside partial_stats' sums."""
    dtypes = batch.get("dtype")
    summaries = []
    for i, (img, target) in enumerate(zip(batch["image"], batch["target"])):
        img = img if img.ndim == 3 else img[:, :, None]
        if dtypes is not None and img.dtype.name != dtypes[i]:
            img = img.astype(dtypes[i])  # Ray promotes a batch's images to one dtype; the image's own is what counts
        summaries.append(image_summary(img, target))
    return {**partial_stats(batch, sums=True), "fingerprint": np.array([json.dumps(summaries)], dtype=object)}


@dataclass(frozen=True)
class Fingerprint:
    """The training set in a few numbers (medians over images unless said otherwise)."""

    images: int
    median_size: tuple[int, int]  # (height, width)
    side_range: tuple[int, int]  # the 10th and 90th percentiles of the images' longer sides
    channels: dict[int, int]  # channel count -> images
    dtypes: tuple[str, ...]
    value_range: tuple[float, float]  # the smallest and largest value over the whole set
    window: tuple[float, float]  # medians of each image's 0.5th and 99.5th percentiles
    high_spread: float  # how far the images' 99.5th percentiles move: (p90 - p10) / median of them
    zero_fraction: float  # share of an image's pixels that are exactly 0
    tail: float  # how far an image's maximum lies past its 0.5..99.5 window, in widths of it (hot pixels: far)
    class_fraction: tuple[float, ...]  # per class: its share of all pixels
    class_images: tuple[float, ...]  # per class: the share of images it appears in
    object_area: tuple[float, ...]  # per class: the median area of its objects (8-connected), 0 for background
    object_area_p90: tuple[float, ...]  # per class: the 90th percentile of those areas

    def deep(self) -> bool:
        """Any image deeper than 8 bits (16-bit, signed, float)."""
        return any(d != "uint8" for d in self.dtypes)

    def to_json(self) -> dict:
        d = asdict(self)
        d["channels"] = {str(k): v for k, v in self.channels.items()}
        return d


def _pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def fold(summaries: list[dict], num_classes: int) -> Fingerprint:
    """Image summaries -> the Fingerprint (the driver's part: small rows, one per image)."""
    if not summaries:
        raise ValueError("no images to fingerprint")
    hs, ws = np.array([s["h"] for s in summaries]), np.array([s["w"] for s in summaries])
    highs = np.array([s["high"] for s in summaries])
    pixels = np.zeros(num_classes, np.float64)
    present = np.zeros(num_classes, np.float64)
    areas: list[list[int]] = [[] for _ in range(num_classes)]
    for s in summaries:
        counts = np.array(s["classes"][:num_classes], np.float64)
        pixels[: len(counts)] += counts
        present[: len(counts)] += counts > 0
        for c, a in s["areas"].items():
            if int(c) < num_classes:
                areas[int(c)] += a
    channels: dict[int, int] = {}
    for s in summaries:
        channels[s["c"]] = channels.get(s["c"], 0) + 1
    median_high = float(np.median(highs))
    return Fingerprint(
        images=len(summaries),
        median_size=(int(np.median(hs)), int(np.median(ws))),
        side_range=(int(_pct(np.maximum(hs, ws), 10)), int(_pct(np.maximum(hs, ws), 90))),
        channels=dict(sorted(channels.items())),
        dtypes=tuple(sorted({s["dtype"] for s in summaries})),
        value_range=(min(s["min"] for s in summaries), max(s["max"] for s in summaries)),
        window=(float(np.median([s["low"] for s in summaries])), median_high),
        high_spread=float((_pct(highs, 90) - _pct(highs, 10)) / abs(median_high)) if median_high else 0.0,
        zero_fraction=float(np.median([s["zero"] for s in summaries])),
        tail=float(np.median([(s["max"] - s["high"]) / max(s["high"] - s["low"], 1e-12) for s in summaries])),
        class_fraction=tuple(float(v) for v in pixels / max(pixels.sum(), 1)),
        class_images=tuple(float(v) for v in present / len(summaries)),
        object_area=tuple(0.0 if c == 0 else _pct(a, 50) for c, a in enumerate(areas)),
        object_area_p90=tuple(0.0 if c == 0 else _pct(a, 90) for c, a in enumerate(areas)),
    )


def measure(rows_of, num_classes: int) -> tuple[Fingerprint, dict]:
    """(the Fingerprint, intensity.combine_stats' totals of the same pass). `rows_of(fn, kwargs)` runs
    partial_fingerprint over every batch: intensity.dataset_rows(ds) on Ray, intensity.local_rows(batches) in one
    process."""
    rows = rows_of(partial_fingerprint, {})
    summaries = [s for r in rows for s in json.loads(str(r["fingerprint"]))]
    return fold(summaries, num_classes), combine_stats(rows)
