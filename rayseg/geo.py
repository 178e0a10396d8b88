"""A huge GeoTIFF's mask as a Cloud Optimized GeoTIFF: the source's CRS and geotransform (scaled to the level
segmented), internal tiles and nearest-neighbour overviews, so QGIS and GDAL open it where the source lies.

Written from the image's mask store once all its regions are (rayseg.bigimage.image_rows), band by band into a
tiled GeoTIFF on local scratch disk, then copied by GDAL's COG driver (which only copies whole datasets), and
put beside the store: OUT/masks/NAME-HASH.tif. Needs rayseg[geo] (rasterio).
"""

from __future__ import annotations

import os
import tempfile

from rayseg import maskstore, storage

BAND_ROWS = 2048  # rows of the mask copied at a time: 2048 x width bytes, a few hundred MB at 100k pixels wide


def source_georeference(url: str, storage_options: dict | None):
    """(crs, transform, (height, width)) of a GeoTIFF at level 0, read through fsspec."""
    import rasterio

    fs, path = storage.filesystem(url, storage_options)
    with fs.open(path, "rb") as f, rasterio.open(f) as src:
        return src.crs, src.transform, (src.height, src.width)


def cog_url(store: str) -> str:
    return store.removesuffix(".zarr") + ".tif"


def write_cog(store: str, source: str, storage_options: dict | None) -> str:
    """The store's level-0 mask as a COG beside it, georeferenced like `source`; returns its URL."""
    import rasterio
    import zarr
    from affine import Affine
    from rasterio.shutil import copy as gdal_copy
    from rasterio.windows import Window

    crs, transform, (h0, w0) = source_georeference(source, storage_options)
    arr = zarr.open_array(maskstore.zarr_store(store, storage_options), path=f"{maskstore.MASK}/0", mode="r")
    h, w = arr.shape
    transform = transform @ Affine.scale(w0 / w, h0 / h)  # the level segmented: coarser pixels, same corners
    out = cog_url(store)
    with tempfile.TemporaryDirectory(prefix="rayseg-cog-") as tmp:
        plain, cog = os.path.join(tmp, "plain.tif"), os.path.join(tmp, "mask.tif")
        profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8", "crs": crs, "transform": transform,
                   "tiled": True, "blockxsize": 512, "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
        with rasterio.open(plain, "w", **profile) as dst:
            for y in range(0, h, BAND_ROWS):
                band = arr[y : min(y + BAND_ROWS, h)]
                dst.write(band, 1, window=Window(0, y, w, band.shape[0]))
        gdal_copy(plain, cog, driver="COG", COMPRESS="DEFLATE", OVERVIEW_RESAMPLING="NEAREST", BLOCKSIZE=512, BIGTIFF="IF_SAFER")
        fs, path = storage.filesystem(out, storage_options)
        fs.put_file(cog, path)
    return out
