"""The plan from a training set's fingerprint (rayseg.fingerprint, rayseg.plan): one test per rule, on small numpy
arrays shaped like each kind of data, measured through the same pass `rayseg train` runs on Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rayseg.decode import ragged_column
from rayseg.fingerprint import measure
from rayseg.intensity import local_rows
from rayseg.plan import FOREGROUND_SHARE, MAX_BATCH, make_plan

GIB = 2**30


def batches_of(pairs: list[tuple[np.ndarray, np.ndarray]], per_batch: int = 4) -> list[dict]:
    """Decoded labelled rows as labelled.decode_pairs hands them on: image, dtype, target."""
    out = []
    for i in range(0, len(pairs), per_batch):
        part = pairs[i : i + per_batch]
        out.append({"image": ragged_column([p[0] for p in part]), "dtype": np.array([p[0].dtype.name for p in part], dtype=object),
                    "target": ragged_column([p[1] for p in part])})
    return out


def plan_of(pairs, num_classes: int = 2, memory: float = 4 * GIB, device: str = "cpu", workers: int = 1, **given):
    fp, stats = measure(local_rows(batches_of(pairs)), num_classes)
    return make_plan(fp, given, memory, device, workers), stats


def disc(shape, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def ct_slices(n=6, side=96, seed=0):
    """Signed 16-bit slices in Hounsfield units: air -1000 around a body of soft tissue (~40) with an organ (~80)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.full((side, side), -1000, np.int16)
        body, organ = disc((side, side), (side // 2, side // 2), side // 3), disc((side, side), (side // 2, side // 2 + 5), 8 + i)
        img[body] = rng.normal(40, 10, body.sum()).astype(np.int16)
        img[organ] = rng.normal(80, 10, organ.sum()).astype(np.int16)
        out.append((img[..., None], organ.astype(np.uint8)))
    return out


def mri_slices(n=6, side=96, seed=0):
    """Unsigned 16-bit slices without units: exactly 0 outside the head, tissue values whose scale differs by slice."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = np.zeros((side, side), np.uint16)
        head, tissue = disc((side, side), (side // 2, side // 2), side // 3 + i), disc((side, side), (side // 2, side // 2), side // 5)
        gain = 300 * (1 + i)
        img[head] = rng.normal(2 * gain, gain / 10, head.sum()).clip(1).astype(np.uint16)
        img[tissue] = rng.normal(3 * gain, gain / 10, tissue.sum()).clip(1).astype(np.uint16)
        out.append((img[..., None], (tissue.astype(np.uint8))))
    return out


def fluorescence_images(n=6, side=96, seed=0):
    """16-bit nuclei: a dim noisy background (camera offset ~100, never exactly 0), bright discs, brightness by image."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        mask = np.zeros((side, side), np.uint8)
        for _ in range(8):
            mask[disc((side, side), rng.integers(8, side - 8, 2), rng.integers(4, 8))] = 1
        img = rng.normal(100, 5, (side, side)) + mask * rng.normal(800 * (1 + i), 50, (side, side))
        out.append((img.clip(1, 65535).astype(np.uint16)[..., None], mask))
    return out


def photos(n=6, shape=(120, 160), seed=0):
    """8-bit RGB photos with a large object."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        mask = disc(shape, (60, 80), 40).astype(np.uint8)
        out.append((rng.integers(0, 256, (*shape, 3), dtype=np.uint8), mask))
    return out


def test_ct_like_data_gets_the_datasets_clip_and_zscore():
    plan, stats = plan_of(ct_slices())
    assert plan.intensity.value == "dataset" and not plan.intensity.given
    assert "Hounsfield" in plan.intensity.reason
    assert plan.fingerprint.value_range[0] == -1000 and plan.fingerprint.dtypes == ("int16",)
    assert int(stats["count"]) > 0  # the same pass carries the foreground sums `dataset` needs


def test_mri_like_data_gets_a_zscore_over_each_images_nonzero_region():
    plan, _ = plan_of(mri_slices())
    assert plan.intensity.value == "nonzero"
    assert plan.fingerprint.zero_fraction > 0.4 and "exactly 0" in plan.intensity.reason


def test_fluorescence_like_data_gets_a_zscore_per_image():
    plan, _ = plan_of(fluorescence_images())
    assert plan.intensity.value == "nonzero" and "z-score per image" in plan.intensity.reason
    assert plan.fingerprint.zero_fraction == 0 and plan.fingerprint.high_spread > 0.5  # brightness moves by image


def test_fluorescence_with_hot_pixels_gets_per_image_percentiles():
    pairs = []
    for img, mask in fluorescence_images():
        img = img.copy()
        img.reshape(-1)[::500] = 65535  # 0.2% hot pixels: a z-score would follow them, a 1..99.8 window does not
        pairs.append((img, mask))
    plan, _ = plan_of(pairs)
    assert plan.intensity.value == "auto" and "per-image 1..99.8 percentiles" in plan.intensity.reason  # auto's rule for deep images


def test_8bit_photos_keep_the_8bit_rule():
    plan, stats = plan_of(photos())
    assert plan.intensity.value == "auto" and "8-bit images: value / 255" in plan.intensity.reason
    assert stats["channels"] == {3: 6} and plan.fingerprint.channels == {3: 6}


def test_a_rare_class_gets_a_third_of_the_crops_around_foreground():
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(8):  # 600 px images, larger than fits whole in 1 GiB: crops; class 2 is a few pixels in a few images
        img = rng.integers(0, 256, (600, 600), dtype=np.uint8)[..., None]
        mask = np.zeros((600, 600), np.uint8)
        mask[100:400, 100:400] = 1
        if i % 4 == 0:
            mask[500:510, 500:510] = 2
        pairs.append((img, mask))
    plan, _ = plan_of(pairs, num_classes=3, memory=1 * GIB)
    assert plan.input_size.value < 600 and "crops" in plan.input_size.reason
    assert plan.geometry.value == "native"
    assert plan.oversample.value == pytest.approx(FOREGROUND_SHARE, abs=1e-3) and "class 2" in plan.oversample.reason
    assert plan.fingerprint.class_images[2] == pytest.approx(0.25) and plan.fingerprint.object_area[2] == 100


def test_common_classes_need_no_oversampling():
    plan, _ = plan_of([(np.zeros((600, 600, 1), np.uint8) + 9, disc((600, 600), (300, 300), 200).astype(np.uint8))] * 4,
                      memory=1 * GIB)
    assert plan.input_size.value < 600 and plan.oversample.value == 0 and "rarest" in plan.oversample.reason


def test_small_images_fit_whole_and_are_padded_not_stretched():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (40, 36, 1), dtype=np.uint8), disc((40, 36), (20, 18), 3).astype(np.uint8)) for _ in range(6)]
    plan, _ = plan_of(pairs)
    assert plan.input_size.value == 48  # the median image (40 x 36) whole, rounded up to a multiple of 16
    assert plan.geometry.value == "native" and "padded" in plan.geometry.reason
    assert plan.oversample.value == 0 and "whole image" in plan.oversample.reason  # even though the class is rare


def test_images_of_very_different_sizes_are_resized_whole():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (s, s, 3), dtype=np.uint8), np.ones((s, s), np.uint8)) for s in (32, 40, 48, 300, 320, 400)]
    plan, _ = plan_of(pairs)
    assert plan.geometry.value == "resize" and plan.oversample.value == 0


def test_batch_size_follows_the_memory_per_worker_and_the_images_each_worker_has():
    pairs = fluorescence_images(n=40, side=64)
    small, _ = plan_of(pairs, memory=0.25 * GIB)
    large, _ = plan_of(pairs, memory=64 * GIB, device="gpu")
    few, _ = plan_of(pairs, memory=64 * GIB, device="gpu", workers=8)
    assert small.batch_size.value < large.batch_size.value <= MAX_BATCH["gpu"]
    assert few.batch_size.value == 4  # 40 images over 8 workers: 5 each
    cpu, _ = plan_of(pairs, memory=64 * GIB)
    assert cpu.batch_size.value == MAX_BATCH["cpu"]


def test_every_option_given_wins_and_the_plan_says_so():
    given = {"intensity": "fixed:0:4000", "input_size": 48, "batch_size": 3, "geometry": "resize", "oversample": 0.5}
    plan, _ = plan_of(mri_slices(), **given)
    assert plan.values() == given
    assert all(c["given"] and "given" in c["reason"] for c in plan.choices().values())
    assert "the plan: nonzero" in plan.intensity.reason


def test_the_plan_is_json_with_one_line_per_choice():
    plan, _ = plan_of(ct_slices())
    record = json.loads(json.dumps(plan.to_json()))
    assert set(record) == {"intensity", "input_size", "batch_size", "geometry", "oversample", "fingerprint"}
    assert record["fingerprint"]["images"] == 6 and record["intensity"]["value"] == "dataset"
    lines = plan.lines()
    assert len(lines) == 5 and all("planned: " in line for line in lines)


def test_a_zero_background_with_hot_pixels_keeps_percentiles():
    pairs = []
    for img, mask in mri_slices():
        img = img.copy()
        img[0, :3] = 65535  # a few hot pixels: a z-score would follow them, a percentile window does not
        pairs.append((img, mask))
    plan, _ = plan_of(pairs)
    assert plan.intensity.value == "auto" and "hot pixels" in plan.intensity.reason


def test_long_thin_images_of_one_size_stay_at_native_scale():
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(0, 256, (60, 480, 1), dtype=np.uint8), np.ones((60, 480), np.uint8)) for _ in range(4)]
    plan, _ = plan_of(pairs)
    assert plan.geometry.value == "native" and "1.0x" in plan.geometry.reason  # an aspect ratio is not a spread of scales


def test_slices_of_one_volume_share_a_scale_and_get_the_datasets_zscore():
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(8):  # one acquisition: the same offset (~100, never 0) and brightness, objects varying by slice
        mask = disc((48, 48), (24, 24), 6 + i).astype(np.uint8)
        img = rng.normal(120, 8, (48, 48)) + mask * rng.normal(150, 10, (48, 48))
        pairs.append((img.astype(np.uint16)[..., None], mask))
    plan, _ = plan_of(pairs)
    assert plan.fingerprint.high_spread < 0.25 and plan.intensity.value == "dataset" and "one intensity scale" in plan.intensity.reason


def test_a_real_ct_slice_in_hounsfield_units_gets_the_datasets_zscore():
    """pydicom's CT_small.dcm (pydicom: MIT licence; in the examples extra), in Hounsfield units, cut in quadrants."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    hu = (ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)).astype(np.int16)
    quads = [hu[y : y + 64, x : x + 64] for y in (0, 64) for x in (0, 64)]
    plan, _ = plan_of([(q[..., None], (q > 0).astype(np.uint8)) for q in quads])
    assert plan.fingerprint.value_range[0] <= -500 and plan.intensity.value == "dataset" and "Hounsfield" in plan.intensity.reason


def test_too_few_images_say_nothing_of_a_shared_scale():
    plan, _ = plan_of(fluorescence_images(n=6)[:1] * 3)  # three copies of one image: no spread, but no evidence either
    assert plan.fingerprint.high_spread == 0 and plan.intensity.value == "nonzero"
