"""The predictor: one model per actor, uint8 batches in, masks and confidences out.

Everything after the host->device copy happens on the device: normalisation, resizing to the model input (or, for
a model trained at native scale, the card's `geometry`, padding to it), the forward pass (bf16 autocast on GPU),
resizing logits back to each image's size, softmax, argmax, at most `batch_size` images at a time. Images much
larger than the model input (at native scale: any larger) are segmented at full resolution by a sliding window (rayseg.tiling) whose logits come back in bands of rows, so device memory is bounded by the tile
batch, not the image, and the full-size result is a uint8 mask on the host.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rayseg.decode import errors_of
from rayseg.devices import HostFeed, nvidia_driver_version, resolve_device
from rayseg.intensity import Inputs
from rayseg.models import ModelBundle
from rayseg.tiling import blended_bands, core_logits, sliding_window

log = logging.getLogger("rayseg")

CPU_BATCH_SIZE = 16
MAX_AUTO_BATCH_SIZE = 256  # also the rows a GPU actor is handed per call when the batch size is automatic

# one image's result: mask (H, W) uint8, mean confidence, confidence map (H, W) uint8 in 1/255 or None
Segmented = tuple[np.ndarray, float, np.ndarray | None]


def fit_batch_size(bytes_per_image: float, free_bytes: int, fraction: float = 0.5, cap: int = MAX_AUTO_BATCH_SIZE) -> int:
    """The largest power of two, up to `cap`, whose batch needs at most `fraction` of the free device memory (at least 1).
    Half, not all: the allocator fragments, images larger than the model input are resized on the device, and
    another process may share the GPU."""
    n = 1
    while n * 2 <= cap and bytes_per_image * n * 2 <= fraction * free_bytes:
        n *= 2
    return n


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def mask_and_confidence(lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (..., K, H, W) -> argmax mask (..., H, W) uint8 and the top softmax probability (..., H, W).

    The top probability is 1 / sum(exp(l - max)): no K-channel softmax tensor is built (a batch at once is
    ~4x cheaper on CPU than a softmax per image).
    """
    top, mask = lg.max(dim=-3)
    conf = torch.exp(lg - top.unsqueeze(-3)).sum(dim=-3).reciprocal_()
    return mask.to(torch.uint8), conf


def fit_logits(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, divisor: int = 1) -> torch.Tensor:
    """What every model shares, around its forward pass: x (NCHW) padded to a multiple of `divisor` (reflected where
    the image is large enough, else replicated), logits upsampled bilinearly to the padded size when the model gives
    fewer (SegFormer: a quarter), then cropped back to x's size; float32."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if h > ph and w > pw else "replicate")
    out = model(x).float()
    if out.shape[-2:] != x.shape[-2:]:
        out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return out[..., :h, :w] if ph or pw else out


class Predictor:
    """Ray Data callable class: `__init__` builds the model once per actor, `__call__` handles one batch.

    `opts` has the predict options (rayseg.config.PredictConfig): device, precision, batch_size, tile, overlap,
    tta, compile. `threads` sets torch's intra-op threads on CPU; `confidence_map` keeps the per-pixel
    confidence (for the objects table); `report(key, info)` is told what the predictor runs with (device_info).

    Device memory is bounded by the batch size: every path (stack, resize, tile) runs and post-processes at most
    `batch_size` images or tiles at a time. An out-of-memory error halves the batch size and retries; an image
    that does not fit even alone becomes an error row, and the batch goes on.
    """

    def __init__(self, bundle: ModelBundle, opts, *, threads: int | None = None, confidence_map: bool = False,
                 report: Callable[[str, dict], None] | None = None):
        if threads:
            torch.set_num_threads(threads)
        # before CUDA starts: grown segments instead of fixed blocks, so mixed image sizes fragment less
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        self.opts = opts
        self.confidence_map = confidence_map
        self.device = resolve_device(opts.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # inputs come in few shapes (the model size, the tile): tune once per shape
        self.amp = autocast_dtype(self.device, opts.precision)
        self.card = bundle.card
        self.inputs = Inputs(bundle.card, getattr(opts, "intensity", ""))  # dtype, channels and normalisation, per the card
        self.size = bundle.card.input_size
        # native: the model sees images at the scale it was trained at (rayseg.plan); resize, or a card recording
        # neither (written before geometry was kept): whole images resized to the input, tiled past twice its size
        self.geometry = getattr(opts, "geometry", "") or bundle.card.geometry or "resize"
        self.model = bundle.runner(self.device, opts.compile, threads)  # rayseg.adapters: the model behind its adapter
        self.divisor = max(1, bundle.card.size_divisor)
        self.mean, self.std = bundle.card.pixel_mean_std(self.device)
        self.label = bundle.label
        self.report = report
        self.feed = HostFeed(self.device)
        self.lock = threading.Lock()  # calls may come concurrently (a GPU actor's threads): one uses the device at a time
        self._upcoming: list = []  # the chunk after the one computing: its copy to the device may start early
        self.batch_size = opts.batch_size or (self.probe_batch_size() if self.device.type == "cuda" else CPU_BATCH_SIZE)
        self._report()

    def device_info(self) -> dict:
        """What this predictor actually runs with: the summary records it."""
        cuda = self.device.type == "cuda"
        return {"device": self.device.type, "name": torch.cuda.get_device_name(self.device) if cuda else "cpu",
                "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
                "driver": nvidia_driver_version() if cuda else None,
                "precision": {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp], "batch_size": self.batch_size}

    def _report(self) -> None:
        if self.report is not None:
            self.report(f"{socket.gethostname()}:{os.getpid()}:{id(self)}", self.device_info())

    def probe_batch_size(self) -> int:
        """Batch size from device memory: one forward pass of 2 images at the input size measures the peak memory
        an image adds; fit_batch_size picks the batch from what is free."""
        s = self.size
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            x = torch.zeros((2, self.card.in_channels, s, s), device=self.device).contiguous(memory_format=torch.channels_last)
            mask_and_confidence(self._forward(x, 2))
        per_image = (torch.cuda.max_memory_allocated(self.device) - before) / 2
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        n = fit_batch_size(per_image, free)
        log.info("predictor on %s: batch size %d (%.0f MiB per %dx%d image, %.0f MiB free)", self.device, n, per_image / 2**20, s, s, free / 2**20)
        return n

    # -- host in, logits out ----------------------------------------------------------------
    def model_input(self, images) -> torch.Tensor:
        """Host images (NHWC or HWC, any dtype and channel count; a list of HWC of one shape) -> float NCHW on the
        device (channels_last in memory). The one way from the host to the model: one copy, then the device."""
        t = self.feed(images)
        return (t if t.dim() == 4 else t[None]).permute(0, 3, 1, 2).float()

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
                outs.append(fit_logits(self.model, chunk, self.divisor))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def needs_tiling(self, h: int, w: int) -> bool:
        if self.geometry == "native":
            return h > self.size or w > self.size or bool(self.opts.tile and (h > self.opts.tile or w > self.opts.tile))
        if self.opts.tile:
            return h > self.opts.tile or w > self.opts.tile
        return h > 2 * self.size or w > 2 * self.size

    def route(self, h: int, w: int) -> str:
        """How an image of h x w reaches the model: "tile" (sliding window at native scale), "pad" (native scale,
        padded to the input size), "stack" (already the input size) or "resize" (resized to the input size)."""
        if self.needs_tiling(h, w):
            return "tile"
        if (h, w) == (self.size, self.size):
            return "stack"
        return "pad" if self.geometry == "native" else "resize"

    @torch.inference_mode()
    def padded(self, imgs: list[np.ndarray]) -> list[Segmented]:
        """Images no larger than the model input, at native scale: each padded to the input size with the card's
        mean (zero once standardised, as training pads), one stack through the model, each result cropped back."""
        s = self.size
        xs = []
        for img in imgs:
            x = self.model_input(img)
            canvas = self.mean.expand(1, -1, s, s).clone()
            canvas[..., : x.shape[-2], : x.shape[-1]] = x
            xs.append(canvas)
        mask, conf = mask_and_confidence(self.logits(torch.cat(xs)))
        out = []
        for j, img in enumerate(imgs):
            h, w = img.shape[:2]
            c = conf[j, :h, :w]
            out.append((mask[j, :h, :w].cpu().numpy(), c.mean().item(), self._confidence_map(c)))
        return out

    @torch.inference_mode()
    def resized_logits(self, imgs: list[np.ndarray]) -> list[torch.Tensor]:
        """Whole-image inference: each image resized to the model input, logits resized back to its size."""
        s = self.size
        xs = []
        for img in imgs:
            x = self.model_input(img)
            xs.append(x if x.shape[-2:] == (s, s) else F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False))
        out = self.logits(torch.cat(xs))
        res = []
        for img, lg in zip(imgs, out):
            h, w = img.shape[:2]
            lg = lg[None]
            res.append((lg if (h, w) == (s, s) else F.interpolate(lg, size=(h, w), mode="bilinear", align_corners=False))[0])
        return res

    def tile_side(self) -> int:
        """--tile, else the input size: at native scale a tile larger than the input would show the model more
        context than it was trained on; --tile still wins."""
        return self.opts.tile or self.size

    def _tiles(self, img: np.ndarray) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The image as a CHW view on the host, and the forward pass of a batch of its tiles: only tiles go to the device."""
        return torch.from_numpy(img).permute(2, 0, 1), lambda tiles: self.logits(self.model_input(tiles.permute(0, 2, 3, 1)))

    @torch.inference_mode()
    def tiled_logits(self, img: np.ndarray) -> torch.Tensor:
        """Sliding window at full resolution over one image: all its logits at once (the predictor itself takes bands)."""
        x, forward = self._tiles(img)
        return sliding_window(x, self.tile_side(), self.opts.overlap, forward, self.batch_size)

    # -- the three ways through: each gives masks and confidences per image ----------------------
    def groups(self, images: np.ndarray, errors: list[str | None]) -> tuple[list[int], list[int], list[int]]:
        """Rows to stack as they are, to resize (or, at native scale, pad) to the model input, and to tile (error
        rows are in none).

        Images at the model's size are stacked only when every untiled image is; one of another size sends them
        all through the resize (or pad) path, which still runs them as one forward pass."""
        whole, tiled = [], []
        for i, e in enumerate(errors):
            if e is None:
                (tiled if self.needs_tiling(*images[i].shape[:2]) else whole).append(i)
        if all(images[i].shape[:2] == (self.size, self.size) for i in whole):
            return whole, [], tiled
        return [], whole, tiled

    @torch.inference_mode()
    def stacked(self, imgs: list[np.ndarray]) -> list[Segmented]:
        """Images at the model's size: one stack in, masks and confidences out in one copy each."""
        mask, conf = mask_and_confidence(self.logits(self.model_input(imgs)))
        self._prefetch()  # the next chunk's copy to the device runs while this one computes
        masks, means, confmaps = mask.cpu().numpy(), conf.mean(dim=(1, 2)).cpu().numpy(), self._confidence_map(conf)
        return [(masks[j], means[j], None if confmaps is None else confmaps[j]) for j in range(len(imgs))]

    def resized(self, imgs: list[np.ndarray]) -> list[Segmented]:
        return [self._segmented(lg) for lg in self.resized_logits(imgs)]

    @torch.inference_mode()
    def tiled(self, img: np.ndarray) -> Segmented:
        """Sliding window, band by band: the full-size result lives on the host as a uint8 mask (and uint8
        confidence map), never as K float32 logits per pixel."""
        h, w = img.shape[:2]
        mask = np.empty((h, w), np.uint8)
        confmap = np.empty((h, w), np.uint8) if self.confidence_map else None
        total = 0.0
        x, forward = self._tiles(img)
        for y0, y1, lg in blended_bands(x, self.tile_side(), self.opts.overlap, forward, self.batch_size):
            m, c = mask_and_confidence(lg)
            mask[y0:y1] = m.cpu().numpy()
            total += c.sum(dtype=torch.float64).item()
            if confmap is not None:
                confmap[y0:y1] = self._confidence_map(c)
        return mask, total / (h * w), confmap

    @torch.inference_mode()
    def core(self, window: np.ndarray, origin: tuple[int, int], shape: tuple[int, int],
             core: tuple[int, int, int, int]) -> tuple[np.ndarray, float]:
        """One region of a huge image (rayseg.regions): the core's mask and confidence sum, from the image's
        global tile grid (tiling.core_logits), so the mosaic of cores is the whole-image sliding window's mask.
        `window` is already normalised (the image-wide window, not the region's own percentiles)."""
        x, forward = self._tiles(window)
        with self.lock:
            lg = core_logits(x, origin, shape, core, self.opts.tile or self.size, self.opts.overlap, forward, self.batch_size)
            mask, conf = mask_and_confidence(lg)
            return mask.cpu().numpy(), conf.sum(dtype=torch.float64).item()

    def _segmented(self, lg: torch.Tensor) -> Segmented:
        with torch.inference_mode():
            mask, conf = mask_and_confidence(lg)
        return mask.cpu().numpy(), conf.mean().item(), self._confidence_map(conf)

    def _confidence_map(self, conf: torch.Tensor) -> np.ndarray | None:
        return (conf * 255).round().to(torch.uint8).cpu().numpy() if self.confidence_map else None

    # -- bounded by the batch size, surviving out-of-memory errors ---------------------------------
    def in_chunks(self, step: Callable[[list], list], items: list, ids: list) -> list[Segmented | str]:
        """`step` over `items` in chunks of at most batch_size: a Segmented per item, or the error sentence of one
        that does not fit in device memory even alone. Out of memory, the batch size halves for good and the
        chunk is tried again."""
        out: list[Segmented | str] = []
        i = 0
        while i < len(items):
            n = min(self.batch_size, len(items) - i)
            self._upcoming = items[i + n : i + 2 * n]
            try:
                out += step(items[i : i + n])
                i += n
                continue
            except torch.OutOfMemoryError:
                pass  # freed outside the handler, where the failed step's tensors are no longer referenced
            self._upcoming = []
            self._free()
            if n > 1:
                self.batch_size = max(1, n // 2)
                log.warning("predictor: out of device memory at %d images (or tiles) a batch; batch size now %d", n, self.batch_size)
                self._report()
                continue
            h, w = items[i].shape[:2]
            log.warning("predictor: %s (%dx%d) does not fit in device memory even alone; written as an error row", ids[i], h, w)
            out.append(f"out of device memory: this {h}x{w} image does not fit on {self.device} even alone")
            i += 1
        return out

    def _tiled_one(self, imgs: list[np.ndarray]) -> list[Segmented]:
        """One image through the sliding window; its tiles go batch_size at a time, so a retry after an
        out-of-memory error runs smaller tile batches."""
        (img,) = imgs
        while True:
            try:
                return [self.tiled(img)]
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
            self._free()
            self.batch_size //= 2
            log.warning("predictor: out of device memory on a tiled image; batch size now %d", self.batch_size)
            self._report()

    def _prefetch(self) -> None:
        if self.feed.cuda and self._upcoming:
            self.feed.prefetch(self._upcoming)

    def _free(self) -> None:
        self.feed.ahead = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- the Ray Data stage -----------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, errors = batch["image"], errors_of(batch)
        images, errors = self.inputs(images, batch.get("dtype"), errors)  # uint8 stays uint8 (fast path); deeper: float32
        ids = list(batch["image_id"]) if "image_id" in batch else list(range(len(images)))
        stack, resize, tile = self.groups(images, errors)
        results: dict[int, Segmented | str] = {}
        with self.lock:
            if stack:
                results.update(zip(stack, self.in_chunks(self.stacked, [images[i] for i in stack], [ids[i] for i in stack])))
            if resize:
                step = self.padded if self.geometry == "native" else self.resized
                results.update(zip(resize, self.in_chunks(step, [images[i] for i in resize], [ids[i] for i in resize])))
            for i in tile:  # one image at a time, its tiles batch_size at a time
                results.update(zip([i], self.in_chunks(self._tiled_one, [images[i]], [ids[i]])))
        for i, r in list(results.items()):
            if isinstance(r, str):
                errors[i] = r
                del results[i]
        return assemble(batch, errors, results, self.label, self.confidence_map)


def assemble(batch: dict[str, np.ndarray], errors: list[str | None], results: dict[int, Segmented], label: str,
             with_confidence: bool) -> dict[str, np.ndarray]:
    """Output rows in input order: the input's columns but `image`, plus mask, mean_confidence, model (and
    confidence). A row without a result (an error row) keeps its error, a 1x1 zero mask and a NaN confidence."""
    n = len(errors)
    masks, confmaps = np.empty(n, dtype=object), np.empty(n, dtype=object)
    mean_conf = np.full(n, np.nan, np.float32)
    placeholder = np.zeros((1, 1), np.uint8)
    for i in range(n):
        mask, mean, confmap = results.get(i, (None, np.nan, None))
        masks[i] = placeholder if mask is None else mask
        confmaps[i] = placeholder if confmap is None else confmap
        mean_conf[i] = mean
    out = {k: v for k, v in batch.items() if k != "image"}
    out["error"] = np.array(errors, dtype=object)
    out["mask"] = masks
    out["mean_confidence"] = mean_conf
    if with_confidence:
        out["confidence"] = confmaps
    out["model"] = np.array([label] * n, dtype=object)
    return out
