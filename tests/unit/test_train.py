"""Training without Ray: augmentation, the loss, the prefetching feed, when batch norm syncs across GPUs, the
checkpoint a converted model saves, and the CLI's refusals before Ray starts."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import png_bytes
from rayseg.augment import IGNORE, augment
from rayseg.feed import Prefetch, augmented_batches
from rayseg.intensity import Inputs
from rayseg.loss import criterion
from rayseg.models import ModelCard, build_model, load_bundle, save_checkpoint
from rayseg.train import SYNC_BN_BELOW, wants_sync_batchnorm


def test_augment_keeps_image_and_mask_aligned():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 30, 3), np.uint8)
    mask = np.zeros((40, 30), np.uint8)
    image[10:20, 5:15] = 255
    mask[10:20, 5:15] = 1
    for _ in range(20):
        img, msk = augment(image, mask, 32, rng)
        assert img.shape == (32, 32, 3) and msk.shape == (32, 32)
        assert set(np.unique(msk)) <= {0, 1, IGNORE}
        # bright pixels are the mask's 1s, bar a pixel-wide seam where linear and nearest resizing differ
        agree = ((img[..., 0] > 127) == (msk == 1))[msk != IGNORE]
        assert agree.mean() > 0.97 and (msk == 1).sum() > 0


@pytest.mark.parametrize("loss", ["ce_dice", "bce_dice"])
def test_loss_is_low_for_right_answer_and_ignores_padding(loss):
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:5, 2:5] = 1
    right = torch.stack([(target == 0).float(), (target == 1).float()], 1) * 20 - 10
    assert criterion(right, target, loss) < 0.05 < criterion(-right, target, loss)
    padded = target.clone()
    padded[0, 6:] = IGNORE
    wrong_in_padding = right.clone()
    wrong_in_padding[:, :, 6:] *= -1
    assert criterion(wrong_in_padding, padded, loss) == pytest.approx(criterion(right, padded, loss).item(), abs=1e-6)


# ---- the feed: augmentation on a thread of its own --------------------------------------------------------


def labelled_batches(count: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Batches of labelled rows as Ray Data hands them to a worker: images of varying sizes, their dtypes, masks."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        h, w = rng.integers(24, 48, size=2)
        rows.append((rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 2, (h, w), dtype=np.uint8)))
    batches = []
    for i in range(0, count, batch_size):
        part = rows[i : i + batch_size]
        images, masks = np.empty(len(part), dtype=object), np.empty(len(part), dtype=object)
        images[:], masks[:] = [im for im, _ in part], [m for _, m in part]
        batches.append({"image": images, "target": masks, "dtype": np.array(["uint8"] * len(part), dtype=object)})
    return batches


def test_prefetched_batches_are_the_plain_loops_in_order_with_the_same_augmentation():
    card = ModelCard("unet", 2)
    inputs, batches = Inputs(card), labelled_batches(11, 4)
    plain, rng = [], np.random.default_rng([7, 1, 3])
    for batch in batches:
        pairs = [augment(inputs.one(im, dt), m, 32, rng, fill=card.mean) for im, dt, m in zip(batch["image"], batch["dtype"], batch["target"])]
        plain.append((np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])))

    feed = augmented_batches(iter(batches), inputs, 32, np.random.default_rng([7, 1, 3]), card.mean)
    with Prefetch(feed, depth=2) as ahead:
        got = [(images.numpy(), masks.numpy()) for images, masks in ahead]
    assert [len(x) for x, _ in got] == [4, 4, 3]
    for (x, y), (px, py) in zip(got, plain, strict=True):
        assert x.shape == (len(px), 32, 32, 3) and x.dtype == px.dtype
        assert np.array_equal(x, px) and np.array_equal(y, py)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rayseg-prefetch"]


def test_an_exception_in_the_producer_reaches_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("image 3 is broken")

    got = []
    with pytest.raises(ValueError, match="image 3 is broken"):
        with Prefetch(items(), depth=1) as ahead:
            for item in ahead:
                got.append(item)
    assert got == [1, 2] and not prefetch_threads()


def test_a_consumer_that_fails_stops_the_producer_and_closes_its_source():
    closed = threading.Event()

    def endless():
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            closed.set()

    with pytest.raises(RuntimeError, match="step failed"):
        with Prefetch(endless(), depth=2) as ahead:
            for item in ahead:
                if item == 3:
                    raise RuntimeError("step failed")
    assert closed.is_set() and not prefetch_threads()


# ---- SyncBatchNorm: when, and what its checkpoint loads as ------------------------------------------------


def test_batch_norm_syncs_only_across_several_gpus_with_small_batches():
    assert wants_sync_batchnorm("cuda", 8, 4)
    assert wants_sync_batchnorm("cuda", 2, SYNC_BN_BELOW - 1)
    assert not wants_sync_batchnorm("cuda", 8, SYNC_BN_BELOW)  # enough images per GPU for its own statistics
    assert not wants_sync_batchnorm("cuda", 1, 2)  # one GPU: nothing to sync with
    assert not wants_sync_batchnorm("cpu", 8, 2)  # SyncBatchNorm runs on CUDA only, not on gloo


def test_a_sync_batchnorm_channels_last_model_saves_a_checkpoint_segment_loads_as_plain_batch_norm(tmp_path):
    torch.manual_seed(0)
    plain = build_model("unet", 2)
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics a trained model has, not the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    trained = {k: v.clone() for k, v in plain.state_dict().items()}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(plain).to(memory_format=torch.channels_last)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert set(synced.state_dict()) == set(trained)

    save_checkpoint(synced, ModelCard("unet", 2, input_size=32), str(tmp_path / "ckpt"))
    loaded = load_bundle(str(tmp_path / "ckpt")).build()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in loaded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules()) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in build_model("unet", 2).modules())
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())

    reference = build_model("unet", 2)
    reference.load_state_dict(trained)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), reference.eval()(x), atol=1e-5)


# ---- the CLI's refusals, before Ray starts ------------------------------------------------------------------


def test_train_cli_rejects_bce_with_three_classes(tmp_path, capsys):
    from rayseg.cli import main

    assert main(["train", "--data", "x", "--val-data", "y", "--output", str(tmp_path), "--num-classes", "3", "--loss", "bce_dice"]) == 2
    assert "bce_dice" in capsys.readouterr().err


def test_train_cli_missing_data_is_one_line_before_ray_starts(tmp_path):
    """In a process of its own, so that no Ray another test started is there: exit 2, one line, and Ray never
    started (its start would log "Started a local Ray instance" and make a session folder)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray")}
    proc = subprocess.run([sys.executable, "-m", "rayseg.cli", "train", "--data", str(tmp_path / "nope"), "--val-data", str(tmp_path),
                           "--output", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "ray").exists()


def test_instance_masks_train_in_binary_mode(tmp_path):
    from rayseg.labelled import decode_pairs

    instances = np.zeros((6, 6), np.uint16)
    instances[1:3, 1:3], instances[4:, 4:] = 7, 300
    rows = {"image_id": np.array(["a"], dtype=object), "source": np.array(["a"], dtype=object),
            "image_data": np.array([png_bytes(np.zeros((6, 6), np.uint16))], dtype=object), "image_format": np.array(["encoded"], dtype=object),
            "mask_data": np.array([png_bytes(instances)], dtype=object), "mask_format": np.array(["encoded"], dtype=object),
            "error": np.array([None], dtype=object)}
    semantic = decode_pairs(rows, 2)
    assert "--mask-mode binary" in semantic["error"][0]
    binary = decode_pairs(rows, 2, mask_mode="binary")
    assert binary["error"][0] is None and np.array_equal(binary["target"][0], (instances > 0).astype(np.uint8))
    assert binary["image"][0].dtype == np.uint16 and binary["dtype"][0] == "uint16"


def test_native_augmentation_crops_at_native_scale_and_oversamples_foreground():
    rng = np.random.default_rng(0)
    image = np.zeros((200, 200, 1), np.uint16)
    mask = np.zeros((200, 200), np.uint8)
    mask[150:156, 20:26] = 1  # one small object, far from the centre
    image[mask == 1] = 1000
    hits = {0.0: 0, 1.0: 0}
    for share in hits:
        for _ in range(30):
            img, msk = augment(image, mask, 64, rng, scale=(1.0, 1.0), geometry="native", foreground=share)
            assert img.shape == (64, 64, 1) and msk.shape == (64, 64) and img.dtype == np.uint16
            assert np.array_equal(img[..., 0] == 1000, msk == 1)  # native scale: no resampling blurs the object
            hits[share] += bool((msk == 1).any())
    assert hits[1.0] == 30 and hits[0.0] < 15
    small_img, small_mask = augment(image[:40, :50], mask[:40, :50], 64, rng, scale=(1.0, 1.0), geometry="native")
    assert (small_mask != 255).sum() == 40 * 50  # padded, not stretched
