"""rayseg.labelled: image/mask pairs from folders, tar and HDF5 shards; pairs that can't be used become error rows."""

from __future__ import annotations

import io

import cv2
import h5py
import numpy as np
import pytest

from conftest import png_bytes, random_image, tar_bytes
from rayseg.errors import UserError
from rayseg.labelled import decode_mask, decode_pairs, find_pairs, read_pair_units

K = 3
RNG = np.random.default_rng(0)


def mask(h: int, w: int, top: int = K - 1) -> np.ndarray:
    return RNG.integers(0, top + 1, (h, w), dtype=np.uint8)


def save(path, img: np.ndarray) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return img


def objects(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def read_pairs(inputs, num_classes: int = K) -> dict[str, dict]:
    """What train and evaluate get: every pair row decoded, by image_id (the Ray stages called in-process)."""
    units, _ = find_pairs([str(i) for i in inputs])
    batch = {k: objects([u[k] for u in units]) for k in ("kind", "urls", "masks")}
    out = {}
    for rows in read_pair_units(batch, {}, "images", "masks", rows_per_batch=4):
        dec = decode_pairs(rows, num_classes)
        for i, image_id in enumerate(dec["image_id"]):
            assert image_id not in out
            out[image_id] = {k: dec[k][i] for k in dec}
    return out


def by_name(rows: dict[str, dict]) -> dict[str, dict]:
    return {image_id.rsplit("/", 1)[1].rsplit("::", 1)[-1]: r for image_id, r in rows.items()}


def test_folders_are_paired_by_stem(tmp_path):
    a = save(tmp_path / "images" / "a.png", random_image(RNG, 6, 8))
    b = save(tmp_path / "images" / "sub" / "b.png", random_image(RNG, 5, 5))
    save(tmp_path / "images" / "c.jpg", random_image(RNG, 9, 4))
    ma = save(tmp_path / "masks" / "a.png", mask(6, 8))
    mb = save(tmp_path / "masks" / "sub" / "b.png", mask(5, 5))
    mc = save(tmp_path / "masks" / "c.png", mask(9, 4))
    rows = by_name(read_pairs([tmp_path]))
    assert sorted(rows) == ["a.png", "b.png", "c.jpg"]
    assert all(r["error"] is None for r in rows.values())
    np.testing.assert_array_equal(rows["a.png"]["image"], a[:, :, ::-1])  # RGB, from a BGR file
    np.testing.assert_array_equal(rows["a.png"]["target"], ma)
    np.testing.assert_array_equal(rows["b.png"]["image"], b[:, :, ::-1])
    np.testing.assert_array_equal(rows["b.png"]["target"], mb)
    np.testing.assert_array_equal(rows["c.jpg"]["target"], mc)
    assert (rows["c.jpg"]["height"], rows["c.jpg"]["width"]) == (9, 4)


def test_unusable_pairs_are_error_rows_not_failures(tmp_path):
    save(tmp_path / "images" / "good.png", random_image(RNG, 6, 6))
    save(tmp_path / "masks" / "good.png", mask(6, 6))
    save(tmp_path / "images" / "nomask.png", random_image(RNG, 6, 6))
    save(tmp_path / "images" / "small.png", random_image(RNG, 6, 6))
    save(tmp_path / "masks" / "small.png", mask(5, 6))
    save(tmp_path / "images" / "classes.png", random_image(RNG, 6, 6))
    m = mask(6, 6)
    m[2, 3], m[4, 4] = K, 200
    save(tmp_path / "masks" / "classes.png", m)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    save(tmp_path / "masks" / "broken.png", mask(6, 6))
    save(tmp_path / "masks" / "orphan.png", mask(6, 6))  # a mask without an image is no pair at all

    rows = by_name(read_pairs([tmp_path]))
    assert sorted(rows) == ["broken.png", "classes.png", "good.png", "nomask.png", "small.png"]
    errors = {k: r["error"] for k, r in rows.items()}
    assert errors["good.png"] is None
    assert errors["nomask.png"].startswith("mask missing")
    assert errors["small.png"] == "mask size 6x5 differs from image size 6x6"
    assert errors["classes.png"] == f"mask holds class value(s) [{K}, 200] outside 0..{K - 1} (--num-classes {K}; instance masks: --mask-mode binary)"
    assert errors["broken.png"].startswith("image undecodable")
    for k, r in rows.items():
        if r["error"]:
            assert r["height"] == 0 and r["width"] == 0, k


def test_the_same_mask_is_fine_with_more_classes(tmp_path):
    save(tmp_path / "images" / "a.png", random_image(RNG, 4, 4))
    m = mask(4, 4)
    m[0, 0] = K
    save(tmp_path / "masks" / "a.png", m)
    assert by_name(read_pairs([tmp_path], num_classes=K))["a.png"]["error"]
    assert by_name(read_pairs([tmp_path], num_classes=K + 1))["a.png"]["error"] is None


def test_find_pairs_lists_what_is_ignored(tmp_path):
    save(tmp_path / "images" / "a.png", random_image(RNG, 4, 4))
    save(tmp_path / "masks" / "a.png", mask(4, 4))
    save(tmp_path / "masks" / "orphan.png", mask(4, 4))
    save(tmp_path / "loose.png", random_image(RNG, 4, 4))
    (tmp_path / "notes.txt").write_text("x")
    units, ignored = find_pairs([str(tmp_path)])
    assert units == [{"kind": "folder", "urls": [f"file://{tmp_path}/images/a.png"], "masks": [f"file://{tmp_path}/masks/a.png"]}]
    assert sorted(ignored) == sorted(f"file://{tmp_path}/{n}" for n in ("masks/orphan.png", "loose.png", "notes.txt"))


def test_no_labelled_data_is_a_user_error(tmp_path):
    save(tmp_path / "a.png", random_image(RNG, 4, 4))
    with pytest.raises(UserError, match="no labelled data"):
        find_pairs([str(tmp_path)])


def test_tar_pairs(tmp_path):
    img, m = random_image(RNG, 5, 6), mask(5, 6)
    url = tmp_path / "s.tar"
    url.write_bytes(tar_bytes({"x.png": png_bytes(img), "x.mask.png": png_bytes(m), "y.png": png_bytes(img)}))
    rows = by_name(read_pairs([url]))
    assert rows["x"]["error"] is None
    np.testing.assert_array_equal(rows["x"]["target"], m)
    assert rows["y"]["error"] == "mask missing: tar sample 'y' has no y.mask.png member"


def test_h5_pairs_and_lengths_that_differ(tmp_path):
    images = RNG.integers(0, 256, (5, 4, 6, 3), dtype=np.uint8)
    masks = RNG.integers(0, K, (3, 4, 6), dtype=np.uint8)
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["images"], f["masks"] = images, masks
    rows = read_pairs([tmp_path / "s.h5"])
    ids = [f"file://{tmp_path}/s.h5::{i}" for i in range(5)]
    assert sorted(rows) == ids
    for i in range(3):
        np.testing.assert_array_equal(rows[ids[i]]["image"], images[i])
        np.testing.assert_array_equal(rows[ids[i]]["target"], masks[i])
    for i in (3, 4):
        assert rows[ids[i]]["error"] == f"lengths differ: 'images' has 5 entries, 'masks' has 3; entry {i} has no partner"


def test_h5_without_masks_says_which_datasets_it_has(tmp_path):
    with h5py.File(tmp_path / "s.h5", "w") as f:
        f["images"] = np.zeros((2, 4, 4), np.uint8)
        f["labels"] = np.zeros((2, 4, 4), np.uint8)
    (row,) = read_pairs([tmp_path / "s.h5"]).values()
    assert "no dataset 'masks' (datasets: images, labels; see --mask-key)" in row["error"]


def test_decode_mask():
    m = mask(4, 5)
    np.testing.assert_array_equal(decode_mask(png_bytes(m), "encoded"), m)
    grey_rgb = np.repeat(m[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(decode_mask(png_bytes(grey_rgb), "encoded"), m)
    m16 = (m.astype(np.uint16) * 300)
    assert decode_mask(png_bytes(m16), "encoded").dtype == np.uint16  # kept, so class values >= 256 are not wrapped
    with pytest.raises(ValueError, match="single-channel"):
        decode_mask(png_bytes(random_image(RNG, 4, 4)), "encoded")
    with pytest.raises(ValueError, match="empty"):
        decode_mask(b"", "encoded")
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_mask(b"garbage", "encoded")
    with pytest.raises(ValueError, match="integer class indices"):
        decode_mask(npy(np.zeros((2, 2), np.float32)), "npy")
