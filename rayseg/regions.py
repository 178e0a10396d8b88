"""Huge images by region: planning from the header and an overview, and reading one region's pixels.

A tiled or pyramidal TIFF (OME-TIFF, SVS-like slides saved as .tif, BigTIFF, GeoTIFF) over the size threshold
(`--region-pixels`), or any pyramid, is not decoded whole. Planning reads its IFDs and one low-resolution level:
- the level shapes (`--level` picks the one to segment);
- a tissue mask: Otsu on the overview's grey values, tissue being the darker side, grown by a margin so no
  tissue edge is lost (a GeoTIFF: the pixels not at its nodata value); regions whose core holds none of it are
  skipped and counted (`--background none` keeps every region);
- image-wide intensity windows (the percentiles `auto` and `percentile` would take per image) from the overview,
  so every region of an image is normalised alike and normalisation makes no seam.

Out come region rows. A region is a core box, a square of `--region-size` pixels on a grid anchored at (0, 0), so
cores are whole chunks of the mask store and each chunk has exactly one writer, and a read window: the union of
the tiles of the image's one global tile grid (rayseg.tiling.tile_starts) that touch the core. The pixels of a
window come through tifffile's zarr store over any fsspec file: only the TIFF tiles the window touches are read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import numpy as np

from rayseg import slides
from rayseg.tiling import tile_starts

REGION_EXTENSIONS = (".tif", ".tiff", *slides.VENDOR_EXTENSIONS)  # files planned by region (.ome.tif ends in .tif); all in rayseg.storage.IMAGE_EXTS
OVERVIEW_MIN = 512  # the overview: the smallest level at least this long (a few hundred KB of tiles: planning reads little)
OVERVIEW_SIDE = 2048  # ... read with a stride where even that level is longer than this (a flat image)
TISSUE_MARGIN = 2  # overview pixels the tissue mask grows by: an edge that Otsu shaved off still keeps its region
FLAT_CONTRAST = 4.0  # an overview whose grey values spread less than this (8-bit units) has no background to tell apart


@dataclass(frozen=True)
class RegionPlan:
    """How to cut huge images: the options of the region path, as one value the planning tasks take."""

    region_pixels: int = 8192 * 8192
    region_size: int = 1024
    level: int = 0
    mpp: float | None = None  # microns per pixel asked for: the level closest to it, in place of `level`
    max_regions: int = 100_000
    background: str = "otsu"
    tile: int = 256
    overlap: float = 0.25


def is_candidate(url: str) -> bool:
    return url.lower().endswith(REGION_EXTENSIONS)


PLAN_BLOCK = 32 * 1024  # bytes an object store fetches at a time while planning: each level's IFD lies apart (a fetch each), an overview's tiles are small
READ_BLOCK = 4 * 1024 * 1024  # ... while reading a region: its tiles lie in a few long runs of the file


def open_tiff(url: str, storage_options: dict | None, block_size: int = READ_BLOCK):
    """(fsspec file, tifffile.TiffFile, or a tiffslide.TiffSlide for a vendor slide where tiffslide is installed):
    the file is read lazily, range by range, on any fsspec protocol."""
    import tifffile

    from rayseg.storage import filesystem

    fs, path = filesystem(url, storage_options)
    # planning's small blocks are kept (blockcache): tiffslide's decode threads read an overview's tiles out of
    # order, and a read-ahead cache would fetch a block again for each backward step
    f = fs.open(path, "rb", block_size=block_size, **({"cache_type": "blockcache"} if block_size == PLAN_BLOCK else {}))
    try:
        return f, (slides.open_slide(f) if slides.takes(url) else tifffile.TiffFile(f))
    except Exception:
        f.close()
        raise


def yx_shape(shape: tuple[int, ...], axes: str) -> tuple[int, int]:
    return shape[axes.index("Y")], shape[axes.index("X")]


def as_hwc(arr: np.ndarray, axes: str) -> np.ndarray:
    """An array with tifffile's `axes` -> (H, W, C), every axis but Y and X as channels (as rayseg.decode does)."""
    y, x = axes.index("Y"), axes.index("X")
    h, w = arr.shape[y], arr.shape[x]
    return np.moveaxis(arr, (y, x), (0, 1)).reshape(h, w, -1)


def header(tif) -> dict:
    """Level shapes, axes and dtype of the first series; `tiled`: whether a region reads only its tiles."""
    if slides.is_slide(tif):
        return slides.header(tif)
    series = tif.series[0]
    if "Y" not in series.axes or "X" not in series.axes:
        raise ValueError(f"TIFF series has axes {series.axes!r} and no Y and X")
    tags = tif.pages[0].tags
    nodata = tags.valueof(42113)  # GDAL_NODATA, as text
    return {"axes": series.axes, "dtype": str(series.dtype), "levels": [list(yx_shape(lv.shape, series.axes)) for lv in series.levels],
            "tiled": bool(tif.pages[0].is_tiled), "geo": 34735 in tags,  # GeoKeyDirectoryTag: a GeoTIFF
            "nodata": float(str(nodata).strip("\x00 ")) if nodata not in (None, "") else None}


def base_mpp(tif) -> float | None:
    """Microns per level-0 pixel from the file's metadata: an Aperio description's `MPP = `, OME-XML's
    PhysicalSizeX (in µm), or a resolution in pixels per centimetre (NDPI and others; per inch is left alone, as
    most photos carry a nominal 72 or 300 dpi). None where the file says nothing."""
    import re

    if slides.is_slide(tif):
        return slides.mpp(tif)
    page = tif.pages[0]
    m = re.search(r"\bMPP\s*=\s*([0-9.]+)", page.description or "")
    if m is None and tif.is_ome:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        if m and re.search(r'PhysicalSizeXUnit="(?!µm|um)', tif.ome_metadata):  # another unit: not converted, not trusted
            m = None
    if m is not None:
        value = float(m.group(1))
        return value if value > 0 else None
    res, unit = page.tags.valueof(282), page.tags.valueof(296, 2)  # XResolution, ResolutionUnit
    if unit == 3 and res and res[0] and res[1]:
        return 1e4 * res[1] / res[0]
    return None


def level_for_mpp(tif, head: dict, mpp: float) -> tuple[int, str | None]:
    """(the level whose microns per pixel is closest to `mpp`, by ratio; an error sentence where the file has none)."""
    base = base_mpp(tif)
    if base is None:
        return 0, f"--mpp {mpp:g} asked, but the image carries no microns per pixel (use --level)"
    width0 = head["levels"][0][1]
    ratios = [abs(math.log(base * width0 / w / mpp)) for _, w in head["levels"]]
    return ratios.index(min(ratios)), None


def takes_region_path(head: dict, plan: RegionPlan) -> bool:
    h, w = head["levels"][0]
    return len(head["levels"]) > 1 or h * w > plan.region_pixels


def overview(tif, head: dict) -> tuple[np.ndarray, int]:
    """(overview image (h, w, C), its level): the smallest level at least OVERVIEW_MIN long, read with a stride
    where it is longer than OVERVIEW_SIDE (a flat image: every tile is read once, none kept)."""
    levels = head["levels"]
    long_enough = [i for i, (h, w) in enumerate(levels) if max(h, w) >= OVERVIEW_MIN]
    lv = long_enough[-1] if long_enough else 0
    h, w = levels[lv]
    step = max(1, math.ceil(max(h, w) / OVERVIEW_SIDE))
    z = level_array(tif, lv)
    index = tuple(slice(None, None, step) if a in "YX" else slice(None) for a in head["axes"])
    return as_hwc(np.asarray(z[index]), head["axes"]), lv


def tissue_mask(img: np.ndarray, background: str, head: dict | None = None) -> np.ndarray:
    """Boolean (h, w): where there may be tissue or data. A GeoTIFF: every pixel not at its nodata value in all
    channels (dark water is data). A slide: Otsu on grey, the darker side (bright-field glass is white). A flat
    overview, or `background` none, keeps everything."""
    import cv2

    from rayseg.decode import to_uint8

    head = head or {}
    if head.get("geo"):
        nodata = head.get("nodata")
        return np.ones(img.shape[:2], bool) if background == "none" or nodata is None else (img != nodata).any(axis=2)
    grey = to_uint8(img).astype(np.float32).mean(axis=2)
    if background == "none" or grey.size == 0 or float(grey.std()) < FLAT_CONTRAST:
        return np.ones(grey.shape, bool)
    g8 = np.clip(grey, 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(g8, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    mask = (g8 <= t).astype(np.uint8)
    kernel = np.ones((2 * TISSUE_MARGIN + 1,) * 2, np.uint8)
    return cv2.dilate(mask, kernel) > 0


def intensity_window(img: np.ndarray, intensity: str) -> list[list[float]] | None:
    """Per channel [low, high] for the modes that take percentiles per image (auto on deep images, percentile),
    measured on the overview; None where the normalisation (`intensity`: the card's, or the override, as text)
    is per pixel already (8-bit auto, fixed, dataset, none, a card without a record)."""
    from rayseg import intensity as it

    if intensity and not intensity.startswith(("auto", "percentile")):
        return None
    norm = it.parse(intensity) if intensity else it.Intensity("auto")
    if norm.mode == "auto" and img.dtype == np.uint8:
        return None
    low, high = (norm.low, norm.high) if norm.mode == "percentile" else it.PERCENTILES
    lo, hi = it.percentile_window(img, low, high)
    return [[float(a), float(b)] for a, b in zip(np.atleast_1d(lo), np.atleast_1d(hi))]


def window_of(core: tuple[int, int, int, int], shape: tuple[int, int], tile: int, overlap: float) -> tuple[int, int, int, int]:
    """The read window of a core (y0, y1, x0, x1): the union of the global grid's tiles that touch it."""
    (h, w), (y0, y1, x0, x1) = shape, core
    th, tw = min(tile, h), min(tile, w)
    ys = [s for s in tile_starts(h, th, overlap) if s < y1 and s + th > y0]
    xs = [s for s in tile_starts(w, tw, overlap) if s < x1 and s + tw > x0]
    return ys[0], ys[-1] + th, xs[0], xs[-1] + tw


def cores(shape: tuple[int, int], size: int) -> list[tuple[int, int, int, int]]:
    h, w = shape
    return [(y, min(y + size, h), x, min(x + size, w)) for y in range(0, h, size) for x in range(0, w, size)]


def plan_image(url: str, storage_options: dict | None, plan: RegionPlan, intensity: str = "") -> dict | None:
    """None where the image takes the ordinary path; else {"head", "level", "shape", "regions", "skipped",
    "window", "error"}: the region specs to run, the cores skipped as background, the intensity window."""
    f, tif = open_tiff(url, storage_options, PLAN_BLOCK)
    with f, tif:
        head = header(tif)
        if not takes_region_path(head, plan):
            return None
        level, error = (plan.level, None) if plan.mpp is None else level_for_mpp(tif, head, plan.mpp)
        out = {"head": head, "level": level, "regions": [], "skipped": 0, "window": None, "error": error}
        if error:
            return out
        if level >= len(head["levels"]):
            out["error"] = f"--level {plan.level} asked, but the image has {len(head['levels'])} level(s)"
            return out
        shape = tuple(head["levels"][level])
        out["shape"] = list(shape)
        boxes = cores(shape, plan.region_size)
        if len(boxes) > plan.max_regions:
            out["error"] = (f"image is {shape[1]}x{shape[0]} at level {level}: {len(boxes):,} regions of {plan.region_size}, "
                            f"over the limit of {plan.max_regions:,} (--max-regions)")
            return out
        small, lv = overview(tif, head)
        keep = tissue_mask(small, plan.background, head)
        out["window"] = intensity_window(small, intensity)
    sy, sx = keep.shape[0] / shape[0], keep.shape[1] / shape[1]
    for core in boxes:
        y0, y1, x0, x1 = int(core[0] * sy), math.ceil(core[1] * sy), int(core[2] * sx), math.ceil(core[3] * sx)
        if not keep[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)].any():  # no tissue in the core: its mask is background
            out["skipped"] += 1
            continue
        out["regions"].append({"core": list(core), "window": list(window_of(core, shape, plan.tile, plan.overlap))})
    return out


@dataclass(frozen=True)
class Region:
    """One region row's work: where to read, what of it is the core, where the mask goes."""

    url: str
    store: str
    level: int
    shape: tuple[int, int]
    core: tuple[int, int, int, int]
    window: tuple[int, int, int, int]
    intensity_window: tuple | None = None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Region":
        d = json.loads(data)
        return cls(d["url"], d["store"], d["level"], tuple(d["shape"]), tuple(d["core"]), tuple(d["window"]),
                   None if d["intensity_window"] is None else tuple(tuple(v) for v in d["intensity_window"]))

    @property
    def key(self) -> str:
        """The region's name in the store: its core's top-left corner."""
        return f"{self.core[0]}-{self.core[2]}"


def level_array(tif, lv: int):
    """A level's pixels as a zarr array in the file's axes: indexing it reads only the tiles it touches."""
    import zarr

    if slides.is_slide(tif):
        return slides.level(tif, lv)
    return zarr.open(tif.series[0].aszarr(level=lv), mode="r")


def read_window(region: Region, storage_options: dict | None) -> np.ndarray:
    """The pixels of the region's read window, (h, w, C) in the file's dtype: only the TIFF tiles it touches are read."""
    from rayseg.decode import native

    f, tif = open_tiff(region.url, storage_options)
    with f, tif:
        axes = header(tif)["axes"] if slides.is_slide(tif) else tif.series[0].axes
        z = level_array(tif, region.level)
        y0, y1, x0, x1 = region.window
        index = tuple(slice(y0, y1) if a == "Y" else slice(x0, x1) if a == "X" else slice(None) for a in axes)
        return np.ascontiguousarray(native(as_hwc(np.asarray(z[index]), axes)))


def thumbnail(url: str, storage_options: dict | None) -> np.ndarray:
    """The RGB picture of a huge image's overview level (reports): the image is never read whole."""
    from rayseg.decode import to_rgb

    f, tif = open_tiff(url, storage_options, PLAN_BLOCK)
    with f, tif:
        return to_rgb(overview(tif, header(tif))[0])
