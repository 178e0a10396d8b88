"""Huge test images built offline: scikit-image's `ihc.png` (immunohistochemistry, BSD-3-Clause, shipped inside
the scikit-image wheel) tiled procedurally into a pyramidal tiled TIFF, and seeded models whose masks hold both
classes (a random head bias alone would decide the class of every pixel)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch


def ihc() -> np.ndarray:
    """(512, 512, 3) uint8 RGB, from the installed scikit-image wheel (no download)."""
    import skimage

    return np.ascontiguousarray(cv2.imread(str(Path(skimage.__file__).parent / "data" / "ihc.png"))[:, :, ::-1])


def tiled_picture(side: int) -> np.ndarray:
    """ihc repeated to side x side, every other copy mirrored, so the seams are not periodic in the tile grid."""
    base, flip = ihc(), ihc()[::-1, ::-1]
    n = -(-side // 512)
    rows = [np.concatenate([base if (i + j) % 2 == 0 else flip for j in range(n)], axis=1) for i in range(n)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0)[:side, :side])


def write_pyramid(path, img: np.ndarray, levels: int = 3, tile: int = 256) -> str:
    """A tiled pyramidal TIFF as slide scanners write it: level 0, then SubIFDs halving each time (zlib tiles)."""
    with tifffile.TiffWriter(path, bigtiff=img.nbytes > 2**31) as tw:
        tw.write(img, tile=(tile, tile), subifds=levels - 1, compression="zlib", photometric="rgb")
        for k in range(1, levels):
            tw.write(img[:: 2**k, :: 2**k], tile=(tile, tile), subfiletype=1, compression="zlib", photometric="rgb")
    return str(path)


def balance(model: torch.nn.Module, bias: torch.Tensor, sample: np.ndarray) -> torch.nn.Module:
    """Shifts class 1's bias so that its logit is above class 0's on half of `sample`'s pixels."""
    from rayseg.models import default_mean_std

    mean, std = (torch.tensor(v)[:, None, None] for v in default_mean_std(3))
    x = ((torch.from_numpy(sample).permute(2, 0, 1).float() / 255 - mean) / std)[None]
    with torch.inference_mode():
        out = model(x)
        out = out["out"] if isinstance(out, dict) else out
        shift = (out[0, 1] - out[0, 0]).median()
    with torch.no_grad():
        bias[1] -= shift
    return model.eval()


def balanced(architecture: str) -> torch.nn.Module:
    """A seeded model with both classes in its masks: a tiny UNet (width 4, depth 2) or torchvision's lraspp."""
    from rayseg.models import UNet, build_model

    torch.manual_seed(0)
    sample = ihc()[:256, :256]
    if architecture == "unet":
        model = UNet(2, width=4, depth=2).eval()
        return balance(model, model.head.bias, sample)
    model = build_model(architecture, 2).eval()
    return balance(model, model.model.classifier.high_classifier.bias, sample)
