"""The confusion matrix of a segmentation, and the scores that derive from it: pixel accuracy, IoU, Dice.

Like torchvision's reference `ConfusionMatrix`: exact integer counts, so matrices from shards, batches or
DDP ranks add up to the matrix of the whole. Rows are the target class, columns the predicted class.

A class absent from both target and prediction has no IoU or Dice (NaN, null in JSON) and is left out of
the means; a class only predicted scores 0 and counts.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, maybe on the GPU
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int | None = 255) -> np.ndarray:
    """(K, K) int64 counts of (target, predicted) pixel pairs; target pixels equal to `ignore_index` are skipped.

    ValueError for a target or prediction outside [0, num_classes): a bad mask is the caller's to report.
    """
    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    target = target.reshape(-1).astype(np.int64, copy=False)
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    _check_classes(target, "target", num_classes, ignore_index)
    _check_classes(pred, "prediction", num_classes, None)
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _check_classes(values: np.ndarray, what: str, num_classes: int, ignore_index: int | None) -> None:
    if values.size == 0:
        return
    low, high = values.min(), values.max()
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        ignored = f" (nor the ignore index {ignore_index})" if ignore_index is not None else ""
        raise ValueError(f"{what} holds class {bad}, outside [0, {num_classes}){ignored}")


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> ConfusionMatrix:
        self.matrix += confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        return self

    def merge(self, other: ConfusionMatrix | np.ndarray) -> ConfusionMatrix:
        counts = other.matrix if isinstance(other, ConfusionMatrix) else np.asarray(other)
        if counts.shape != self.matrix.shape:
            raise ValueError(f"cannot merge a {counts.shape} confusion matrix into a {self.matrix.shape} one")
        self.matrix += counts.astype(np.int64, copy=False)
        return self

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self) -> dict:
        m = self.matrix.astype(np.float64)
        tp = np.diag(m)
        support = m.sum(axis=1)  # pixels of each class in the target
        predicted = m.sum(axis=0)
        present = (support + predicted) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(present, tp / (support + predicted - tp), np.nan)
            dice = np.where(present, 2 * tp / (support + predicted), np.nan)
        total = m.sum()
        return {
            "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
            "iou": iou.tolist(),
            "miou": _mean_of_present(iou),
            "dice": dice.tolist(),
            "mean_dice": _mean_of_present(dice),
            "support": self.matrix.sum(axis=1).tolist(),
            "pixels": int(self.matrix.sum()),
        }

    def to_json_dict(self) -> dict:
        """compute(), with NaN as None so that json.dumps writes null (it would write the invalid NaN)."""
        return nan_to_none(self.compute())

    def reduce_from_all_processes(self) -> ConfusionMatrix:
        """Sum the matrix over all DDP ranks; a no-op unless torch.distributed is initialised."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        # NCCL reduces only CUDA tensors; gloo takes CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = torch.from_numpy(self.matrix).to(device)
        dist.all_reduce(counts)
        self.matrix = counts.cpu().numpy().astype(np.int64)
        return self

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.matrix.sum())})"


def _mean_of_present(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(present.mean()) if present.size else math.nan


def nan_to_none(value: Any) -> Any:
    """A copy of nested dicts/lists with float NaN replaced by None, for JSON."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _score(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.4f}"


def format_table(result: dict, class_names: list[str] | None = None) -> str:
    """A plain-text table of IoU, Dice and support per class, then the summary lines. Takes compute() or its JSON form."""
    count = len(result["iou"])
    names = list(class_names or [])
    names += [f"class {c}" for c in range(len(names), count)]
    width = max(len("class"), *(len(n) for n in names[:count]))
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {'support':>12}"]
    for c in range(count):
        lines.append(f"{names[c]:<{width}}  {_score(result['iou'][c]):>7}  {_score(result['dice'][c]):>7}  {result['support'][c]:>12}")
    scored = sum(1 for v in result["iou"] if v is not None and not math.isnan(v))
    lines += [
        "",
        f"pixel accuracy  {_score(result['pixel_accuracy'])}",
        f"mIoU            {_score(result['miou'])}  (mean over {scored} of {count} classes; absent ones are left out)",
        f"mean Dice       {_score(result['mean_dice'])}",
    ]
    return "\n".join(lines)
