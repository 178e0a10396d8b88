"""Confusion matrix and scores, checked against per-pixel loops written without the matrix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rayseg.metrics import ConfusionMatrix, confusion_matrix, format_table

K = 4


def reference_scores(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> dict:
    """Counts true/false positives and false negatives one pixel at a time."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    correct = total = 0
    for p, t in zip(pred.ravel().tolist(), target.ravel().tolist()):
        if t == ignore_index:
            continue
        total += 1
        if p == t:
            tp[t] += 1
            correct += 1
        else:
            fp[p] += 1
            fn[t] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(num_classes)]
    dice = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(num_classes)]
    scored = [v for v in iou if not math.isnan(v)]
    return {"pixel_accuracy": correct / total, "iou": iou, "dice": dice, "miou": sum(scored) / len(scored),
            "support": [tp[c] + fn[c] for c in range(num_classes)]}


def random_pair(seed: int, shape=(3, 9, 11), classes=K):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, classes, shape).astype(np.uint8)
    target[rng.random(shape) < 0.1] = 255  # unlabelled pixels
    # mostly right, like a trained model, so IoUs are neither all 0 nor all 1
    pred = np.where(rng.random(shape) < 0.6, target % classes, rng.integers(0, classes, shape)).astype(np.uint8)
    return pred, target


def assert_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_a_pixel_by_pixel_reference(seed):
    pred, target = random_pair(seed)
    result = ConfusionMatrix(K).update(pred, target).compute()
    expected = reference_scores(pred, target, K)
    assert result["pixel_accuracy"] == pytest.approx(expected["pixel_accuracy"])
    assert_close(result["iou"], expected["iou"])
    assert_close(result["dice"], expected["dice"])
    assert result["miou"] == pytest.approx(expected["miou"])
    assert result["support"] == expected["support"]
    assert result["pixels"] == int((target != 255).sum())


def test_matrix_rows_are_targets_and_columns_predictions():
    m = confusion_matrix(np.array([1, 1, 0, 2]), np.array([0, 1, 0, 255]), num_classes=3)
    assert m.dtype == np.int64
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_merging_halves_gives_the_whole():
    pred, target = random_pair(5, shape=(4, 16, 16))
    whole = ConfusionMatrix(K).update(pred, target)
    first = ConfusionMatrix(K).update(pred[:2], target[:2])
    second = ConfusionMatrix(K).update(pred[2:], target[2:])
    assert np.array_equal(ConfusionMatrix(K).merge(first).merge(second).matrix, whole.matrix)
    assert np.array_equal(first.merge(second.matrix).matrix, whole.matrix)
    with pytest.raises(ValueError):
        first.merge(np.zeros((K + 1, K + 1), np.int64))


def test_absent_class_is_nan_and_left_out_of_the_means():
    pred, target = random_pair(3, classes=3)  # class 3 never appears
    result = ConfusionMatrix(K).update(pred, target).compute()
    assert math.isnan(result["iou"][3]) and math.isnan(result["dice"][3]) and result["support"][3] == 0
    assert result["miou"] == pytest.approx(np.mean(result["iou"][:3]))
    assert result["mean_dice"] == pytest.approx(np.mean(result["dice"][:3]))

    as_json = json.loads(json.dumps(ConfusionMatrix(K).update(pred, target).to_json_dict(), allow_nan=False))
    assert as_json["iou"][3] is None and as_json["dice"][3] is None


def test_a_class_only_predicted_scores_zero_and_counts():
    target = np.zeros((4, 4), np.uint8)
    pred = target.copy()
    pred[0, 0] = 2
    result = ConfusionMatrix(3).update(pred, target).compute()
    assert result["iou"][2] == 0 and math.isnan(result["iou"][1])
    assert result["miou"] == pytest.approx((15 / 16 + 0) / 2)


def test_out_of_range_values_raise():
    target = np.array([[0, 1], [4, 1]], np.uint8)
    with pytest.raises(ValueError, match="target holds class 4"):
        confusion_matrix(np.zeros_like(target), target, num_classes=K)
    with pytest.raises(ValueError, match="target holds class 255"):
        confusion_matrix(np.zeros((2,), np.uint8), np.array([0, 255], np.uint8), num_classes=K, ignore_index=None)
    with pytest.raises(ValueError, match="prediction holds class 7"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), num_classes=K)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), num_classes=K)


def test_empty_matrix_scores_are_nan():
    result = ConfusionMatrix(2).compute()
    assert math.isnan(result["pixel_accuracy"]) and math.isnan(result["miou"])


def test_torch_tensors_and_distributed_reduce(tmp_path):
    import torch
    import torch.distributed as dist

    pred, target = random_pair(4)
    cm = ConfusionMatrix(K).update(torch.from_numpy(pred), torch.from_numpy(target))
    expected = confusion_matrix(pred, target, K)
    assert np.array_equal(cm.reduce_from_all_processes().matrix, expected)  # not initialised: unchanged

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert np.array_equal(cm.reduce_from_all_processes().matrix, expected)
        assert cm.matrix.dtype == np.int64
    finally:
        dist.destroy_process_group()


def test_format_table_lists_classes_and_summary():
    pred, target = random_pair(0, classes=3)
    result = ConfusionMatrix(K).update(pred, target).compute()
    table = format_table(result, ["background", "disc", "rectangle", "triangle"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "Dice", "support"]
    assert lines[1].startswith("background") and lines[4].startswith("triangle") and lines[4].split()[1:3] == ["-", "-"]
    assert f"{result['miou']:.4f}" in table and "pixel accuracy" in table and "mean over 3 of 4 classes" in table
    assert format_table(ConfusionMatrix(K).update(pred, target).to_json_dict()) .splitlines()[1].startswith("class 0")
