"""Sliding-window inference: an image much larger than the model input is segmented at full resolution, tile by
tile, and the tiles' logits are blended with Gaussian weights (as nnU-Net does). Blended logits come out in bands of
rows, top to bottom, as soon as no later tile touches them, so the logits held at once span one batch of tiles'
rows plus a tile, never the whole image. The forward pass is any callable, so the window does not depend on the
predictor, and the image may stay on the host while `forward` runs on the device.
"""

from __future__ import annotations

from typing import Callable, Iterator

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


def tile_boxes(h: int, w: int, tile: int, overlap: float) -> list[tuple[int, int]]:
    """The image's one global tile grid: top-left corners (y, x) in row-major order, the order tiles are blended in."""
    th, tw = min(tile, h), min(tile, w)
    return [(y, x) for y in tile_starts(h, th, overlap) for x in tile_starts(w, tw, overlap)]


def run_tiles(forward: Callable[[torch.Tensor], torch.Tensor], tiles: list[torch.Tensor], width: int) -> torch.Tensor:
    """`forward` on exactly `width` tiles (a short batch padded with copies of its last tile), the logits of `tiles`.

    A tile's logits then never depend on the batch it ran in: CPU kernels pick their blocking by batch size, and a
    different pick changes the last bits, which can flip an argmax. The whole-image window and a region of the
    image batch their tiles differently, and must still agree to the bit."""
    n = len(tiles)
    out = forward(torch.cat(tiles + tiles[-1:] * (width - n)))
    return out[:n] if width > n else out


@torch.inference_mode()
def core_logits(window: torch.Tensor, origin: tuple[int, int], shape: tuple[int, int], core: tuple[int, int, int, int],
                tile: int, overlap: float, forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int) -> torch.Tensor:
    """Blended logits (K, y1 - y0, x1 - x0) of one core (y0, y1, x0, x1) of an image of `shape`, from `window`
    (C, h, w or 1, C, h, w): the image's pixels from `origin` (y, x), covering every tile that touches the core.

    The tiles are the whole image's grid (tile_boxes), those touching the core, in the same row-major order and
    batched as wide (run_tiles): each core pixel sums the same tile logits in the same order as blended_bands
    over the whole image, so a mosaic of cores is that sliding window's result, bit for bit."""
    x = window if window.dim() == 4 else window[None]
    (h, w), (y0, y1, x0, x1), (oy, ox) = shape, core, origin
    th, tw = min(tile, h), min(tile, w)
    every = tile_boxes(h, w, tile, overlap)
    boxes = [(y, xx) for y, xx in every if y < y1 and y + th > y0 and xx < x1 and xx + tw > x0]
    width = min(batch_size, len(every))
    acc = norm = wgt = None
    for i in range(0, len(boxes), batch_size):
        part = boxes[i : i + batch_size]
        out = run_tiles(forward, [x[:, :, y - oy : y - oy + th, xx - ox : xx - ox + tw] for y, xx in part], width)
        if acc is None:
            wgt = gaussian_weight(th, tw, out.device)
            acc = torch.zeros((out.shape[1], x.shape[-2], x.shape[-1]), device=out.device)
            norm = torch.zeros((1, x.shape[-2], x.shape[-1]), device=out.device)
        for (y, xx), lg in zip(part, out):
            acc[:, y - oy : y - oy + th, xx - ox : xx - ox + tw].addcmul_(lg, wgt)
            norm[:, y - oy : y - oy + th, xx - ox : xx - ox + tw] += wgt
        del out
    ys, xs = slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox)
    return acc[:, ys, xs] / norm[:, ys, xs]


@torch.inference_mode()
def blended_bands(image: torch.Tensor, tile: int, overlap: float, forward: Callable[[torch.Tensor], torch.Tensor],
                  batch_size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(y0, y1, blended logits (K, y1 - y0, W)) of `image` (C, H, W or 1, C, H, W), band after band down the image.

    `forward` (NCHW -> NKHW) runs on `batch_size` tiles of side `tile` (cut to the image where it is smaller) at a
    time, in row-major order; the accumulator covers only the rows from the first one not yet final to the bottom
    of the last tile run. Each pixel sums the same tiles in the same order as one full-image accumulator would,
    so the bands are exactly its rows."""
    x = image if image.dim() == 4 else image[None]
    h, w = x.shape[-2:]
    th, tw = min(tile, h), min(tile, w)
    boxes = tile_boxes(h, w, tile, overlap)
    width = min(batch_size, len(boxes))
    wgt = acc = norm = None
    top, rows = 0, 0  # acc[:, :rows] and norm[:, :rows] hold image rows [top, top + rows)
    for i in range(0, len(boxes), batch_size):
        part = boxes[i : i + batch_size]
        out = run_tiles(forward, [x[:, :, y : y + th, xx : xx + tw] for y, xx in part], width)
        if wgt is None:  # the device and the class count are known once the model has answered
            wgt = gaussian_weight(th, tw, out.device)
            acc = torch.empty((out.shape[1], 0, w), device=out.device)
            norm = torch.empty((1, 0, w), device=out.device)
        need = part[-1][0] + th - top
        if need > acc.shape[1]:  # a larger buffer, kept for the rest of the image
            acc = torch.cat([acc[:, :rows], acc.new_empty((acc.shape[0], need - rows, w))], dim=1)
            norm = torch.cat([norm[:, :rows], norm.new_empty((1, need - rows, w))], dim=1)
        if need > rows:
            acc[:, rows:need].zero_()
            norm[:, rows:need].zero_()
            rows = need
        for (y, xx), lg in zip(part, out):
            acc[:, y - top : y - top + th, xx : xx + tw].addcmul_(lg, wgt)
            norm[:, y - top : y - top + th, xx : xx + tw] += wgt
        del out
        done = boxes[i + batch_size][0] if i + batch_size < len(boxes) else h  # no later tile touches rows above this
        if done > top:
            n = done - top
            yield top, done, acc[:, :n] / norm[:, :n]
            # the rows still open move to the front of the same buffers
            acc[:, : rows - n] = acc[:, n:rows].clone()
            norm[:, : rows - n] = norm[:, n:rows].clone()
            top, rows = done, rows - n


def sliding_window(image: torch.Tensor, tile: int, overlap: float, forward: Callable[[torch.Tensor], torch.Tensor],
                   batch_size: int) -> torch.Tensor:
    """Logits (K, H, W) of `image` (C, H, W or 1, C, H, W) from `forward` (NCHW -> NKHW) run on tiles of side `tile`
    (cut to the image where it is smaller), `batch_size` tiles per call, blended with Gaussian weights. The whole
    image's logits at once: for what needs them all; the predictor takes the bands (blended_bands)."""
    return torch.cat([band for _, _, band in blended_bands(image, tile, overlap, forward, batch_size)], dim=1)
