"""The sliding window alone: tiles cover every pixel, the blend weights are a centred bump, and for a per-pixel
forward pass the stitched logits equal the forward pass over the whole image, however the image is cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayseg.tiling import gaussian_weight, sliding_window, tile_starts

K = 4


@pytest.fixture(scope="module")
def conv() -> torch.nn.Conv2d:
    torch.manual_seed(0)
    return torch.nn.Conv2d(3, K, 1).eval()


@pytest.mark.parametrize("length,tile,overlap", [(150, 64, 0.25), (231, 64, 0.25), (100, 32, 0.0), (97, 32, 0.5),
                                                 (64, 64, 0.25), (65, 64, 0.9), (10, 64, 0.25), (500, 17, 0.99)])
def test_tiles_cover_every_pixel_and_stay_inside(length, tile, overlap):
    side = min(tile, length)
    starts = tile_starts(length, side, overlap)
    assert starts[0] == 0 and starts[-1] == length - side
    assert starts == sorted(set(starts))
    assert all(b - a <= side for a, b in zip(starts, starts[1:]))  # no gap between neighbours
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + side] = True
    assert covered.all()


def test_tile_step_follows_the_overlap():
    assert tile_starts(256, 64, 0.25) == [0, 48, 96, 144, 192]
    assert tile_starts(256, 64, 0.0) == [0, 64, 128, 192]
    assert tile_starts(150, 64, 0.25) == [0, 48, 86]  # the last tile is flush with the end: it overlaps more


@pytest.mark.parametrize("h,w", [(64, 64), (33, 64), (7, 5), (1, 9)])
def test_gaussian_weight_is_positive_and_peaks_in_the_centre(h, w):
    wgt = gaussian_weight(h, w, torch.device("cpu"))
    assert wgt.shape == (h, w) and wgt.dtype == torch.float32
    assert (wgt > 0).all() and wgt.max() == 1
    assert wgt[(h - 1) // 2, (w - 1) // 2] == 1 and wgt[h // 2, w // 2] == 1
    assert wgt[0, 0] == wgt.min()
    assert torch.equal(wgt, wgt.flip(0)) and torch.equal(wgt, wgt.flip(1))  # symmetric about the centre
    assert (wgt[: (h + 1) // 2].diff(dim=0) >= 0).all() and (wgt[:, : (w + 1) // 2].diff(dim=1) >= 0).all()  # rising to it


@pytest.mark.parametrize("h,w", [(150, 231), (64, 64), (97, 40), (20, 300)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_stitched_logits_equal_the_whole_image_forward(conv, h, w, overlap):
    image = torch.rand((3, h, w), generator=torch.Generator().manual_seed(h * w)) * 255
    with torch.inference_mode():
        want = conv(image[None])[0]
    got = sliding_window(image, 64, overlap, conv, batch_size=3)
    assert got.shape == (K, h, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_batched_input_and_batch_size_give_the_same_logits(conv):
    image = torch.rand((1, 3, 100, 130), generator=torch.Generator().manual_seed(1))
    one = sliding_window(image, 48, 0.25, conv, batch_size=1)
    many = sliding_window(image[0], 48, 0.25, conv, batch_size=64)
    torch.testing.assert_close(one, many)


def test_forward_gets_batches_of_tiles_of_the_tile_size():
    seen = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x[:, :2]

    out = sliding_window(torch.zeros((3, 100, 150)), 64, 0.25, forward, batch_size=4)
    assert tile_starts(100, 64, 0.25) == [0, 36] and tile_starts(150, 64, 0.25) == [0, 48, 86]  # 2 x 3 tiles
    assert out.shape == (2, 100, 150)
    assert [n for n, *_ in seen] == [4, 4]  # the last batch padded to the same width: a tile's logits never depend on its batch
    assert all(shape[1:] == (3, 64, 64) for shape in seen)


def test_an_image_smaller_than_the_tile_is_one_forward_pass(conv):
    image = torch.rand((3, 30, 50), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = conv(image[None])[0]
    torch.testing.assert_close(sliding_window(image, 64, 0.25, conv, batch_size=2), want)
