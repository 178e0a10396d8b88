"""`rayseg plan` and a training run with every choice planned: the plan printed, recorded in the card and the summary,
and the predictor following the card's native geometry. Tiny MRI-like 16-bit slices (exactly 0 outside the body)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from rayseg import cli
from rayseg.config import PredictConfig
from rayseg.models import load_bundle
from rayseg.predict import Predictor
from rayseg.train import train


def slices(count: int, seed: int, side: int = 72) -> tuple[np.ndarray, np.ndarray]:
    """16-bit slices: a body of tissue on an exact-zero background, an inner organ (class 1), the gain varying by slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side]
    images, masks = np.zeros((count, side, side), np.uint16), np.zeros((count, side, side), np.uint8)
    for i in range(count):
        cy, cx = rng.integers(side // 3, 2 * side // 3, 2)
        body = (yy - side // 2) ** 2 + (xx - side // 2) ** 2 <= (side // 3) ** 2
        organ = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(6, 11) ** 2
        gain = rng.uniform(200, 2000)
        images[i][body] = rng.normal(gain, gain / 20, body.sum()).clip(1)
        images[i][organ & body] = rng.normal(2 * gain, gain / 20, (organ & body).sum()).clip(1)
        masks[i] = organ & body
    return images, masks


def write_h5(path, images, masks) -> str:
    path.mkdir(parents=True)
    with h5py.File(path / "shard.h5", "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("masks", data=masks)
    return str(path)


@pytest.mark.flow("planned-training")
def test_train_plans_from_the_data_records_it_and_segment_follows_it(ray_local, tmp_path, capsys):
    train_dir, val_dir = write_h5(tmp_path / "train", *slices(12, 0)), write_h5(tmp_path / "val", *slices(4, 1))

    assert cli.main(["plan", train_dir, "--num-classes", "2", "--workers", "1", "--json", "-"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["intensity"]["value"] == "nonzero" and printed["geometry"]["value"] == "native"
    assert printed["fingerprint"]["images"] == 12 and printed["fingerprint"]["median_size"] == [72, 72]

    summary = train(data=(train_dir,), val_data=(val_dir,), output=str(tmp_path / "run"), num_classes=2, epochs=1,
                    workers=1, batch_size=4, quiet=True)
    plan = summary["plan"]
    assert plan["batch_size"] == {"value": 4, "reason": "--batch-size given (the plan: 8)", "given": True}
    assert plan["input_size"]["value"] == 80 and not plan["input_size"]["given"]
    card = json.loads((tmp_path / "run" / "best" / "model.json").read_text())
    assert card["geometry"] == "native" and card["input_size"] == 80 and card["intensity"]["mode"] == "nonzero"
    assert card["plan"]["intensity"]["reason"] == printed["intensity"]["reason"] and card["plan"]["fingerprint"]["images"] == 12

    predictor = Predictor(load_bundle(str(tmp_path / "run" / "best")), PredictConfig(device="cpu", batch_size=2), threads=1)
    assert predictor.route(96, 96) == "tile" and predictor.route(72, 72) == "pad"  # 1.2x the input: native scale
