"""The per-object table (--objects): checked against the masks it came from, and queried with DuckDB."""

from __future__ import annotations

import logging

import cv2
import duckdb
import numpy as np
import pandas as pd
from pycocotools import mask as coco_mask

from conftest import png_bytes, tar_bytes
from rayseg import segment
from rayseg.stats import decode_png

K = 3


def blobs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth random picture: a model sees regions in it, so masks hold objects of several sizes."""
    img = np.zeros((h, w, 3), np.uint8)
    for _ in range(12):
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(2, 20)),
                   tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
    salt = rng.random((h, w)) < 0.03  # isolated odd pixels: specks in the mask, for --min-area to drop
    img[salt] = rng.integers(0, 256, (int(salt.sum()), 3), dtype=np.uint8)
    return img


def make_checkpoint(path) -> str:
    """A random UNet saved as a rayseg checkpoint, head bias zeroed: a random bias alone decides the class of
    most pixels, so without it the masks follow the picture and hold components of both classes and many sizes."""
    import torch

    from rayseg.models import ModelCard, UNet, save_checkpoint

    torch.manual_seed(0)
    model = UNet(K)
    with torch.no_grad():
        model.head.bias.zero_()
    save_checkpoint(model, ModelCard("unet", K, ("background", "thing", "stuff"), input_size=32), str(path))
    return str(path)


def test_segment_objects_table(ray_local, tmp_path, caplog, monkeypatch):
    rng = np.random.default_rng(3)
    members = {f"s{i}.png": png_bytes(blobs(rng, h, w)) for i, (h, w) in enumerate([(48, 64), (64, 64), (40, 72), (56, 56)])}
    members["s9.png"] = b"not a png at all"
    (tmp_path / "shard.tar").write_bytes(tar_bytes(members))
    out = tmp_path / "out"
    min_area = 5
    monkeypatch.setenv("RAYSEG_PROGRESS_INTERVAL", "0.2")
    caplog.set_level(logging.INFO, logger="rayseg")
    summary = segment(inputs=(str(tmp_path / "shard.tar"),), output=str(out), checkpoint=make_checkpoint(tmp_path / "ckpt"),
                      batch_size=4, objects=True, min_area=min_area, quiet=True)
    assert summary["images"] == 5 and summary["errors"] == 1
    assert not [r for r in caplog.records if r.name == "rayseg" and r.getMessage().startswith("progress:")], "--quiet logs no progress"
    assert sorted(p.name for p in out.iterdir()) == ["_rayseg.json", "images", "objects"]

    images = pd.read_parquet(out / "images")
    objects = pd.read_parquet(out / "objects")
    assert len(images) == 5 and len(objects) > 0
    assert set(objects["image_id"]) <= set(images.loc[images["error"].isna(), "image_id"])
    assert (objects["class"] > 0).all() and (objects["area"] >= min_area).all()
    assert objects["mean_confidence"].between(0, 1).all()
    removed_any = False
    for row in images[images["error"].isna()].itertuples():
        mask = decode_png(row.mask_png)
        mine = objects[objects["image_id"] == row.image_id]
        for c in range(1, K):
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
            areas = stats[1:, cv2.CC_STAT_AREA]
            specks = areas[areas < min_area]
            removed_any |= len(specks) > 0
            kept = mine[mine["class"] == c]
            assert n - 1 == row.num_components[c]
            assert len(kept) == row.num_components[c] - len(specks)
            assert kept["area"].sum() == row.class_pixels[c] - specks.sum()
            for o in kept.itertuples():
                m = coco_mask.decode({"size": list(o.rle["size"]), "counts": o.rle["counts"].encode()}).astype(bool)
                assert m.shape == mask.shape and m.sum() == o.area and (mask[m] == c).all()

    # what a user would ask of it, in SQL, against what the masks say
    big = 40
    got = duckdb.sql(f"SELECT DISTINCT image_id FROM read_parquet('{out}/objects/*.parquet') WHERE class = 2 AND area > {big}").fetchall()
    want = set()
    for row in images[images["error"].isna()].itertuples():
        _, _, stats, _ = cv2.connectedComponentsWithStats((decode_png(row.mask_png) == 2).astype(np.uint8), connectivity=8)
        if (stats[1:, cv2.CC_STAT_AREA] > big).any():
            want.add(row.image_id)
    assert {r[0] for r in got} == want
    assert removed_any or min_area <= 1, "the archive should hold some specks, or --min-area goes untested"
