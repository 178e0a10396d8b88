"""Intensity normalisation: specs, what each mode does to an image, the card's record, the dataset statistics."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from rayseg import intensity
from rayseg.decode import ragged_column, to_uint8
from rayseg.errors import UserError
from rayseg.intensity import Inputs, Intensity, fit_channels, local_rows, measure, normalise, parse
from rayseg.models import ModelCard


def fluorescence(top: int, seed: int = 0, shape=(64, 64)) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit image with signal in 0..top (skewed: most pixels dark), 0.1% hot pixels at 65535, and its 8-bit
    rescaled copy (the band stretched to 0..255, hot pixels saturated)."""
    rng = np.random.default_rng(seed)
    s = np.clip(rng.normal(0.25, 0.1, shape), 0, 1)
    s[16:40, 16:40] = np.clip(rng.normal(0.8, 0.05, (24, 24)), 0, 1)
    v = np.round(s**2.2 * top).astype(np.uint16)
    v[rng.random(shape) < 0.001] = 65535
    copy8 = np.round(np.clip(v / top, 0, 1) * 255).astype(np.uint8)
    return v[..., None], copy8[..., None]


@pytest.mark.parametrize("spec, expected", [
    ("auto", Intensity("auto")),
    ("percentile", Intensity("percentile", 1.0, 99.8)),
    ("percentile:1:99", Intensity("percentile", 1.0, 99.0)),
    ("fixed:-1000:400", Intensity("fixed", -1000.0, 400.0)),
    ("dataset", Intensity("dataset", 0.5, 99.5)),
    ("none", Intensity("none")),
])
def test_specs_parse(spec, expected):
    assert parse(spec) == expected
    assert parse(expected.spec()) == expected


@pytest.mark.parametrize("spec", ["percentile:5", "fixed:3:1", "fixed", "percentile:50:20", "zscore", "fixed:a:b"])
def test_bad_specs_say_what_is_accepted(spec):
    with pytest.raises(UserError, match="--intensity"):
        parse(spec)


def test_8bit_images_take_the_fast_path_unchanged():
    img = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert normalise(img, Intensity("auto")) is img
    assert normalise(img, Intensity("none")) is img
    assert normalise(img, Intensity("legacy")) is img


@pytest.mark.parametrize("top", [300, 65535])
def test_auto_puts_a_16bit_band_where_its_8bit_copy_is(top):
    v, copy8 = fluorescence(top)
    deep = normalise(v, Intensity("auto"))
    shallow = normalise(copy8, Intensity("percentile", 1, 99.8))
    assert deep.dtype == np.float32 and deep.min() >= 0 and deep.max() <= 255
    # the same picture: 16-bit and its 8-bit copy agree to within the copy's rounding
    assert np.abs(deep - shallow).mean() < 1.5
    assert np.corrcoef(deep.ravel(), copy8.ravel().astype(float))[0, 1] > 0.97
    # what record-less checkpoints did: 0..300 becomes 0..1
    if top == 300:
        assert to_uint8(v).max() <= 2 or np.percentile(to_uint8(v), 99) <= 1


def test_fixed_window_clips_and_maps_to_the_8bit_scale():
    ct = np.array([[-2000, -1000, -300, 400, 3000]], np.int16)[..., None]
    out = normalise(ct, Intensity("fixed", -1000, 400))[0, :, 0]
    assert out.tolist() == pytest.approx([0, 0, 127.5, 255, 255])


def test_percentile_is_per_channel_and_a_constant_channel_is_zero():
    img = np.stack([np.arange(100, dtype=np.float32).reshape(10, 10), np.full((10, 10), 7, np.float32)], axis=-1)
    out = normalise(img, Intensity("percentile", 0, 100))
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert (out[..., 1] == 0).all()


def test_dataset_mode_gives_the_model_a_zscore_of_the_clipped_values():
    img = np.array([[0, 100, 200, 5000]], np.uint16)[..., None]
    norm = Intensity("dataset", 0.5, 99.5, ((50.0, 1000.0),), (300.0,), (150.0,), 10)
    mean, std = (0.449,), (0.226,)
    y = normalise(img, norm, mean, std)
    model_input = (y / 255 - mean[0]) / std[0]  # what the predictor does on the device
    expected = (np.clip(img.astype(float), 50, 1000) - 300) / 150
    assert model_input == pytest.approx(expected, abs=1e-4)


def test_record_less_cards_divide_16bit_by_257_and_warn_once_about_a_narrow_band(caplog, monkeypatch):
    monkeypatch.setattr(intensity, "_warned_sparse", False)
    v, _ = fluorescence(300)
    v[v == 65535] = 250  # no hot pixels: the band alone
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        out = normalise(v, Intensity("legacy"))
        normalise(v, Intensity("legacy"))
    assert np.array_equal(out, to_uint8(v))
    warnings = [r for r in caplog.records if "1/64 of their range" in r.getMessage()]
    assert len(warnings) == 1 and "--intensity" in warnings[0].getMessage()


def test_card_without_a_record_is_legacy_and_a_record_round_trips():
    assert Intensity.from_json(None).mode == "legacy"
    norm = Intensity("dataset", 0.5, 99.5, ((1.0, 2.0), (3.0, 4.0)), (1.5, 3.5), (0.2, 0.3), 99)
    assert Intensity.from_json(norm.to_json()) == norm
    card = ModelCard.from_json({"architecture": "unet", "num_classes": 2})
    assert card.in_channels == 3 and card.intensity is None and card.normalisation() == "legacy"


def test_an_override_wins_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="rayseg"):
        got = intensity.resolve({"mode": "auto"}, "fixed:0:1000")
    assert got == Intensity("fixed", 0, 1000) and "overrides the checkpoint" in caplog.text
    with pytest.raises(UserError, match="dataset"):
        intensity.resolve({"mode": "auto"}, "dataset")
    assert intensity.effective(None) == "legacy" and intensity.effective({"mode": "auto"}, "none") == "none"


def test_channels_fit_the_model_or_name_both_counts():
    grey = np.zeros((4, 4, 1), np.uint8)
    assert fit_channels(grey, 1) is grey
    assert fit_channels(grey, 3).shape == (4, 4, 3)
    assert fit_channels(np.zeros((4, 4, 4), np.uint8), 3).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="image has 5 channels; the model takes 3"):
        fit_channels(np.zeros((4, 4, 5), np.uint8), 3)


def test_inputs_restore_each_images_dtype_and_make_error_rows_for_channels():
    card = ModelCard("unet", 2, in_channels=1, mean=(0.449,), std=(0.226,), intensity={"mode": "auto"})
    inputs = Inputs(card)
    eight = np.full((4, 4, 1), 200, np.uint16)  # a uint8 image that Ray promoted next to a 16-bit one
    deep = np.arange(16, dtype=np.uint16).reshape(4, 4, 1) * 1000
    rgb = np.zeros((4, 4, 3), np.uint16)
    out, errors = inputs(ragged_column([eight, deep, rgb, eight]), ["uint8", "uint16", "uint8", "uint8"],
                         [None, None, None, "could not read"])
    assert out[0].dtype == np.uint8 and (out[0] == 200).all()  # back to 8-bit: the fast path
    assert out[1].dtype == np.float32 and out[1].max() == 255
    assert errors == [None, None, "image has 3 channels; the model takes 1", "could not read"]


def test_grey_into_an_rgb_model_is_normalised_once_then_repeated():
    card = ModelCard("unet", 2, intensity={"mode": "auto"})
    v, _ = fluorescence(300)
    out = Inputs(card).one(v)
    assert out.shape == (64, 64, 3) and np.array_equal(out[..., 0], out[..., 2])


def test_measure_matches_numpy_over_the_foreground():
    rng = np.random.default_rng(3)
    batches = []
    for b in range(3):
        images = [rng.integers(0, 4000, (8, 9, 2)).astype(np.uint16) for _ in range(4)]
        targets = [rng.integers(0, 2, (8, 9)).astype(np.uint8) for _ in range(4)]
        batches.append({"image": images, "target": targets, "dtype": ["uint16"] * 4})
    seen, norm = measure(local_rows(batches), parse("dataset"))
    fg = np.concatenate([im[t > 0] for b in batches for im, t in zip(b["image"], b["target"])]).astype(float)
    assert seen["channels"] == {2: 12}
    for c in range(2):
        assert norm.window[c] == pytest.approx(tuple(np.percentile(fg[:, c], [0.5, 99.5])))
        assert norm.mean[c] == pytest.approx(fg[:, c].mean()) and norm.std[c] == pytest.approx(fg[:, c].std())
    assert norm.pixels == len(fg)


def test_measure_of_float_data_is_close_to_numpy():
    rng = np.random.default_rng(4)
    images = [rng.lognormal(0, 1, (16, 16, 1)).astype(np.float32) for _ in range(6)]
    batch = {"image": images, "target": [np.ones((16, 16), np.uint8)] * 6, "dtype": ["float32"] * 6}
    _, norm = measure(local_rows([batch]), parse("dataset"))
    all_px = np.concatenate([i.ravel() for i in images])
    lo, hi = np.percentile(all_px, [0.5, 99.5])
    span = all_px.max() - all_px.min()
    assert abs(norm.window[0][0] - lo) < span / 1000 and abs(norm.window[0][1] - hi) < span / 1000


def test_model_channels():
    assert intensity.model_channels({1: 10}, None) == 1
    assert intensity.model_channels({5: 3}, None) == 5
    assert intensity.model_channels({1: 2, 3: 8}, None) == 3
    with pytest.raises(UserError, match="different channel counts"):
        intensity.model_channels({2: 1, 5: 1}, None)
    with pytest.raises(UserError, match="--in-channels 4"):
        intensity.model_channels({5: 1}, 4)


def test_nonzero_zscores_each_image_over_its_nonzero_pixels_and_keeps_zeros_at_zero():
    rng = np.random.default_rng(0)
    img = np.zeros((32, 32, 1), np.uint16)
    img[8:24, 8:24, 0] = rng.normal(3000, 200, (16, 16)).astype(np.uint16)
    norm, mean, std = parse("nonzero"), (0.449,), (0.226,)
    assert norm == Intensity("nonzero") and norm.to_json() == {"mode": "nonzero", "spec": "nonzero"}
    y = normalise(img, norm, mean, std)
    z = (y / 255 - mean[0]) / std[0]  # what the device computes
    inside = z[8:24, 8:24]
    assert inside.mean() == pytest.approx(0, abs=1e-4) and inside.std() == pytest.approx(1, abs=1e-3)
    assert np.allclose(z[:8], 0, atol=1e-5)
    assert np.allclose(normalise(img * 3, norm, mean, std), y, atol=1e-2)  # a slice scaled by 3 reads the same


def test_an_exported_graph_normalises_nonzero_as_the_host_does():
    import torch

    from rayseg.export import Exported

    card = ModelCard("unet", 2, in_channels=1, mean=(0.449,), std=(0.226,), intensity={"mode": "nonzero", "spec": "nonzero"})
    graph = Exported(torch.nn.Identity(), card, parse("nonzero"), 1, False, False)
    rng = np.random.default_rng(1)
    img = np.zeros((20, 24, 1), np.uint16)
    img[4:16, 5:20, 0] = rng.integers(100, 4000, (12, 15))
    host = normalise(img, parse("nonzero"), card.mean, card.std)[..., 0]
    in_graph = graph.scaled(torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None])[0, 0].numpy()
    assert np.allclose(in_graph, host, atol=1e-2)
