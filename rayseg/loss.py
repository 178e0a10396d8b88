"""The training objective, cross-entropy (or BCE) + soft Dice over the pixels augmentation did not pad in, and the
learning-rate schedule: plain torch, tested without Ray."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from rayseg.augment import IGNORE


def dice_loss(probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per class over the batch (probs, onehot: N,C,H,W; valid: N,1,H,W), mean over classes."""
    probs, onehot = probs * valid, onehot * valid
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    total = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (total + eps)).mean()


def criterion(logits: torch.Tensor, target: torch.Tensor, loss: str = "ce_dice") -> torch.Tensor:
    """logits N,K,H,W (float32); target N,H,W int64 with IGNORE for padding."""
    valid = (target != IGNORE).unsqueeze(1).float()
    safe = target.clamp(max=logits.shape[1] - 1) * (target != IGNORE)
    if loss == "bce_dice":
        # one foreground logit: l1 - l0, so sigmoid of it is the softmax probability of class 1 and the
        # checkpoint keeps the K=2 outputs that segment's argmax reads
        fg = (logits[:, 1] - logits[:, 0]).unsqueeze(1)
        truth = (safe == 1).unsqueeze(1).float()
        bce = (F.binary_cross_entropy_with_logits(fg, truth, reduction="none") * valid).sum() / valid.sum().clamp_min(1)
        return bce + dice_loss(torch.sigmoid(fg), truth, valid)
    ce = F.cross_entropy(logits, target.long(), ignore_index=IGNORE)
    onehot = F.one_hot(safe.long(), logits.shape[1]).permute(0, 3, 1, 2).float()
    return ce + dice_loss(torch.softmax(logits, dim=1), onehot, valid)


def warmup_cosine(total_steps: int, warmup: int):
    """LR factor per step: linear warm-up, then cosine down to 5% (held there past total_steps)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    return factor
