"""Bytes or arrays -> images in their own dtype and channel count, with a pixel limit checked before any pixel is decoded.

`load` gives what the file holds, (H, W, C), nothing rescaled: uint8, uint16, int16 or float32 (bool becomes
uint8 0/255, int8 int16, any other number type float32; NaN and inf become 0). Channels as stored: grey is one
channel, 3 is RGB (OpenCV's BGR converted), the alpha of an RGBA file is dropped; arrays (HDF5, .npy) and TIFFs
keep every channel. How the values become model input is rayseg.intensity's business, per the model card.

TIFF goes through tifffile (BigTIFF, tiled, LZW/deflate/zstd and other compressions through imagecodecs, float,
multi-page, OME-TIFF): the first series, with every axis other than Y and X (pages, samples, channels, Z) as
channels. Everything else goes through OpenCV (Pillow for what this OpenCV build lacks). EXIF orientation is
applied to JPEG and TIFF.

`decode` is the 8-bit RGB picture of an image (reports): `to_rgb` of `load`, by the rules of earlier versions:
- bool: False -> 0, True -> 255
- uint8: as is
- uint16: value / 257 (65535 -> 255), the usual 16-bit to 8-bit mapping
- float with every value in [0, 1]: value * 255
- any other dtype, or floats outside [0, 1]: min-max stretched per image to 0..255 (a constant image -> 0)
Channels there: 1 -> grey repeated to RGB; 4 -> alpha dropped; 2 or more than 4 -> the first channel as grey.
"""

from __future__ import annotations

import io
import math

import cv2
import numpy as np

from rayseg.shards import error_reason

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # bad files are reported as error rows, not codec chatter
cv2.setNumThreads(1)  # decode runs many tasks in parallel; OpenCV's own threads would oversubscribe the cores

MAX_CHANNELS = 64  # more than any multiplex or multispectral archive holds; a file claiming more is refused from its header
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders


class DecodeError(ValueError):
    pass


def native(arr: np.ndarray) -> np.ndarray:
    """The dtypes images travel in: uint8, uint16, int16, float32 (see the module docstring)."""
    if arr.dtype in (np.uint8, np.uint16, np.int16, np.float32):
        out = arr
    elif arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    elif arr.dtype == np.int8:
        return arr.astype(np.int16)
    else:
        out = arr.astype(np.float32)
    if out.dtype == np.float32 and not np.isfinite(out).all():
        out = np.where(np.isfinite(out), out, 0).astype(np.float32)
    return out


def to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = arr.astype(np.float64)
    a[~np.isfinite(a)] = 0
    if arr.dtype.kind == "f" and a.size and a.min() >= 0 and a.max() <= 1:
        return np.round(a * 255).astype(np.uint8)
    lo, hi = (a.min(), a.max()) if a.size else (0, 0)
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.round((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """An (H,W[,C]) image of any dtype as the RGB uint8 picture of it (rules in the module docstring)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DecodeError(f"image array has shape {arr.shape}; expected (H,W) or (H,W,C)")
    c = arr.shape[2]
    if c == 4:
        arr = arr[:, :, :3]
    elif c != 3:
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(to_uint8(arr))


def with_channels(arr: np.ndarray) -> np.ndarray:
    """(H,W) -> (H,W,1); (H,W,C) as is; anything else is not an image."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DecodeError(f"image array has shape {arr.shape}; expected (H,W) or (H,W,C)")
    if not 1 <= arr.shape[2] <= MAX_CHANNELS:
        raise DecodeError(f"image has {arr.shape[2]} channels; at most {MAX_CHANNELS} are read")
    return arr


def header_size(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, format) from the file header alone, without decoding pixels (Pillow opens lazily)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # we apply our own limit; Pillow's would only warn
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size[0], im.size[1], im.format or "image"
    except Exception:  # noqa: BLE001 - not identifiable by Pillow: OpenCV gets the final say
        return None


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise DecodeError(f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} (--max-pixels)")
    if width < 1 or height < 1:
        raise DecodeError(f"image has an empty size {width}x{height}")


# TIFF orientation tag (EXIF's values): how to turn the stored rows into the picture as shown
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: a.transpose(1, 0, 2)[::-1]}


def decode_tiff(data: bytes, max_pixels: int) -> np.ndarray:
    """The first series of a TIFF as (H, W, C): Y and X first, every other axis of more than one entry a channel.

    The size and channel count come from the IFDs (tifffile reads them without decoding a strip or tile), so the
    pixel limit holds before any pixel is decompressed."""
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
        if "Y" not in axes or "X" not in axes:
            raise DecodeError(f"TIFF series has axes {axes!r} and no Y and X")
        h, w = shape[axes.index("Y")], shape[axes.index("X")]
        check_pixels(w, h, max_pixels)
        channels = math.prod(shape) // (h * w)
        if channels > MAX_CHANNELS:
            raise DecodeError(f"TIFF holds {channels} planes of {w}x{h} (axes {axes}); at most {MAX_CHANNELS} are read as channels")
        arr = series.asarray()
        orientation = tif.pages[0].tags.valueof(274, 1)
    arr = np.moveaxis(arr, (axes.index("Y"), axes.index("X")), (0, 1)).reshape(h, w, channels)
    if orientation in _ORIENT:
        arr = _ORIENT[orientation](arr)
    return np.ascontiguousarray(native(arr))


def decode_encoded(data: bytes, max_pixels: int) -> np.ndarray:
    if len(data) == 0:
        raise DecodeError("the file is empty (0 bytes)")
    if data[:4] in TIFF_MAGIC:
        try:
            return with_channels(decode_tiff(data, max_pixels))
        except DecodeError:
            raise
        except Exception:  # noqa: BLE001 - a TIFF tifffile cannot read (odd photometric, codec missing): OpenCV and Pillow try
            pass
    size = header_size(data)
    if size is not None:
        check_pixels(size[0], size[1], max_pixels)
    buf = np.frombuffer(data, np.uint8)
    # ANYDEPTH keeps 16-bit samples, ANYCOLOR keeps grey as grey; unlike IMREAD_UNCHANGED both honour EXIF orientation
    arr = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if arr is None:
        arr = _decode_with_pillow(data)  # formats OpenCV lacks a codec for in this build (e.g. some palette/CMYK TIFFs)
        if arr is None:
            if size is not None:
                raise DecodeError(f"the {size[2]} image is truncated or corrupt: its header reads but its pixels do not decode")
            raise DecodeError("not a decodable image (unknown or corrupt format)")
        check_pixels(arr.shape[1], arr.shape[0], max_pixels)
        return with_channels(arr)
    check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB)  # 3x cheaper than a reversed-stride copy
    return with_channels(native(arr))


def _decode_with_pillow(data: bytes) -> np.ndarray | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except Exception:  # noqa: BLE001
        return None


def decode_npy(data: bytes, max_pixels: int) -> np.ndarray:
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.ndim not in (2, 3):
        raise DecodeError(f"array has shape {arr.shape}; expected (H,W) or (H,W,C)")
    check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    if arr.dtype.kind not in "biuf":
        raise DecodeError(f"array has non-numeric dtype {arr.dtype}")
    return with_channels(np.ascontiguousarray(native(arr)))


def load(data: bytes, fmt: str, max_pixels: int = 100_000_000) -> np.ndarray:
    """The image as stored: (H, W, C) in its own dtype (see the module docstring)."""
    return decode_npy(data, max_pixels) if fmt == "npy" else decode_encoded(data, max_pixels)


def decode(data: bytes, fmt: str, max_pixels: int = 100_000_000) -> np.ndarray:
    """The image as an RGB uint8 picture (for reports and overlays; the model gets `load`'s image)."""
    return to_rgb(load(data, fmt, max_pixels))


def errors_of(batch: dict[str, np.ndarray]) -> list[str | None]:
    """The batch's `error` column as str | None. A block whose rows are all good stores the column with Arrow's
    null type, and Ray hands that back to the next stage as float NaN, not None."""
    return [e if isinstance(e, str) else None for e in batch["error"]]


EMPTY = np.zeros((1, 1, 3), np.uint8)  # stands in for the image of an error row, so the column keeps one type


def decode_batch(batch: dict[str, np.ndarray], max_pixels: int = 100_000_000) -> dict[str, np.ndarray]:
    """Ray Data stage: adds `image` (as stored, see `load`), `dtype`, `height`, `width`; a bad image sets `error`
    and keeps flowing.

    `dtype` names each image's own dtype: Ray stores a batch's images in one tensor column, which promotes them to
    a common dtype (a uint8 image next to a uint16 one arrives as uint16), and the normalisation depends on it."""
    n = len(batch["image_id"])
    images, heights, widths = [], np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = errors_of(batch)
    for i in range(n):
        img = EMPTY
        if errors[i] is None:
            try:
                img = load(batch["data"][i], batch["format"][i], max_pixels)
                heights[i], widths[i] = img.shape[:2]
            except DecodeError as e:
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - whatever the codec raised, it is this image's error
                errors[i] = f"could not decode ({error_reason(e)})"
        images.append(img)
    out = {k: v for k, v in batch.items() if k not in ("data", "format", "error")}
    out["image"] = ragged_column(images)
    out["dtype"] = np.array([im.dtype.name for im in images], dtype=object)
    out["height"], out["width"] = heights, widths
    out["error"] = np.array(errors, dtype=object)
    return out


def ragged_column(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of ndarrays (Ray stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
