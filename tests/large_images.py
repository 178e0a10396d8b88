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


GLASS = (236, 236, 232)  # a bright-field slide's empty glass: near white, as scanners see it
LAYOUT_SCALE = 16  # level-0 pixels per cell of a slide's tissue layout: tissue edges fall inside overview pixels


def slide_layout(side: int, seed: int = 0) -> np.ndarray:
    """Boolean (side // 16, side // 16): where a procedural slide has tissue, a few ellipses of tissue sections
    near its middle covering about 35% of it, the rest glass. Tissue at level-0 pixel (y, x) is layout[y // 16, x // 16]."""
    n = side // LAYOUT_SCALE
    rng = np.random.default_rng(seed)
    layout = np.zeros((n, n), np.uint8)
    while layout.mean() < 0.35:
        centre = (int(rng.integers(n // 4, n - n // 4)), int(rng.integers(n // 4, n - n // 4)))
        axes = (int(rng.integers(n // 8, n // 4)), int(rng.integers(n // 8, n // 4)))
        cv2.ellipse(layout, centre, axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
    return layout.astype(bool)


def slide_tile(layout: np.ndarray, level: int, y0: int, x0: int, tile: int) -> np.ndarray:
    """The (tile, tile, 3) pixels at (y0, x0) of `level` of the slide: ihc where the layout has tissue, glass
    with a little noise elsewhere; a level k pixel is level 0's pixel at (y << k, x << k), as write_pyramid strides."""
    ys = (np.arange(y0, y0 + tile) << level)[:, None]
    xs = (np.arange(x0, x0 + tile) << level)[None, :]
    side = layout.shape[0] * LAYOUT_SCALE
    ys, xs = np.minimum(ys, side - 1), np.minimum(xs, side - 1)
    tissue = layout[ys // LAYOUT_SCALE, xs // LAYOUT_SCALE]
    out = ihc()[ys % 512, xs % 512]
    glass = np.asarray(GLASS, np.int16) + ((ys * 7 + xs * 13) % 5 - 2)[..., None]  # deterministic noise of +-2
    return np.where(tissue[..., None], out, glass.astype(np.uint8))


def write_slide(path, side: int, seed: int = 0, tile: int = 256, overview: int = 512, quality: int = 80) -> tuple[str, np.ndarray]:
    """(path, tissue layout): an SVS-like pyramid of side x side written tile by tile (JPEG tiles, an Aperio-style
    description with MPP = 0.25), never held whole in memory; levels halve down to `overview` pixels."""
    layout = slide_layout(side, seed)
    levels = max(1, int(np.log2(side // overview)) + 1)

    def tiles(level: int):
        n = side >> level
        for y in range(0, n, tile):
            for x in range(0, n, tile):
                yield slide_tile(layout, level, y, x, tile)

    desc = f"Aperio Image Library v12.0.0\r\n{side}x{side} [0,0 {side}x{side}] ({tile}x{tile}) JPEG Q={quality}|AppMag = 40|MPP = 0.25"
    with tifffile.TiffWriter(path, bigtiff=side * side * 3 > 2**31) as tw:
        opts = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": quality}, "photometric": "rgb", "dtype": np.uint8}
        tw.write(tiles(0), shape=(side, side, 3), subifds=levels - 1, description=desc, **opts)
        for k in range(1, levels):
            tw.write(tiles(k), shape=(side >> k, side >> k, 3), subfiletype=1, **opts)
    return str(path), layout
