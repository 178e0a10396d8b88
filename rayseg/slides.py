"""Vendor slide formats (.svs, .ndpi) through tiffslide, where it is installed (rayseg[wsi]).

tiffslide knows each vendor's layout (which series is the pyramid, which pages are the label and macro images)
and normalises their metadata (`tiffslide.mpp-x` from an Aperio description, NDPI's resolution tags, ...). Its
zarr group gives a level's pixels by index, so a region still reads only the tiles it touches. Plain tiled TIFF
and OME-TIFF stay with tifffile's own zarr store (rayseg.regions), which needs no vendor knowledge.
"""

from __future__ import annotations

import importlib.util

VENDOR_EXTENSIONS = (".svs", ".ndpi")  # discovered as images (rayseg.storage) and planned by region (rayseg.regions)


def takes(url: str) -> bool:
    """Whether this file is read through tiffslide: a vendor extension, and tiffslide installed."""
    return url.lower().endswith(VENDOR_EXTENSIONS) and importlib.util.find_spec("tiffslide") is not None


def is_slide(source) -> bool:
    return type(source).__name__ == "TiffSlide"


def open_slide(f):
    """A tiffslide.TiffSlide over an open (fsspec) file: it reads the file range by range, as tifffile does."""
    import tiffslide

    return tiffslide.TiffSlide(f)


def header(slide) -> dict:
    """rayseg.regions.header's dict for a slide: the pyramid's levels as tiffslide lists them, RGB(A) pixels."""
    z = slide.zarr_group["0"]
    return {"axes": "YXS" if z.ndim == 3 else "YX", "dtype": str(z.dtype), "tiled": True, "geo": False, "nodata": None,
            "levels": [[int(h), int(w)] for w, h in slide.level_dimensions]}


def mpp(slide) -> float | None:
    value = slide.properties.get("tiffslide.mpp-x")
    return float(value) if value else None


def level(slide, lv: int):
    """The zarr array of level `lv` (Y, X[, S]): indexing it reads only the tiles of the window."""
    return slide.zarr_group[str(lv)]
