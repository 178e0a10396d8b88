"""Sliding-window inference: an image much larger than the model input is segmented at full resolution, tile by
tile, and the tiles' logits are blended with Gaussian weights (as nnU-Net does), so memory is bounded by the tile,
not the image. The forward pass is any callable, so the window does not depend on the predictor.
"""

from __future__ import annotations

from typing import Callable

import torch


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of side `tile` along one axis: a step of tile * (1 - overlap), and a last tile flush
    with the end, so every pixel is covered and no tile hangs over the edge."""
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def gaussian_weight(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Tile blending weights: high in the centre, low (never zero) at the borders; sigma = side / 8 as in nnU-Net."""

    def g(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(n / 8, 1e-3)) ** 2)

    wgt = g(h)[:, None] * g(w)[None, :]
    wgt = wgt / wgt.max()
    return wgt.clamp_min(1e-3)


@torch.inference_mode()
def sliding_window(image: torch.Tensor, tile: int, overlap: float, forward: Callable[[torch.Tensor], torch.Tensor],
                   batch_size: int) -> torch.Tensor:
    """Logits (K, H, W) of `image` (C, H, W or 1, C, H, W) from `forward` (NCHW -> NKHW) run on tiles of side `tile`
    (cut to the image where it is smaller), `batch_size` tiles per call, blended with Gaussian weights."""
    x = image if image.dim() == 4 else image[None]
    h, w = x.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    wgt = gaussian_weight(th, tw, x.device)
    boxes = [(y, xx) for y in tile_starts(h, th, overlap) for xx in tile_starts(w, tw, overlap)]
    acc = norm = None
    for i in range(0, len(boxes), batch_size):
        part = boxes[i : i + batch_size]
        out = forward(torch.cat([x[:, :, y : y + th, xx : xx + tw] for y, xx in part]))
        if acc is None:  # the class count is known once the model has answered
            acc = torch.zeros((out.shape[1], h, w), device=x.device)
            norm = torch.zeros((1, h, w), device=x.device)
        for (y, xx), lg in zip(part, out):
            acc[:, y : y + th, xx : xx + tw] += lg * wgt
            norm[:, y : y + th, xx : xx + tw] += wgt
    return acc / norm
