"""Training augmentation: one image and its mask, resized to the model input at a random scale, cropped or padded,
flipped. Plain numpy and OpenCV, tested without Ray; any dtype and channel count (OpenCV resizes up to 512 channels)."""

from __future__ import annotations

import cv2
import numpy as np

IGNORE = 255  # mask value of pixels padded in by augmentation: no loss, no score


def _resize(image: np.ndarray, side: int, interpolation: int) -> np.ndarray:
    out = cv2.resize(image, (side, side), interpolation=interpolation)
    return out[:, :, None] if image.ndim == 3 and out.ndim == 2 else out  # OpenCV drops a single channel's axis


def augment(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator,
            scale: tuple[float, float] = (0.75, 1.25), fill: tuple[float, ...] = (0.485, 0.456, 0.406)) -> tuple[np.ndarray, np.ndarray]:
    """Resize to size*s (s random), then a random crop or pad back to size, then random flips.

    The whole image is first brought to the model input, as prediction does, so train and predict see the
    same scale. Masks are resized with nearest neighbour; padding gets IGNORE in the mask and, in the image, the
    card's mean (`fill`, 0..1 units, one per channel) on the 8-bit scale, so it normalises to zero.
    """
    side = max(8, int(round(size * rng.uniform(*scale))))
    img = _resize(image, side, cv2.INTER_LINEAR)
    msk = cv2.resize(mask, (side, side), interpolation=cv2.INTER_NEAREST)
    if side >= size:
        y, x = rng.integers(0, side - size + 1, size=2)
        img, msk = img[y : y + size, x : x + size], msk[y : y + size, x : x + size]
    else:
        out_img = np.empty((size, size, *img.shape[2:]), img.dtype)
        c = img.shape[2] if img.ndim == 3 else 1
        value = (np.array(fill, np.float64) if len(fill) == c else np.full(c, np.mean(fill))) * 255
        out_img[:] = np.round(value).astype(img.dtype) if img.dtype == np.uint8 else value.astype(img.dtype)
        out_msk = np.full((size, size), IGNORE, np.uint8)
        y, x = rng.integers(0, size - side + 1, size=2)
        out_img[y : y + side, x : x + side], out_msk[y : y + side, x : x + side] = img, msk
        img, msk = out_img, out_msk
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    if rng.random() < 0.5:
        img, msk = img[::-1], msk[::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)
