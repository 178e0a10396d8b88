"""rayseg evaluate: figures equal a plain single-process numpy computation; bad pairs are skipped and counted."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rayseg.evaluate import evaluate
from rayseg.labelled import read_labelled, split_errors
from rayseg.models import ModelCard, UNet, save_checkpoint
from rayseg.synth import write_archive
from conftest import png_bytes, tar_bytes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A UNet with seeded random weights and a few plain SGD steps, so its masks mix all three classes."""
    torch.manual_seed(3)
    model = UNet(3)
    rng = np.random.default_rng(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.rand(4, 3, 32, 32)
    y = torch.from_numpy(rng.integers(0, 3, (4, 32, 32))).long()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    url = str(tmp_path_factory.mktemp("ckpt") / "c")
    save_checkpoint(model.eval(), ModelCard("unet", 3, ("bg", "a", "b"), input_size=32), url)
    return url


def plain_predict(checkpoint: str, image: np.ndarray) -> np.ndarray:
    """What segment does, written out in plain torch for one image: resize, normalise, forward, resize back, argmax."""
    card = json.load(open(f"{checkpoint}/model.json"))
    model = UNet(card["num_classes"])
    model.load_state_dict(torch.load(f"{checkpoint}/model.pt", weights_only=True))
    model.eval()
    s = card["input_size"]
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(card["mean"]).view(1, 3, 1, 1) * 255) / (torch.tensor(card["std"]).view(1, 3, 1, 1) * 255)
    with torch.no_grad():
        logits = model(x)
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits[0].argmax(0).numpy()


@pytest.mark.flow("evaluate")
def test_evaluate_matches_single_process_numpy(ray_local, tmp_path, checkpoint):
    info = write_archive(str(tmp_path / "data"), "folders", 10, labelled=True, seed=5, num_classes=3, min_size=24, max_size=48)
    result = evaluate(checkpoint=checkpoint, data=(str(tmp_path / "data"),), json=str(tmp_path / "eval.json"), batch_size=4, quiet=True)

    inter, union, correct, total = np.zeros(3), np.zeros(3), 0, 0
    dice_num, dice_den = np.zeros(3), np.zeros(3)
    for key in [f.rsplit("/", 1)[1].split(".")[0] for f in info["files"] if "/images/" in f]:
        image = cv2.cvtColor(cv2.imread(str(tmp_path / "data/images" / f"{key}.png")), cv2.COLOR_BGR2RGB)
        truth = cv2.imread(str(tmp_path / "data/masks" / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        pred = plain_predict(checkpoint, image)
        correct += int((pred == truth).sum())
        total += truth.size
        for c in range(3):
            p, t = pred == c, truth == c
            inter[c] += (p & t).sum()
            union[c] += (p | t).sum()
            dice_num[c] += 2 * (p & t).sum()
            dice_den[c] += p.sum() + t.sum()
    iou = inter / union
    assert result["pairs"] == 10 and result["bad_pairs"] == 0
    assert result["pixels"] == total
    assert result["pixel_accuracy"] == correct / total
    assert result["iou"] == pytest.approx(iou.tolist(), abs=1e-12)
    assert result["miou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert result["dice"] == pytest.approx((dice_num / dice_den).tolist(), abs=1e-12)
    assert len(set(np.round(iou, 6))) > 1, "the model should not predict a single class everywhere"
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["miou"] == result["miou"] and written["confusion_matrix"] == result["confusion_matrix"]


def test_bad_pairs_are_skipped_and_counted(ray_local, tmp_path, checkpoint):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    good_mask = rng.integers(0, 3, (20, 24), dtype=np.uint8)
    root = tmp_path / "folders"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name, image, mask in [("good", img, good_mask), ("wrongsize", img, good_mask[:10]),
                              ("badclass", img, np.full((20, 24), 7, np.uint8)), ("nomask", img, None)]:
        (root / "images" / f"{name}.png").write_bytes(png_bytes(image))
        if mask is not None:
            (root / "masks" / f"{name}.png").write_bytes(png_bytes(mask))
    (root / "images" / "corrupt.png").write_bytes(png_bytes(img)[:40])
    (root / "masks" / "corrupt.png").write_bytes(png_bytes(good_mask))
    (tmp_path / "s.tar").write_bytes(tar_bytes({"a.png": png_bytes(img), "a.mask.png": png_bytes(good_mask), "b.png": png_bytes(img)}))

    ds, ignored = read_labelled([str(root), str(tmp_path / "s.tar")], 3)
    _, good, bad = split_errors(ds, "test")
    reasons = {image_id.rsplit("/", 1)[-1]: error for image_id, error in bad}
    assert good == 2 and len(bad) == 5
    assert "differs from image size" in reasons["wrongsize.png"]
    assert "outside 0..2" in reasons["badclass.png"]
    assert "mask missing" in reasons["nomask.png"]
    assert "image undecodable" in reasons["corrupt.png"]
    assert "mask missing" in reasons["s.tar::b"]

    result = evaluate(checkpoint=checkpoint, data=(str(root), str(tmp_path / "s.tar")), quiet=True)
    assert result["pairs"] == 2 and result["bad_pairs"] == 5
    assert result["pixels"] == 2 * 20 * 24


def test_h5_lengths_differ(ray_local, tmp_path):
    import h5py

    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["images"] = np.zeros((3, 8, 8, 3), np.uint8)
        f["labels"] = np.zeros((2, 8, 8), np.uint8)
    ds, _ = read_labelled([str(tmp_path / "x.h5")], 2, mask_key="labels")
    _, good, bad = split_errors(ds, "test")
    assert good == 2 and len(bad) == 1 and "lengths differ" in bad[0][1]


def test_evaluate_reads_and_writes_s3_without_leaking_secrets(ray_local, s3, checkpoint):
    bucket, opts = s3
    write_archive(f"{bucket}/labelled", "tar", 6, labelled=True, seed=9, num_classes=3, min_size=24, max_size=32, storage_options=opts)
    result = evaluate(checkpoint=checkpoint, data=(f"{bucket}/labelled",), json=f"{bucket}/eval.json", storage_options=opts, quiet=True)
    assert result["pairs"] == 6 and result["bad_pairs"] == 0
    import s3fs

    text = s3fs.S3FileSystem(**opts).cat_file(f"{bucket}/eval.json".removeprefix("s3://")).decode()
    assert json.loads(text)["miou"] == result["miou"]
    assert opts["secret"] not in text and opts["key"] not in text
