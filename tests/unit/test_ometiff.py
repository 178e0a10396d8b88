"""--ome-tiff: a huge image's mask store becomes a pyramidal OME-TIFF that tifffile (as QuPath's and napari's
readers) opens: OME-XML, the store's levels as SubIFDs, every pixel equal to the store's."""

from __future__ import annotations

import cv2
import numpy as np
import tifffile

from rayseg import maskstore, regions
from rayseg.ometiff import ome_url, write_ome_tiff


def test_mask_store_exports_as_a_pyramidal_ome_tiff(tmp_path):
    h, w, region = 1500, 2200, 512  # not a multiple of the tile: edge tiles are partial
    rng = np.random.default_rng(0)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(60):
        cv2.circle(mask, (int(rng.integers(0, w)), int(rng.integers(0, h))), int(rng.integers(5, 80)), int(rng.integers(1, 3)), -1)
    url = str(tmp_path / "m.zarr")
    maskstore.create(url, None, (h, w), region, {"image_id": "m", "shape": [h, w], "num_classes": 3, "regions": 15, "skipped": 0, "error": None})
    for core in regions.cores((h, w), region):
        y0, y1, x0, x1 = core
        maskstore.write_region(url, None, core, mask[y0:y1, x0:x1], {"core": list(core), "error": None})
    out = write_ome_tiff(url, None)
    assert out == ome_url(url) and out.endswith("m.ome.tif")
    with tifffile.TiffFile(out) as tif:
        assert tif.is_ome and tif.pages[0].is_tiled
        levels = tif.series[0].levels
        assert len(levels) == len(maskstore.levels((h, w), region)) > 1
        for k, level in enumerate(levels):
            assert np.array_equal(level.asarray(), maskstore.read_mask(url, level=k)), f"level {k}"
        assert np.array_equal(levels[0].asarray(), mask)
