"""The predictor on one batch, without Ray: one output row per input row, in order, each mask at its image's size,
error rows passed through, and the same masks whichever way (stacked, resized, tiled) an image went."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rayseg.config import PredictConfig
from rayseg.decode import EMPTY
from rayseg.models import load_bundle
from rayseg.predict import Predictor

K, SIZE = 3, 32


def batch_of(images: list[np.ndarray], errors: list[str | None] | None = None) -> dict[str, np.ndarray]:
    """What decode_batch hands the predictor: image_id, image (object array of HWC uint8), height, width, error."""
    n = len(images)
    batch = {"image_id": np.array([f"img{i}" for i in range(n)], dtype=object), "image": np.empty(n, dtype=object),
             "height": np.array([im.shape[0] for im in images], np.int32), "width": np.array([im.shape[1] for im in images], np.int32),
             "error": np.array(errors or [None] * n, dtype=object)}
    batch["image"][:] = images
    return batch


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for shape in
            [(SIZE, SIZE, 3), (45, 20, 3), (SIZE, SIZE, 3), (70, 90, 3)]]  # model size, another size, model size, > 2x: tiled


@pytest.fixture(scope="module", params=["pointwise", "unet"])
def predictor(request) -> Predictor:
    bundle = load_bundle(None, request.param, num_classes=K, input_size=SIZE)
    return Predictor(bundle, PredictConfig(device="cpu", batch_size=4), threads=1, confidence_map=True)


def test_mixed_batch_gives_one_row_per_input_in_order(predictor):
    imgs = images()
    rows = imgs[:2] + [EMPTY] + imgs[2:]
    batch = batch_of(rows, [None, None, "could not decode (truncated)", None, None])
    out = predictor(batch)

    assert set(out) == {"image_id", "height", "width", "error", "mask", "mean_confidence", "confidence", "model"}
    assert list(out["image_id"]) == list(batch["image_id"])
    assert np.array_equal(out["height"], batch["height"]) and np.array_equal(out["width"], batch["width"])
    assert list(out["error"]) == [None, None, "could not decode (truncated)", None, None]
    assert list(out["model"]) == [predictor.label] * 5
    for i in (0, 1, 3, 4):
        mask, conf = out["mask"][i], out["confidence"][i]
        assert mask.shape == conf.shape == rows[i].shape[:2] and mask.dtype == conf.dtype == np.uint8
        assert mask.max() < K and 1 / K <= out["mean_confidence"][i] <= 1
    assert out["mask"][2].shape == (1, 1) and out["confidence"][2].shape == (1, 1)
    assert np.isnan(out["mean_confidence"][2])


def test_grouping_does_not_change_the_masks(predictor):
    imgs = images()
    together = predictor(batch_of(imgs))
    for i, img in enumerate(imgs):
        alone = predictor(batch_of([img]))
        assert np.array_equal(together["mask"][i], alone["mask"][0]), i
        assert np.abs(together["confidence"][i].astype(int) - alone["confidence"][0]).max() <= 1
        assert together["mean_confidence"][i] == pytest.approx(alone["mean_confidence"][0], rel=1e-5)


def test_images_are_grouped_by_how_they_are_run(predictor):
    same, other, big = images()[0], images()[1], images()[3]
    no_error = [None] * 4
    assert predictor.groups([same, same, big, same], no_error) == ([0, 1, 3], [], [2])  # all at the model's size: one stack
    assert predictor.groups([same, other, big, same], no_error) == ([], [0, 1, 3], [2])  # one other size: all resized
    assert predictor.groups([same, EMPTY, big, other], [None, "bad", None, None]) == ([], [0, 3], [2])


def test_a_batch_of_errors_only_passes_through(predictor):
    out = predictor(batch_of([EMPTY, EMPTY], ["not an image", "too many pixels"]))
    assert list(out["error"]) == ["not an image", "too many pixels"]
    assert [m.shape for m in out["mask"]] == [(1, 1), (1, 1)] and np.isnan(out["mean_confidence"]).all()


def test_without_confidence_map_there_is_no_confidence_column():
    predictor = Predictor(load_bundle(None, "pointwise", num_classes=K, input_size=SIZE), PredictConfig(device="cpu"), threads=1)
    out = predictor(batch_of(images()))
    assert "confidence" not in out and [m.shape for m in out["mask"]] == [im.shape[:2] for im in images()]


def out_of_memory_above(predictor: Predictor, limit: int, never_fits=lambda x: torch.zeros(1, dtype=torch.bool)) -> list[int]:
    """Make the model raise torch.OutOfMemoryError on more than `limit` images at once, or on an image for which
    `never_fits` (normalised NCHW -> bool per image) holds; returns the batch sizes it was called with."""
    model, seen = predictor.model, []

    def forward(x):
        seen.append(x.shape[0])
        if x.shape[0] > limit or bool(never_fits(x).any()):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return model(x)

    predictor.model = forward
    return seen


def test_out_of_memory_halves_the_batch_and_the_masks_stay_the_same():
    bundle = load_bundle(None, "unet", num_classes=K, input_size=SIZE)
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(8)]
    want = Predictor(bundle, PredictConfig(device="cpu", batch_size=8), threads=1)(batch_of(imgs))
    reported = []
    predictor = Predictor(bundle, PredictConfig(device="cpu", batch_size=8), threads=1, report=lambda key, info: reported.append(info["batch_size"]))
    seen = out_of_memory_above(predictor, 2)
    got = predictor(batch_of(imgs))
    assert seen == [8, 4, 2, 2, 2, 2] and predictor.batch_size == 2
    assert reported == [8, 4, 2]  # the summary records the batch size actually used
    assert list(got["error"]) == [None] * 8
    for a, b in zip(want["mask"], got["mask"]):
        assert np.array_equal(a, b)


def test_an_image_that_never_fits_becomes_an_error_row_and_the_rest_succeed():
    bundle = load_bundle(None, "pointwise", num_classes=K, input_size=SIZE)
    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 128, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(5)]
    imgs[3] = np.full((SIZE, SIZE, 3), 255, np.uint8)  # the one that "never fits": only it is bright everywhere
    big = rng.integers(0, 128, (3 * SIZE, 3 * SIZE, 3), dtype=np.uint8)  # tiled, 4 tiles of batch 4 -> 2 -> 1
    predictor = Predictor(bundle, PredictConfig(device="cpu", batch_size=4), threads=1)
    want = Predictor(bundle, PredictConfig(device="cpu", batch_size=4), threads=1)(batch_of(imgs + [big]))
    out_of_memory_above(predictor, 4, never_fits=lambda x: x.flatten(1).amin(1) > 1.5)
    got = predictor(batch_of(imgs + [big]))
    assert [e is None for e in got["error"]] == [True, True, True, False, True, True]
    assert "out of device memory" in got["error"][3] and f"{SIZE}x{SIZE}" in got["error"][3]
    assert got["mask"][3].shape == (1, 1) and np.isnan(got["mean_confidence"][3])
    for i in (0, 1, 2, 4, 5):
        assert np.array_equal(want["mask"][i], got["mask"][i]), i
    assert predictor.batch_size == 1


def test_a_tiled_image_that_never_fits_becomes_an_error_row():
    predictor = Predictor(load_bundle(None, "pointwise", num_classes=K, input_size=SIZE), PredictConfig(device="cpu", batch_size=4), threads=1)
    out_of_memory_above(predictor, 0)
    img = np.zeros((3 * SIZE, 3 * SIZE, 3), np.uint8)
    got = predictor(batch_of([img]))
    assert "does not fit" in got["error"][0] and f"{3 * SIZE}x{3 * SIZE}" in got["error"][0]


def _card_bundle(geometry: str, architecture: str = "pointwise"):
    import dataclasses

    bundle = load_bundle(None, architecture, num_classes=K, input_size=SIZE)
    return dataclasses.replace(bundle, card=dataclasses.replace(bundle.card, geometry=geometry))


def test_a_crop_trained_model_segments_an_image_of_1_2x_its_input_at_native_scale():
    side = int(SIZE * 1.2)
    native = Predictor(_card_bundle("native"), PredictConfig(device="cpu", batch_size=4), threads=1)
    assert native.route(side, side) == "tile" and native.tile_side() == SIZE  # a sliding window of input-size tiles
    assert native.route(SIZE, SIZE) == "stack" and native.route(20, 30) == "pad"  # smaller: padded, not stretched
    old = Predictor(_card_bundle(""), PredictConfig(device="cpu", batch_size=4), threads=1)  # a card from before geometry
    assert old.route(side, side) == "resize" and old.route(20, 30) == "resize" and old.route(2 * SIZE + 1, 8) == "tile"
    assert Predictor(_card_bundle("native"), PredictConfig(device="cpu", geometry="resize")).route(side, side) == "resize"


def test_native_scale_padding_gives_a_per_pixel_model_the_masks_of_its_whole_image_forward():
    pred = Predictor(_card_bundle("native"), PredictConfig(device="cpu", batch_size=4), threads=1)
    imgs = [images()[1], images()[0], images()[3]]  # padded, stacked, tiled
    out = pred(batch_of(imgs))
    for img, mask in zip(imgs, out["mask"]):
        x = pred.model_input(img)
        expected = pred.logits(x).argmax(1)[0].to(torch.uint8).numpy()
        assert mask.shape == img.shape[:2] and np.array_equal(mask, expected)


def test_a_card_without_geometry_keeps_its_bytes():
    from rayseg.models import ModelCard

    card = ModelCard("unet", 2)
    assert "geometry" not in card.to_json() and "plan" not in card.to_json()
    assert ModelCard.from_json(ModelCard("unet", 2, geometry="native", plan={"a": 1}).to_json()).geometry == "native"
