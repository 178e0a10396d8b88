"""A huge image's mask as a pyramidal OME-TIFF (`--ome-tiff`): the mask store's levels as SubIFDs of one tiled,
deflated BigTIFF with OME-XML, which QuPath, napari and QGIS open beside the slide.

Written tile by tile from the store (a band of TILE rows at a time, never the whole mask) into local scratch
disk, then put beside the store: OUT/masks/NAME-HASH.ome.tif. Needs rayseg[wsi] (tifffile, zarr).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from rayseg import maskstore, storage

TILE = 512


def ome_url(store: str) -> str:
    return store.removesuffix(".zarr") + ".ome.tif"


def tiles(arr):
    """The array's (TILE, TILE) tiles in row-major order, edge tiles padded with 0 (tifffile takes whole tiles)."""
    h, w = arr.shape
    for y in range(0, h, TILE):
        band = np.asarray(arr[y : min(y + TILE, h)])
        for x in range(0, w, TILE):
            tile = np.zeros((TILE, TILE), np.uint8)
            part = band[:, x : x + TILE]
            tile[: part.shape[0], : part.shape[1]] = part
            yield tile


def write_ome_tiff(store: str, storage_options: dict | None) -> str:
    """The store's mask pyramid as a pyramidal OME-TIFF beside it; returns its URL."""
    import tifffile
    import zarr

    group = zarr.open_group(maskstore.zarr_store(store, storage_options), path=maskstore.MASK, mode="r")
    arrays = []
    while str(len(arrays)) in group:
        arrays.append(group[str(len(arrays))])
    out = ome_url(store)
    opts = {"tile": (TILE, TILE), "dtype": np.uint8, "compression": "zlib", "photometric": "minisblack"}
    with tempfile.TemporaryDirectory(prefix="rayseg-ome-") as tmp:
        local = os.path.join(tmp, "mask.ome.tif")
        with tifffile.TiffWriter(local, bigtiff=True, ome=True) as tw:
            tw.write(tiles(arrays[0]), shape=arrays[0].shape, subifds=len(arrays) - 1, metadata={"axes": "YX", "Name": "mask"}, **opts)
            for arr in arrays[1:]:
                tw.write(tiles(arr), shape=arr.shape, subfiletype=1, metadata=None, **opts)
        fs, path = storage.filesystem(out, storage_options)
        fs.put_file(local, path)
    return out
