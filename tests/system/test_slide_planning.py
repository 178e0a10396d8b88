"""Planning a slide by region reads little and loses nothing: on an SVS-like pyramid with about 60% glass, at least
half the regions are skipped and every tissue pixel (known from the layout the slide was built from, on level 0)
lies in a region that runs; on a real S3 endpoint, planning reads under 1% of the file's bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from large_images import LAYOUT_SCALE, write_slide
from rayseg import regions


def tissue_cores(layout: np.ndarray, side: int, size: int) -> set[tuple[int, int]]:
    """The cores (their top-left corners) that hold at least one tissue pixel of level 0."""
    cell = size // LAYOUT_SCALE  # a core is whole layout cells: the test's region sizes are multiples of 16
    n = side // size
    held = layout[: n * cell, : n * cell].reshape(n, cell, n, cell).any(axis=(1, 3))
    return {(int(y) * size, int(x) * size) for y, x in zip(*np.nonzero(held))}


def check_skipping(tmp_path, side: int, size: int) -> None:
    path, layout = write_slide(tmp_path / "slide.svs", side)
    assert 0.35 < 1 - layout.mean() < 0.75, "the slide is mostly glass, as slides are"
    planned = regions.plan_image(path, None, regions.RegionPlan(region_size=size))
    total = (side // size) ** 2
    kept = {(r["core"][0], r["core"][2]) for r in planned["regions"]}
    assert len(kept) + planned["skipped"] == total
    assert planned["skipped"] >= total / 2, f"{planned['skipped']} of {total} regions skipped"
    lost = tissue_cores(layout, side, size) - kept
    assert not lost, f"regions with tissue were skipped: {sorted(lost)[:5]}"


def test_slide_background_is_skipped_and_no_tissue_lost(tmp_path):
    # 4096² in regions of 256: the same 16 x 16 grid as 16384² in regions of 1024, in a few seconds
    check_skipping(tmp_path, 4096, 256)


@pytest.mark.skipif(not os.environ.get("RAYSEG_SLOW_TESTS"), reason="about a minute on 2 cores; set RAYSEG_SLOW_TESTS=1")
def test_16k_slide_background_is_skipped_and_no_tissue_lost(tmp_path):
    check_skipping(tmp_path, 16384, 1024)


class CountingFS:
    """Wraps a real fsspec filesystem: every file it opens counts the bytes it fetches from the store."""

    def __init__(self, fs):
        self.fs, self.fetched = fs, 0

    def open(self, path, mode="rb", **kw):
        f = self.fs.open(path, mode, **kw)
        fetch = f._fetch_range

        def counted(start, end):
            data = fetch(start, end)
            self.fetched += len(data)
            return data

        f._fetch_range = counted  # s3fs's one call that reads bytes from S3 (its block cache calls it)
        f.cache.fetcher = counted
        return f


def test_planning_on_s3_reads_under_one_percent(tmp_path, s3, monkeypatch):
    from rayseg import storage

    bucket, opts = s3
    path, _ = write_slide(tmp_path / "slide.svs", 8192, quality=98)  # JPEG as SVS, little compressed: a big file
    size = os.path.getsize(path)
    assert size > 30e6, "a file big enough that 1% of it is several tiles"
    url = f"{bucket}/slide.svs"
    fs, key = storage.filesystem(url, opts)
    fs.put(path, key)
    counting = CountingFS(fs)
    monkeypatch.setattr(storage, "filesystem", lambda u, so: (counting, storage_path(u)))
    planned = regions.plan_image(url, opts, regions.RegionPlan())
    assert planned["regions"] and planned["shape"] == [8192, 8192]
    assert 0 < counting.fetched < size / 100, f"planning read {counting.fetched:,} of {size:,} bytes"


def storage_path(url: str) -> str:
    return url.split("://", 1)[1]


def test_a_small_slide_honours_mpp_and_an_input_that_cannot_is_named(ray_local, tmp_path, caplog):
    """--mpp (as --level, --ome-tiff and --cog) is honoured on a slide smaller than the size at which reading by
    region pays off; an input it cannot apply to (a PNG) is segmented whole and named in one warning, not passed
    over in silence."""
    import logging

    import cv2
    import pandas as pd

    from rayseg import bigimage
    from rayseg.segment import segment

    inp = tmp_path / "in"
    inp.mkdir()
    path, _ = write_slide(inp / "small.svs", 1024, overview=256)
    assert os.path.getsize(path) < bigimage.MIN_PLAN_BYTES
    cv2.imwrite(str(inp / "photo.png"), np.full((40, 48, 3), 128, np.uint8))
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        summary = segment(inputs=[str(inp)], output=str(tmp_path / "out"), model="pointwise", num_classes=2, mpp=0.5,
                          region_size=256, quiet=True)
    assert (summary["images"], summary["large_images"], summary["errors"]) == (2, 1, 0), summary
    rows = pd.read_parquet(tmp_path / "out" / "images").set_index("image_id")
    slide = rows.loc[[i for i in rows.index if i.endswith("small.svs")][0]]
    assert (slide.height, slide.width) == (512, 512)  # level 1: 0.5 µm per pixel of a 0.25 µm slide
    warned = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--mpp applies only")]
    assert len(warned) == 1 and "1 input(s)" in warned[0] and warned[0].endswith("photo.png"), warned
