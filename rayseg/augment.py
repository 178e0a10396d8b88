"""Training augmentation: one image and its mask, rescaled at random (to the model input, or around native scale),
cropped (at random, or around foreground) or padded, flipped. Plain numpy and OpenCV, tested without Ray; any dtype
and channel count (OpenCV resizes up to 512 channels)."""

from __future__ import annotations

import cv2
import numpy as np

IGNORE = 255  # mask value of pixels padded in by augmentation: no loss, no score


def _resize(image: np.ndarray, shape: tuple[int, int], interpolation: int) -> np.ndarray:
    """`image` at (width, height) = `shape`, its channel axis kept."""
    out = cv2.resize(image, shape, interpolation=interpolation)
    return out[:, :, None] if image.ndim == 3 and out.ndim == 2 else out  # OpenCV drops a single channel's axis


def augment(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator,
            scale: tuple[float, float] = (0.75, 1.25), fill: tuple[float, ...] = (0.485, 0.456, 0.406),
            geometry: str = "resize", foreground: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Rescale by a random factor, then a random crop or pad to size x size, then random flips.

    `resize` (cards without a recorded geometry, and the plan's choice for photos of any size) first brings the
    whole image to the model input, size*s, as the predictor resizes it; `native` rescales the image itself by s
    around its own scale, as the predictor's sliding window sees it, and with probability `foreground` centres the
    crop on a foreground pixel (of a class drawn among those present, as nnU-Net samples). Masks are resized with
    nearest neighbour; padding gets IGNORE in the mask and, in the image, the card's mean (`fill`, 0..1 units, one
    per channel) on the 8-bit scale, so it normalises to zero.
    """
    s = rng.uniform(*scale)
    if geometry == "native":
        h, w = image.shape[:2]
        shape = (max(1, int(round(w * s))), max(1, int(round(h * s))))
    else:
        shape = (max(8, int(round(size * s))),) * 2
    img = _resize(image, shape, cv2.INTER_LINEAR)
    msk = cv2.resize(mask, shape, interpolation=cv2.INTER_NEAREST)
    centre = _foreground_pixel(msk, rng) if geometry == "native" and foreground and rng.random() < foreground else None
    img, msk = _crop(img, msk, size, rng, centre)
    img, msk = _pad(img, msk, size, rng, fill)
    if rng.random() < 0.5:
        img, msk = img[:, ::-1], msk[:, ::-1]
    if rng.random() < 0.5:
        img, msk = img[::-1], msk[::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(msk)


def _foreground_pixel(mask: np.ndarray, rng: np.random.Generator) -> tuple[int, int] | None:
    """(y, x) of a random pixel of a random foreground class present in `mask`, or None when there is none."""
    present = [c for c in np.unique(mask) if 0 < c < IGNORE]
    if not present:
        return None
    ys, xs = np.nonzero(mask == rng.choice(present))
    i = rng.integers(len(ys))
    return int(ys[i]), int(xs[i])


def _crop(img: np.ndarray, msk: np.ndarray, size: int, rng: np.random.Generator, centre: tuple[int, int] | None):
    """Each side longer than `size` cut to it: around `centre` where given (kept inside the image), else at random."""
    starts = []
    for axis, length in enumerate(msk.shape[:2]):
        room = length - size
        if room <= 0:
            starts.append(0)
        elif centre is not None:
            starts.append(int(np.clip(centre[axis] - size // 2, 0, room)))
        else:
            starts.append(int(rng.integers(0, room + 1)))
    (y, x), (h, w) = starts, (min(size, msk.shape[0]), min(size, msk.shape[1]))
    return img[y : y + h, x : x + w], msk[y : y + h, x : x + w]


def _pad(img: np.ndarray, msk: np.ndarray, size: int, rng: np.random.Generator, fill: tuple[float, ...]):
    """Each side shorter than `size` padded to it at a random place: the card's mean in the image, IGNORE in the mask."""
    h, w = msk.shape[:2]
    if (h, w) == (size, size):
        return img, msk
    c = img.shape[2] if img.ndim == 3 else 1
    value = (np.array(fill, np.float64) if len(fill) == c else np.full(c, np.mean(fill))) * 255
    out_img = np.empty((size, size, *img.shape[2:]), img.dtype)
    out_img[:] = np.round(value).astype(img.dtype) if img.dtype == np.uint8 else value.astype(img.dtype)
    out_msk = np.full((size, size), IGNORE, np.uint8)
    y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    out_img[y : y + h, x : x + w], out_msk[y : y + h, x : x + w] = img, msk
    return out_img, out_msk
