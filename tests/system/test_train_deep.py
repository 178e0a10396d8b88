"""rayseg train on real intensities: 16-bit bands, N channels, dataset statistics, widened torchvision models.

One module fixture starts every training at once (tiny UNets and one torchvision model, 1-2 Ray Train workers each,
on one embedded Ray: their start-ups overlap) and the tests segment what they learned.
"""

from __future__ import annotations

import json
from functools import partial

import cv2
import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import png_bytes
from rayseg.evaluate import evaluate
from rayseg.models import load_bundle
from rayseg.train import train
from train_helpers import Runs



def grey_blobs(count: int, seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Grey 8-bit blob images (N,H,W) and masks, from synth's blobs generator."""
    from rayseg.synth import make_blobs

    pairs = [make_blobs(np.random.default_rng([seed, i]), size, size) for i in range(count)]
    return np.stack([im[..., 0] for im, _ in pairs]), np.stack([m for _, m in pairs])


def deepen(img8: np.ndarray, top: int, seed: int) -> np.ndarray:
    """A 16-bit version of (N,H,W) images with a real-looking range: the signal in 0..top, skewed (most pixels dark),
    and hot pixels at 65535, one per 1,000 pixels of each image. Percentile normalisation ignores them while they are
    fewer than 100 - HI percent of an image (0.2% at 99.8)."""
    v = np.round((img8 / 255.0) ** 2.2 * top).astype(np.uint16)
    rng = np.random.default_rng(seed)
    h, w = v.shape[1:3]
    for image in v:
        hot = rng.choice(h * w, max(1, h * w // 1000), replace=False)
        image.reshape(h * w, *image.shape[2:])[hot] = 65535
    return v


def write_h5(path, images: np.ndarray, masks: np.ndarray) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with h5py.File(path / "shard.h5", "w") as f:
        f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
        f.create_dataset("masks", data=masks)


def dice(predicted, truth) -> float:
    inter = sum(int(((p == 1) & (t == 1)).sum()) for p, t in zip(predicted, truth))
    total = sum(int((p == 1).sum() + (t == 1).sum()) for p, t in zip(predicted, truth))
    return 2 * inter / total


def five_channels(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(N,H,W,5) uint16: the blobs in channel 2, each channel on its own scale, the others noise."""
    images, masks = grey_blobs(count, seed, 40)
    rng = np.random.default_rng(seed)
    chans = [rng.integers(0, 50 * (c + 1), images.shape) for c in range(5)]
    chans[2] = deepen(images, 3000, seed).astype(np.int64)
    return np.stack(chans, axis=-1).astype(np.uint16), masks


DEEP_EPOCHS = 5  # held-out Dice 0.98-0.99 at every depth by then (8 epochs gave 0.99)


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    """Every training of this module, started together (tests/train_helpers.py: Ray Train's start-up overlaps):

    - band300, full, copy8: one grey archive as 16-bit 0..300, 16-bit 0..65535 and the 8-bit rescaled copy, each
      trained the same way (1 worker);
    - five: 5-channel uint16 H5 in two training folders, --intensity dataset, 2 workers;
    - four: 4-channel uint16 H5 into lraspp_mobilenet_v3_large, whose first convolution is widened (1 epoch).
    """
    root = tmp_path_factory.mktemp("deep")
    calls = {}
    splits = {"train": grey_blobs(48, 1), "val": grey_blobs(12, 2), "test": grey_blobs(24, 3)}
    for name, top in (("band300", 300), ("full", 65535), ("copy8", None)):
        for split, (images, masks) in splits.items():
            deep = deepen(images, top or 300, seed=len(split))
            data = deep if top else np.round(np.clip(deep / 300, 0, 1) * 255).astype(np.uint8)
            write_h5(root / name / split, data, masks)
        calls[name] = partial(train, data=(str(root / name / "train"),), val_data=(str(root / name / "val"),), output=str(root / name / "run"),
                              model="unet", num_classes=2, input_size=48, epochs=DEEP_EPOCHS, batch_size=4, lr=3e-3, workers=1, seed=0,
                              quiet=True, intensity="auto")  # what is compared: auto's percentiles at every depth (the plan picks per set)

    five = root / "five"
    train_x, train_y = five_channels(40, 1)
    write_h5(five / "train", train_x[:20], train_y[:20])
    write_h5(five / "train2", train_x[20:], train_y[20:])
    write_h5(five / "val", *five_channels(8, 2))
    test_x, test_y = five_channels(12, 3)
    write_h5(five / "test", test_x, test_y)
    calls["five"] = partial(train, data=(str(five / "train"), str(five / "train2")), val_data=(str(five / "val"),), output=str(five / "run"),
                            model="unet", num_classes=2, input_size=40, epochs=6, batch_size=4, lr=3e-3, workers=2, seed=0,
                            intensity="dataset", quiet=True)

    four_root = root / "four"
    images, masks = grey_blobs(12, 1, 64)
    four = np.stack([deepen(images, 1000, 1), images, 255 - images, deepen(images, 40000, 2)], axis=-1).astype(np.uint16)
    write_h5(four_root / "train", four[:8], masks[:8])
    write_h5(four_root / "val", four[8:], masks[8:])
    calls["four"] = partial(train, data=(str(four_root / "train"),), val_data=(str(four_root / "val"),), output=str(four_root / "run"),
                            model="lraspp_mobilenet_v3_large", num_classes=2, input_size=64, epochs=1, batch_size=4, workers=1, quiet=True)

    started = Runs(calls)
    yield {"root": root, "runs": started, "truth": splits["test"][1], "five": {"train": (train_x, train_y), "test": (test_x, test_y)}}
    started.close()


@pytest.fixture(scope="module")
def deep_runs(runs):
    root, out = runs["root"], {}
    for name in ("band300", "full", "copy8"):
        out[name] = {"summary": runs["runs"].get(name), "best": str(root / name / "run" / "best"), "test": root / name / "test"}
    return {"root": root, "runs": out, "truth": runs["truth"]}


@pytest.mark.flow("deep-images")
def test_16bit_bands_train_and_segment_as_well_as_their_8bit_copy(deep_runs):
    from rayseg.config import PredictConfig
    from rayseg.decode import ragged_column
    from rayseg.predict import Predictor

    scores = {}
    for name, run in deep_runs["runs"].items():
        bundle = load_bundle(run["best"])
        assert bundle.card.in_channels == 1  # a grey archive trains a 1-channel model
        assert bundle.card.intensity["mode"] == "auto"
        with h5py.File(run["test"] / "shard.h5") as f:
            images = [im[..., None] for im in f["images"][:]]
        n = len(images)
        out = Predictor(bundle, PredictConfig(batch_size=8, device="cpu"))(
            {"image_id": np.arange(n).astype(str).astype(object), "image": ragged_column(images), "dtype": np.array([images[0].dtype.name] * n, dtype=object),
             "error": np.full(n, None, dtype=object)})
        scores[name] = dice(out["mask"], deep_runs["truth"])
    print("held-out Dice:", {k: round(v, 4) for k, v in scores.items()})
    assert scores["copy8"] > 0.85, scores
    assert abs(scores["band300"] - scores["copy8"]) <= 0.02, scores
    assert abs(scores["full"] - scores["copy8"]) <= 0.02, scores


def test_a_narrow_16bit_band_segments_through_the_pipeline(deep_runs, tmp_path):
    from rayseg.segment import segment

    run = deep_runs["runs"]["band300"]
    summary = segment(inputs=(str(run["test"]),), output=str(tmp_path / "seg"), checkpoint=run["best"], quiet=True)
    rows = sorted(pq.read_table(tmp_path / "seg" / "images").to_pylist(), key=lambda r: int(r["image_id"].rsplit("::", 1)[1]))
    assert summary["errors"] == 0
    masks = [cv2.imdecode(np.frombuffer(r["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED) for r in rows]
    assert dice(masks, deep_runs["truth"]) > 0.85
    result = evaluate(checkpoint=run["best"], data=(str(run["test"]),), quiet=True)
    assert result["intensity"] == "auto" and result["dice"][1] == pytest.approx(dice(masks, deep_runs["truth"]))


def test_five_channel_h5_trains_a_five_channel_unet_with_dataset_statistics_and_segments(runs, tmp_path):
    from rayseg.intensity import local_rows, measure, parse
    from rayseg.segment import segment

    s = runs["runs"].get("five")
    five = runs["root"] / "five"
    (train_x, train_y), (test_x, test_y) = runs["five"]["train"], runs["five"]["test"]
    card = json.loads((five / "run" / "best" / "model.json").read_text())
    assert s["in_channels"] == card["in_channels"] == 5
    norm = card["intensity"]
    assert norm["mode"] == "dataset" and len(norm["window"]) == 5

    # the distributed pass gives the numbers one process computes over the same images, and numpy's
    batch = {"image": list(train_x), "target": list(train_y), "dtype": ["uint16"] * 40}
    _, local = measure(local_rows([batch]), parse("dataset"))
    assert norm["window"] == [list(w) for w in local.window] and norm["mean"] == pytest.approx(local.mean) and norm["pixels"] == local.pixels
    fg = train_x[train_y > 0].astype(float)
    assert norm["window"][2] == pytest.approx(list(np.percentile(fg[:, 2], [0.5, 99.5])))
    assert norm["std"] == pytest.approx(list(fg.std(0)))

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    (rgb / "x.png").write_bytes(png_bytes(np.zeros((40, 40, 3), np.uint8)))
    summary = segment(inputs=(str(five / "test"), str(rgb)), output=str(tmp_path / "seg"), checkpoint=str(five / "run" / "best"), quiet=True)
    rows = {r["image_id"].rsplit("/", 1)[1]: r for r in pq.read_table(tmp_path / "seg" / "images").to_pylist()}
    assert summary["errors"] == 1 and rows["x.png"]["error"] == "image has 3 channels; the model takes 5"
    masks = [cv2.imdecode(np.frombuffer(rows[f"shard.h5::{i}"]["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED) for i in range(12)]
    print("five channels, held-out Dice:", round(dice(masks, test_y), 4))
    assert dice(masks, test_y) > 0.7


def test_torchvision_model_with_a_widened_first_convolution_trains_on_four_channels(runs):
    s = runs["runs"].get("four")
    bundle = load_bundle(str(runs["root"] / "four" / "run" / "best"))
    assert s["in_channels"] == bundle.card.in_channels == 4 and s["epochs_completed"] == 1
    first = next(m for m in bundle.build().model.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 4
