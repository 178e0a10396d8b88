"""rayseg.objects: the per-object rows (area, bbox, centroid, RLE, confidence) of one mask."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from rayseg.objects import extract
from rayseg.stats import class_pixels, components

K = 3


def labelled_mask(rng: np.random.Generator, h: int = 60, w: int = 70) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    for _ in range(25):
        cv2.circle(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(0, 6)), int(rng.integers(1, K)), -1)
    mask[rng.random((h, w)) < 0.01] = 2  # single-pixel specks
    return mask


def test_extract_accounts_for_every_pixel_and_component():
    rng = np.random.default_rng(1)
    mask = labelled_mask(rng)
    conf = rng.integers(0, 256, mask.shape, dtype=np.uint8)
    objs = extract(mask, conf, K, min_area=0)
    counts = class_pixels(mask, K)
    for c in range(1, K):
        mine = [o for o in objs if o["class"] == c]
        assert sum(o["area"] for o in mine) == counts[c]
        assert len(mine) == components(mask, K, counts)[c]
    n, labels = cv2.connectedComponents((mask == 2).astype(np.uint8), connectivity=8)
    for o in (o for o in objs if o["class"] == 2):
        m = coco_mask.decode({"size": o["rle"]["size"], "counts": o["rle"]["counts"].encode()}).astype(bool)
        # the RLE is exactly one 8-connected component of its class, the one the row describes
        ks = np.unique(labels[m])
        assert len(ks) == 1 and ks[0] > 0 and (labels == ks[0]).sum() == o["area"] == m.sum()
        # and the same string pycocotools gives for the full-size binary mask
        assert o["rle"]["counts"] == coco_mask.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        ys, xs = np.nonzero(m)
        assert o["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert o["centroid"] == pytest.approx([xs.mean(), ys.mean()])
        assert o["mean_confidence"] == pytest.approx(conf[m].mean() / 255, rel=1e-6)
    big = extract(mask, conf, K, min_area=5)
    assert big == [o for o in objs if o["area"] >= 5] and len(big) < len(objs)
