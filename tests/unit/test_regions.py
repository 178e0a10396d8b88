"""Huge images by region: the mosaic of region cores is the whole-image sliding window to the bit, planning skips
background without losing tissue, and the object count from a store equals OpenCV's on the whole mask."""

from __future__ import annotations

import os

import cv2
import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from large_images import balanced, tiled_picture, write_pyramid
from rayseg import bigimage, maskstore, regions
from rayseg.config import PredictConfig
from rayseg.geo import cog_url
from rayseg.models import for_inference, load_bundle
from rayseg.predict import Predictor, mask_and_confidence
from rayseg.tiling import blended_bands, sliding_window

SIDE, TILE, OVERLAP, REGION = 4096, 256, 0.25, 1024


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    img = tiled_picture(SIDE)
    return img, write_pyramid(tmp_path_factory.mktemp("big") / "slide.tif", img, levels=4)


def top_rows(predictor: Predictor, img: np.ndarray, rows: int) -> np.ndarray:
    """The whole-image sliding window's mask, its bands taken down to `rows` (the rest is never computed)."""
    x, forward = predictor._tiles(img)
    parts = []
    for _, y1, lg in blended_bands(x, TILE, OVERLAP, forward, predictor.batch_size):
        parts.append(mask_and_confidence(lg)[0].numpy())
        if y1 >= rows:
            break
    return np.concatenate(parts)[:rows]


@pytest.mark.parametrize("architecture, rows", [("unet", SIDE), ("lraspp_mobilenet_v3_large", SIDE // 2)])
def test_region_mosaic_equals_the_whole_image_sliding_window(pyramid, architecture, rows):
    """Regions of 1024 on a 4096x4096 pyramid: 0 pixels differ from one sliding window over the whole image (for
    lraspp, four times slower, its top half). A grid of its own per region, as peers cut regions (core plus a
    halo), differs: a halo alone does not give exact seams."""
    img, url = pyramid
    torch.set_num_threads(1)  # as an actor runs
    predictor = Predictor(load_bundle(None, "unet", 2, None, input_size=TILE), PredictConfig(tile=TILE, overlap=OVERLAP, batch_size=8), threads=1)
    predictor.model = for_inference(balanced(architecture), torch.device("cpu"))
    reference = top_rows(predictor, img, rows)
    assert 0.1 < reference.mean() < 0.9, "a mask with both classes"

    plan = regions.plan_image(url, None, regions.RegionPlan(region_size=REGION, tile=TILE, overlap=OVERLAP, background="none"))
    assert plan["head"]["levels"][0] == [SIDE, SIDE] and len(plan["regions"]) == (SIDE // REGION) ** 2 and plan["skipped"] == 0
    mosaic = np.full_like(reference, 255)
    for spec in [r for r in plan["regions"] if r["core"][0] < rows][::-1]:  # any order
        region = regions.Region(url, "", 0, (SIDE, SIDE), tuple(spec["core"]), tuple(spec["window"]))
        window = regions.read_window(region, None)
        y0, y1, x0, x1 = region.core
        mosaic[y0:y1, x0:x1], _ = predictor.core(predictor.inputs.one(window), (region.window[0], region.window[2]), region.shape, region.core)
    assert int((mosaic != reference).sum()) == 0

    # the negative control: one interior region as peers cut it, its core plus a halo of half a tile, through a
    # sliding window of its own
    y0, y1, x0, x1 = plan["regions"][5]["core"]
    wy0, wx0 = y0 - TILE // 2, x0 - TILE // 2
    x, forward = predictor._tiles(img[wy0 : y1 + TILE // 2, wx0 : x1 + TILE // 2])
    own = sliding_window(x, TILE, OVERLAP, forward, 8).argmax(0).numpy()[y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
    assert int((own != reference[y0:y1, x0:x1]).sum()) > 0


def test_windows_cover_every_tile_touching_the_core():
    shape = (3000, 2500)
    for core in regions.cores(shape, 1024):
        y0, y1, x0, x1 = regions.window_of(core, shape, TILE, OVERLAP)
        assert y0 <= core[0] and y1 >= core[1] and x0 <= core[2] and x1 >= core[3]
        assert (y0 % 192 == 0 or y0 == shape[0] - TILE) and y1 <= shape[0] and x1 <= shape[1]


class CountingFS(LocalFileSystem):
    """The local disk under `counting://`, counting the bytes read: what planning costs on an object store."""

    protocol = "counting"
    read = 0

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        inner = f.read

        def read(n=-1):
            data = inner(n)
            CountingFS.read += len(data)
            return data

        f.read = read
        return f


def test_background_regions_are_skipped_and_no_tissue_is_lost(tmp_path):
    """A slide whose tissue is a disc of about 40% of its area: most regions are glass and are skipped, every
    region holding a tissue pixel is kept, and planning reads under 1% of the file."""
    side, region = 8192, 512
    img = np.full((side, side, 3), 240, np.uint8)  # glass
    yy, xx = np.ogrid[:side, :side]
    tissue = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.36 * side) ** 2
    img[tissue] = tiled_picture(side)[tissue] // 2 + 40  # stained, darker than the glass
    url = write_pyramid(tmp_path / "slide.tif", img, levels=5)
    fsspec.register_implementation("counting", CountingFS, clobber=True)
    CountingFS.read = 0
    plan = regions.plan_image(f"counting://{url}", None, regions.RegionPlan(region_size=region, tile=TILE, overlap=OVERLAP))
    assert CountingFS.read < 0.01 * os.path.getsize(url), f"planning read {CountingFS.read:,} of {os.path.getsize(url):,} bytes"
    kept = {tuple(r["core"]) for r in plan["regions"]}
    assert plan["skipped"] + len(kept) == (side // region) ** 2
    assert plan["skipped"] >= 0.5 * (side // region) ** 2
    for core in regions.cores((side, side), region):
        if tissue[core[0] : core[1], core[2] : core[3]].any():
            assert core in kept, f"region {core} holds tissue but was skipped"
    small = regions.plan_image(url, None, regions.RegionPlan(region_pixels=10**9))
    assert small is not None, "a pyramid takes the region path whatever its size"


def test_flat_small_tiff_stays_on_the_ordinary_path(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "small.tif", tiled_picture(1024), tile=(256, 256))
    assert regions.plan_image(str(tmp_path / "small.tif"), None, regions.RegionPlan()) is None
    assert regions.plan_image(str(tmp_path / "small.tif"), None, regions.RegionPlan(region_pixels=1000)) is not None


def test_too_many_regions_is_an_error_not_a_plan(pyramid):
    _, url = pyramid
    plan = regions.plan_image(url, None, regions.RegionPlan(region_size=256, max_regions=100))
    assert plan["regions"] == [] and "--max-regions" in plan["error"]


def test_store_objects_equal_opencv_on_the_whole_mask(tmp_path):
    """Blobs crossing region borders and corners, written region by region: the store's components per class
    (count, and each one's area, box and centroid) equal cv2.connectedComponentsWithStats on the whole mask."""
    rng = np.random.default_rng(0)
    side, region = 2048, 512
    mask = np.zeros((side, side), np.uint8)
    for _ in range(150):
        cv2.circle(mask, (int(rng.integers(0, side)), int(rng.integers(0, side))), int(rng.integers(3, 60)), int(rng.integers(1, 3)), -1)
    for y, x in [(511, 511), (512, 512), (1023, 1536), (1024, 1535)]:  # touching only across a corner of four regions
        mask[y, x] = 1
    url = str(tmp_path / "m.zarr")
    maskstore.create(url, None, (side, side), region, {"image_id": "m", "shape": [side, side], "num_classes": 3, "regions": 16,
                                                       "skipped": 0, "error": None})
    for core in regions.cores((side, side), region):
        y0, y1, x0, x1 = core
        part = mask[y0:y1, x0:x1]
        maskstore.write_region(url, None, core, part, {"core": list(core), "error": None, "pixels": int(part.size), "confidence_sum": 1.0,
                                                       "class_pixels": np.bincount(part.ravel(), minlength=3)[:3].tolist()})
    assert np.array_equal(maskstore.read_mask(url), mask)
    assert np.array_equal(maskstore.read_mask(url, level=2), mask[::4, ::4])
    row = maskstore.image_row(url, None, objects=True)
    for c in range(3):
        n, _, stats, centroids = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
        assert row["num_components"][c] == n - 1, f"class {c}"
        if c:
            expected = sorted((int(s[4]), [int(v) for v in s[:4]], [round(float(v), 6) for v in xy]) for s, xy in zip(stats[1:], centroids[1:]))
            got = sorted((o["area"], o["bbox"], [round(v, 6) for v in o["centroid"]]) for o in row["objects"] if o["class"] == c)
            assert got == expected, f"objects of class {c}"
    assert row["class_pixels"] == np.bincount(mask.ravel(), minlength=3).tolist() and row["error"] is None


def test_regions_and_stores_on_any_fsspec_url(pyramid):
    """memory:// stands in for an object store: a window read through the zarr store, a store written and read."""
    img, url = pyramid
    fs = fsspec.filesystem("memory")
    with open(url, "rb") as f:
        fs.pipe("/giga/slide.tif", f.read())
    region = regions.Region("memory://giga/slide.tif", "", 1, (SIDE // 2, SIDE // 2), (512, 1024, 0, 512), (448, 1088, 0, 576))
    assert np.array_equal(regions.read_window(region, None), img[::2, ::2][448:1088, 0:576])

    store = "memory://giga/out/masks/m.zarr"
    maskstore.create(store, None, (1000, 700), 512, {"image_id": "m", "shape": [1000, 700], "num_classes": 2, "regions": 4,
                                                     "skipped": 0, "error": None})
    mask = np.zeros((1000, 700), np.uint8)
    mask[100:900, 300:400] = 1
    for core in regions.cores((1000, 700), 512):
        part = mask[core[0] : core[1], core[2] : core[3]]
        maskstore.write_region(store, None, core, part, {"core": list(core), "error": None, "pixels": int(part.size),
                                                         "confidence_sum": 0.5 * part.size, "class_pixels": np.bincount(part.ravel(), minlength=2).tolist()})
    row = maskstore.image_row(store, None)
    assert np.array_equal(maskstore.read_mask(store), mask) and row["num_components"] == [1, 1] and row["mean_confidence"] == 0.5
    assert fs.exists("/giga/out/masks/m.zarr/labels/mask/0/c/0/0")
    assert not fs.exists("/giga/out/masks/m.zarr/labels/mask/0/c/1/1"), "an all-background chunk is not stored"


def test_geotiff_nodata_is_skipped_and_the_cog_keeps_its_georeference(tmp_path):
    """A GeoTIFF written by rasterio, its left quarter nodata: those regions are skipped (its dark water would be
    data, not background), and the mask's COG has the source's CRS, geotransform and overviews."""
    import rasterio
    from affine import Affine

    side, region = 2048, 512
    img = tiled_picture(side).copy()
    img[:, : side // 4] = 0
    url = str(tmp_path / "scene.tif")
    transform = Affine(10.0, 0, 500000.0, 0, -10.0, 5200000.0)
    with rasterio.open(url, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32633", transform=transform,
                       nodata=0, tiled=True, blockxsize=256, blockysize=256, compress="deflate") as dst:
        dst.write(img.transpose(2, 0, 1))
    plan = regions.plan_image(url, None, regions.RegionPlan(region_pixels=1000, region_size=region, tile=TILE, overlap=OVERLAP))
    assert plan["head"]["geo"] and plan["head"]["nodata"] == 0
    assert plan["skipped"] == side // region and all(r["core"][2] >= side // 4 for r in plan["regions"])

    store = maskstore.store_url(str(tmp_path / "out"), url)
    maskstore.create(store, None, (side, side), region, {"image_id": url, "shape": [side, side], "num_classes": 2, "regions": 16,
                                                          "skipped": 0, "error": None, "geo": True})
    mask = (img[:, :, 0] > 128).astype(np.uint8)
    for core in regions.cores((side, side), region):
        part = mask[core[0] : core[1], core[2] : core[3]]
        maskstore.write_region(store, None, core, part, {"core": list(core), "error": None, "pixels": int(part.size), "confidence_sum": 0.9 * part.size,
                                                         "class_pixels": np.bincount(part.ravel(), minlength=2).tolist()})
    row = bigimage.image_rows({"store": np.array([store]), "image_id": np.array([url])}, None, "m", objects=True, cog=True).to_pylist()[0]
    assert row["error"] is None and row["mask_url"] == store and row["regions_skipped"] == 0
    # each object's centroid in the scene's CRS: its pixel centre through the source's geotransform
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=8)
    expected = sorted((int(s[4]), tuple(round(v, 3) for v in transform @ (float(xy[0]) + 0.5, float(xy[1]) + 0.5)))
                      for s, xy in zip(stats[1:], centroids[1:]))
    got = sorted((o["area"], tuple(round(v, 3) for v in o["centroid_map"])) for o in row["objects"])
    assert len(got) == n - 1 > 10 and got == expected

    with rasterio.open(cog_url(store)) as cog:
        assert cog.crs.to_epsg() == 32633 and cog.transform == transform and cog.overviews(1)
        assert np.array_equal(cog.read(1), mask)
        assert cog.profile["blockxsize"] == 512 and cog.profile["tiled"]


def test_a_failed_region_makes_its_image_an_error_row(tmp_path):
    url = str(tmp_path / "e.zarr")
    maskstore.create(url, None, (1024, 1024), 512, {"image_id": "e", "shape": [1024, 1024], "num_classes": 2, "regions": 4,
                                                     "skipped": 0, "error": None})
    maskstore.write_record(url, None, (0, 512, 0, 512), {"core": [0, 512, 0, 512], "error": "region at y=0, x=0: OSError: gone"})
    row = maskstore.image_row(url, None)
    assert row["error"].startswith("1 region(s) failed, the first: region at y=0, x=0") and row.get("class_pixels") is None
    maskstore.write_record(url, None, (0, 512, 0, 512), {"core": [0, 512, 0, 512], "error": None, "pixels": 0, "confidence_sum": 0,
                                                         "class_pixels": [0, 0]})
    assert maskstore.image_row(url, None)["error"] == "3 of 4 regions were not written"


def test_deep_images_are_normalised_by_one_image_wide_window(tmp_path):
    """A 16-bit pyramid whose left half is dim and right half bright: the window comes from the overview, so a
    pixel value maps to the same model input in every region (per-region percentiles would stretch each half)."""
    side = 2048
    img = np.empty((side, side, 1), np.uint16)
    img[:, : side // 2] = np.arange(side // 2, dtype=np.uint16)[None, :, None] % 1000
    img[:, side // 2 :] = 30000 + np.arange(side // 2, dtype=np.uint16)[None, :, None] % 1000
    import tifffile

    with tifffile.TiffWriter(tmp_path / "deep.tif") as tw:
        tw.write(img[:, :, 0], tile=(256, 256), subifds=2)
        for k in (1, 2):
            tw.write(img[:: 2**k, :: 2**k, 0], tile=(256, 256), subfiletype=1)
    plan = regions.plan_image(str(tmp_path / "deep.tif"), None, regions.RegionPlan(region_size=1024), intensity="")
    (low, high), = plan["window"]
    assert low < 1000 and high > 30000, "the window spans both halves"
    from rayseg.intensity import Inputs

    norm = Inputs(load_bundle(None, "unet", 2, None).card)
    window = tuple(tuple(v) for v in plan["window"])
    left = norm.one(img[:1024, :1024], None, window)
    right = norm.one(img[:1024, 1024:], None, window)
    assert left.max() < 10 and right.min() > 200, "dim stays dim, bright stays bright"
    assert norm.one(img[:1024, :1024]).max() > 250, "without the window, each region would be stretched on its own"


def test_only_the_region_options_given_away_from_their_defaults_are_named():
    from rayseg.bigimage import region_options
    from rayseg.cliutil import config_from
    from rayseg.config import SegmentConfig

    assert region_options(config_from(SegmentConfig, {"inputs": ("a",), "output": "o", "region_size": 512})) == []
    cfg = config_from(SegmentConfig, {"inputs": ("a",), "output": "o", "mpp": 0.5, "cog": True})
    assert region_options(cfg) == ["--mpp", "--cog"]


def test_objects_of_a_level_below_0_are_given_in_level_0_pixels():
    """Segmented at a level 4 times coarser, an object's box, centroid and area are in level-0 pixels of the source
    (what a viewer's annotations use); its map centroid comes from the same level-0 position."""
    found = {1: {"count": 1, "area": np.array([10]), "bbox": np.array([[3, 5, 2, 5]]), "centroid": np.array([[3.5, 7.0]])}}
    (obj,) = maskstore.objects_of(found, 0, (4.0, 4.0), to_map=lambda x, y: (100 + x, 200 - y))
    assert obj["bbox"] == [12, 20, 8, 20] and obj["area"] == 160
    assert obj["centroid"] == [(3.5 + 0.5) * 4 - 0.5, (7.0 + 0.5) * 4 - 0.5] and obj["centroid_map"] == [116.0, 170.0]
    (same,) = maskstore.objects_of(found, 0)  # level 0: the mask's own pixels, no map
    assert same["bbox"] == [3, 5, 2, 5] and same["centroid"] == [3.5, 7.0] and "centroid_map" not in same


def test_a_geotiff_whose_georeference_cannot_be_read_is_an_error_row_not_a_crash(tmp_path):
    """--objects on a GeoTIFF store whose source rasterio cannot open: the image keeps its one row, with one
    sentence saying why its objects have no map coordinates."""
    pytest.importorskip("rasterio")
    source = tmp_path / "scene.tif"
    source.write_bytes(b"II*\x00 not a GeoTIFF any more")
    store = maskstore.store_url(str(tmp_path / "out"), str(source))
    maskstore.create(store, None, (512, 512), 512, {"image_id": str(source), "shape": [512, 512], "num_classes": 2, "regions": 1,
                                                    "skipped": 0, "error": None, "geo": True})
    part = np.zeros((512, 512), np.uint8)
    part[100:200, 100:200] = 1
    maskstore.write_region(store, None, (0, 512, 0, 512), part, {"core": [0, 512, 0, 512], "error": None, "pixels": part.size,
                                                                 "confidence_sum": 0.9 * part.size, "class_pixels": np.bincount(part.ravel()).tolist()})
    (row,) = bigimage.image_rows({"store": [store], "image_id": [str(source)]}, None, "m", objects=True).to_pylist()
    assert row["error"].startswith("the georeference could not be read for the objects' map coordinates (")
    assert row["mask_url"] == store and "\n" not in row["error"]
