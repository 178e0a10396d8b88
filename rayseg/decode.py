"""Bytes or arrays -> RGB uint8 images, with a pixel limit checked before any pixel is decoded.

Scaling rules for arrays that are not uint8 (HDF5 datasets, 16-bit and float image files):
- bool: False -> 0, True -> 255
- uint8: as is
- uint16: value / 257 (65535 -> 255), the usual 16-bit to 8-bit mapping
- float with every value in [0, 1]: value * 255
- any other dtype, or floats outside [0, 1]: min-max stretched per image to 0..255 (a constant image -> 0)
NaN and inf become 0. Channels: 1 -> grey repeated to RGB; 3 -> RGB as stored (HDF5) or BGR from OpenCV
(converted); 4 -> alpha dropped. EXIF orientation of JPEG/TIFF files is applied.
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from rayseg.shards import error_reason

cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # bad files are reported as error rows, not codec chatter
cv2.setNumThreads(1)  # decode runs many tasks in parallel; OpenCV's own threads would oversubscribe the cores


class DecodeError(ValueError):
    pass


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


def to_rgb(arr: np.ndarray, bgr: bool) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise DecodeError(f"image array has shape {arr.shape}; expected (H,W) or (H,W,C)")
    c = arr.shape[2]
    if c == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif c == 4:
        arr = arr[:, :, :3]
    elif c != 3:
        raise DecodeError(f"image has {c} channels; expected 1, 3 or 4")
    arr = to_uint8(arr)
    if bgr:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)  # 3x cheaper than a reversed-stride numpy copy
    return np.ascontiguousarray(arr)


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


def decode_encoded(data: bytes, max_pixels: int) -> np.ndarray:
    if len(data) == 0:
        raise DecodeError("the file is empty (0 bytes)")
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
        return to_rgb(arr, bgr=False)
    check_pixels(arr.shape[1], arr.shape[0], max_pixels)
    return to_rgb(arr, bgr=arr.ndim == 3 and arr.shape[2] >= 3)


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
    return to_rgb(arr, bgr=False)


def decode(data: bytes, fmt: str, max_pixels: int = 100_000_000) -> np.ndarray:
    return decode_npy(data, max_pixels) if fmt == "npy" else decode_encoded(data, max_pixels)


def errors_of(batch: dict[str, np.ndarray]) -> list[str | None]:
    """The batch's `error` column as str | None. A block whose rows are all good stores the column with Arrow's
    null type, and Ray hands that back to the next stage as float NaN, not None."""
    return [e if isinstance(e, str) else None for e in batch["error"]]


EMPTY = np.zeros((1, 1, 3), np.uint8)  # stands in for the image of an error row, so the column keeps one type


def decode_batch(batch: dict[str, np.ndarray], max_pixels: int = 100_000_000) -> dict[str, np.ndarray]:
    """Ray Data stage: adds `image`, `height`, `width`; a bad image sets `error` and keeps flowing."""
    n = len(batch["image_id"])
    images, heights, widths = [], np.zeros(n, np.int32), np.zeros(n, np.int32)
    errors = errors_of(batch)
    for i in range(n):
        img = EMPTY
        if errors[i] is None:
            try:
                img = decode(batch["data"][i], batch["format"][i], max_pixels)
                heights[i], widths[i] = img.shape[:2]
            except DecodeError as e:
                errors[i] = str(e)
            except Exception as e:  # noqa: BLE001 - whatever the codec raised, it is this image's error
                errors[i] = f"could not decode ({error_reason(e)})"
        images.append(img)
    out = {k: v for k, v in batch.items() if k not in ("data", "format", "error")}
    out["image"] = ragged_column(images)
    out["height"], out["width"] = heights, widths
    out["error"] = np.array(errors, dtype=object)
    return out


def ragged_column(arrays: list[np.ndarray]) -> np.ndarray:
    """An object array of ndarrays (Ray stores it as a variable-shaped tensor column)."""
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out
