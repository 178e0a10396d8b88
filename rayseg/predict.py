"""The predictor: one model per actor, uint8 batches in, masks and confidences out.

Everything after the host->device copy happens on the device: normalisation, resizing to the model input,
the forward pass (bf16 autocast on GPU), resizing logits back to each image's size, softmax, argmax.
Images much larger than the model input are segmented at full resolution by a sliding window whose logits
are blended with Gaussian weights (as nnU-Net does), so memory is bounded by the tile, not the image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rayseg.decode import errors_of
from rayseg.models import ModelBundle, for_inference

log = logging.getLogger("rayseg")


@dataclass(frozen=True)
class PredictOptions:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    batch_size: int | None = None  # None: CPU_BATCH_SIZE on CPU, from free device memory on a GPU (fit_batch_size)
    tile: int | None = None  # None: tile only images over twice the input size, with tiles of the input size
    overlap: float = 0.25
    tta: str = "none"  # none | flip
    compile: bool = False
    confidence_map: bool = False  # keep the per-pixel confidence (for the objects table)
    threads: int | None = None  # torch intra-op threads on CPU


CPU_BATCH_SIZE = 16
MAX_AUTO_BATCH_SIZE = 256  # also the rows a GPU actor is handed per call when the batch size is automatic


def fit_batch_size(bytes_per_image: float, free_bytes: int, fraction: float = 0.5, cap: int = MAX_AUTO_BATCH_SIZE) -> int:
    """The largest power of two, up to `cap`, whose batch needs at most `fraction` of the free device memory (at least 1).
    Half, not all: the allocator fragments, images larger than the model input are resized on the device, and
    another process may share the GPU."""
    n = 1
    while n * 2 <= cap and bytes_per_image * n * 2 <= fraction * free_bytes:
        n *= 2
    return n


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but this worker has no CUDA device")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def gaussian_weight(h: int, w: int, device: torch.device) -> torch.Tensor:
    """Tile blending weights: high in the centre, low (never zero) at the borders; sigma = side / 8 as in nnU-Net."""

    def g(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(n / 8, 1e-3)) ** 2)

    wgt = g(h)[:, None] * g(w)[None, :]
    wgt = wgt / wgt.max()
    return wgt.clamp_min(1e-3)


def mask_and_confidence(lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (..., K, H, W) -> argmax mask (..., H, W) uint8 and the top softmax probability (..., H, W).

    The top probability is 1 / sum(exp(l - max)): no K-channel softmax tensor is built (a batch at once is
    ~4x cheaper on CPU than a softmax per image).
    """
    top, mask = lg.max(dim=-3)
    conf = torch.exp(lg - top.unsqueeze(-3)).sum(dim=-3).reciprocal_()
    return mask.to(torch.uint8), conf


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


class Predictor:
    """Ray Data callable class: `__init__` builds the model once per actor, `__call__` handles one batch."""

    def __init__(self, bundle: ModelBundle, options: PredictOptions):
        if options.threads:
            torch.set_num_threads(options.threads)
        self.opts = options
        self.device = resolve_device(options.device)
        self.amp = autocast_dtype(self.device, options.precision)
        self.card = bundle.card
        self.size = bundle.card.input_size
        self.model = for_inference(bundle.build(), self.device, options.compile)
        self.mean = torch.tensor(self.card.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.card.std, device=self.device).view(1, 3, 1, 1) * 255
        self.label = bundle.label
        self.batch_size = options.batch_size or (self.probe_batch_size() if self.device.type == "cuda" else CPU_BATCH_SIZE)

    def probe_batch_size(self) -> int:
        """Batch size from device memory: one forward pass of 2 images at the input size measures the peak memory
        an image adds; fit_batch_size picks the batch from what is free."""
        s = self.size
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            x = torch.zeros((2, 3, s, s), device=self.device).contiguous(memory_format=torch.channels_last)
            mask_and_confidence(self._forward(x, 2))
        per_image = (torch.cuda.max_memory_allocated(self.device) - before) / 2
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        n = fit_batch_size(per_image, free)
        log.info("predictor on %s: batch size %d (%.0f MiB per %dx%d image, %.0f MiB free)", self.device, n, per_image / 2**20, s, s, free / 2**20)
        return n

    # -- tensors in, logits out -------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: float NCHW in 0..255 at any size -> logits NKHW (float32), with test-time augmentation if asked."""
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        out = self._forward(x)
        if self.opts.tta == "flip":
            out = out + self._forward(x.flip(-1)).flip(-1) + self._forward(x.flip(-2)).flip(-2)
            out = out / 3
        return out

    def _forward(self, x: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        outs = []
        for chunk in x.split(batch_size or self.batch_size):
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                outs.append(self.model(chunk).float())
        return torch.cat(outs)

    def _to_device(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(img)
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t.permute(2, 0, 1).unsqueeze(0).float()  # HWC uint8 -> 1CHW, channels_last in memory

    def _stack_to_device(self, imgs: list[np.ndarray]) -> torch.Tensor:
        """Same-size HWC uint8 images -> one float NCHW batch (channels_last in memory), one host->device copy."""
        t = torch.from_numpy(np.stack(imgs))
        if self.device.type == "cuda":
            t = t.pin_memory().to(self.device, non_blocking=True)
        return t.permute(0, 3, 1, 2).float()

    def needs_tiling(self, h: int, w: int) -> bool:
        if self.opts.tile:
            return h > self.opts.tile or w > self.opts.tile
        return h > 2 * self.size or w > 2 * self.size

    @torch.inference_mode()
    def resized_logits(self, imgs: list[np.ndarray]) -> list[torch.Tensor]:
        """Whole-image inference: each image resized to the model input, logits resized back to its size."""
        s = self.size
        xs = []
        for img in imgs:
            x = self._to_device(img)
            xs.append(x if x.shape[-2:] == (s, s) else F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False))
        out = self.logits(torch.cat(xs))
        res = []
        for img, lg in zip(imgs, out):
            h, w = img.shape[:2]
            lg = lg[None]
            res.append((lg if (h, w) == (s, s) else F.interpolate(lg, size=(h, w), mode="bilinear", align_corners=False))[0])
        return res

    @torch.inference_mode()
    def tiled_logits(self, img: np.ndarray) -> torch.Tensor:
        """Sliding window at full resolution; tile logits blended with Gaussian weights."""
        h, w = img.shape[:2]
        t = self.opts.tile or self.size
        th, tw = min(t, h), min(t, w)
        x = self._to_device(img)
        acc = torch.zeros((self.card.num_classes, h, w), device=self.device)
        norm = torch.zeros((1, h, w), device=self.device)
        wgt = gaussian_weight(th, tw, self.device)
        boxes = [(y, xx) for y in tile_starts(h, th, self.opts.overlap) for xx in tile_starts(w, tw, self.opts.overlap)]
        for i in range(0, len(boxes), self.batch_size):
            part = boxes[i : i + self.batch_size]
            out = self.logits(torch.cat([x[:, :, y : y + th, xx : xx + tw] for y, xx in part]))
            for (y, xx), lg in zip(part, out):
                acc[:, y : y + th, xx : xx + tw] += lg * wgt
                norm[:, y : y + th, xx : xx + tw] += wgt
        return acc / norm

    # -- the Ray Data stage -----------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        masks = np.empty(n, dtype=object)
        confmaps = np.empty(n, dtype=object)
        mean_conf = np.full(n, np.nan, np.float32)
        errors = errors_of(batch)
        ok = [i for i in range(n) if errors[i] is None]
        small = [i for i in ok if not self.needs_tiling(*batch["image"][i].shape[:2])]
        results: dict[int, torch.Tensor] = {}
        s = self.size
        if small and all(batch["image"][i].shape[:2] == (s, s) for i in small):
            # the common case, images at the model's size: one stack in, masks and confidences out in one copy each
            with torch.inference_mode():
                mask, conf = mask_and_confidence(self.logits(self._stack_to_device([batch["image"][i] for i in small])))
                mask_np, mean_np = mask.cpu().numpy(), conf.mean(dim=(1, 2)).cpu().numpy()
                conf_np = (conf * 255).round().to(torch.uint8).cpu().numpy() if self.opts.confidence_map else None
            for j, i in enumerate(small):
                masks[i], mean_conf[i] = mask_np[j], mean_np[j]
                if conf_np is not None:
                    confmaps[i] = conf_np[j]
            done = set(small)
            ok = [i for i in ok if i not in done]
            small = []
        for i, lg in zip(small, self.resized_logits([batch["image"][i] for i in small]) if small else []):
            results[i] = lg
        for i in ok:
            lg = results.pop(i, None)
            if lg is None:
                lg = self.tiled_logits(batch["image"][i])
            with torch.inference_mode():
                mask, conf = mask_and_confidence(lg)
            masks[i] = mask.cpu().numpy()
            mean_conf[i] = conf.mean().item()
            if self.opts.confidence_map:
                confmaps[i] = (conf * 255).round().to(torch.uint8).cpu().numpy()
        placeholder = np.zeros((1, 1), np.uint8)
        for i in range(n):
            if masks[i] is None:
                masks[i] = placeholder
            if confmaps[i] is None:
                confmaps[i] = placeholder
        out = {k: v for k, v in batch.items() if k != "image"}
        out["error"] = np.array(errors, dtype=object)
        out["mask"] = masks
        out["mean_confidence"] = mean_conf
        if self.opts.confidence_map:
            out["confidence"] = confmaps
        out["model"] = np.array([self.label] * n, dtype=object)
        return out
