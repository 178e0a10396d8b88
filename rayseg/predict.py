"""The predictor: one model per actor, uint8 batches in, masks and confidences out.

Everything after the host->device copy happens on the device: normalisation, resizing to the model input,
the forward pass (bf16 autocast on GPU), resizing logits back to each image's size, softmax, argmax.
Images much larger than the model input are segmented at full resolution by a sliding window (rayseg.tiling),
so memory is bounded by the tile, not the image.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from rayseg.decode import errors_of
from rayseg.errors import EnvError
from rayseg.intensity import Inputs
from rayseg.models import ModelBundle, for_inference
from rayseg.tiling import sliding_window

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


# The oldest NVIDIA driver each CUDA major version runs on (minor-version compatibility; NVIDIA's CUDA release notes)
MIN_DRIVER = {11: 450, 12: 525, 13: 580}


def nvidia_driver_version() -> str | None:
    """The NVIDIA kernel driver's version on this node, or None where there is none (NVML, then the kernel module)."""
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else v
    except Exception:
        pass
    try:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", open("/proc/driver/nvidia/version").read())
        if m:
            return m.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_problem() -> str | None:
    """Why CUDA cannot start in this process, in words, or None when it can."""
    if torch.cuda.is_available():
        return None
    host, built = socket.gethostname(), torch.version.cuda
    if built is None:
        return f"torch {torch.__version__} on {host} is a CPU-only build; install a CUDA build of torch"
    driver = nvidia_driver_version()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if driver is None:
        return (f"no NVIDIA GPU or driver is visible to this worker on {host} (CUDA_VISIBLE_DEVICES={visible!r}); "
                f"run GPU actors only where Ray's GPU resources are real GPUs")
    need = MIN_DRIVER.get(int(built.split(".")[0]))
    if need and int(driver.split(".")[0]) < need:
        return (f"torch {torch.__version__} is built for CUDA {built}, which needs an NVIDIA driver >= {need}, and {host} has "
                f"driver {driver}; install torch built for an older CUDA (e.g. pip install torch --index-url "
                f"https://download.pytorch.org/whl/cu126) or a newer driver")
    return (f"torch {torch.__version__} (CUDA {built}) cannot start CUDA on {host} although NVIDIA driver {driver} is there "
            f"(CUDA_VISIBLE_DEVICES={visible!r}): a driver/CUDA mismatch, or the GPU is not passed to the container")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        problem = cuda_problem()
        if problem:
            raise EnvError(f"the predictor must run on a GPU, but {problem}")
    return torch.device(device)


def device_error_of(exc: BaseException) -> EnvError | None:
    """The EnvError a predictor raised in an actor, out of Ray's wrapping (RayActorError, ActorDiedError,
    UserCodeException...): an actor that dies in its constructor reaches the driver only as text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc) is EnvError:
            return exc
        m = re.findall(r"rayseg\.errors\.EnvError: (.+)", str(exc))
        if m:
            return EnvError(m[-1].strip())
        exc = getattr(exc, "cause", None) if isinstance(getattr(exc, "cause", None), BaseException) else (exc.__cause__ or exc.__context__)
    return None


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


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """HWC or NHWC uint8 -> float NCHW on the device (channels_last in memory), in one host->device copy."""
    t = torch.from_numpy(images)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return (t if t.dim() == 4 else t[None]).permute(0, 3, 1, 2).float()


class Predictor:
    """Ray Data callable class: `__init__` builds the model once per actor, `__call__` handles one batch.

    `opts` has the predict options (rayseg.config.PredictConfig): device, precision, batch_size, tile, overlap,
    tta, compile. `threads` sets torch's intra-op threads on CPU; `confidence_map` keeps the per-pixel
    confidence (for the objects table).
    """

    def __init__(self, bundle: ModelBundle, opts, *, threads: int | None = None, confidence_map: bool = False,
                 report: Callable[[str, dict], None] | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.opts = opts
        self.confidence_map = confidence_map
        self.device = resolve_device(opts.device)
        self.amp = autocast_dtype(self.device, opts.precision)
        self.card = bundle.card
        self.inputs = Inputs(bundle.card, getattr(opts, "intensity", ""))  # dtype, channels and normalisation, per the card
        self.size = bundle.card.input_size
        self.model = for_inference(bundle.build(), self.device, opts.compile)
        self.mean, self.std = bundle.card.pixel_mean_std(self.device)
        self.label = bundle.label
        self.report = report
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
            x = to_device(img, self.device)
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
        """Sliding window at full resolution over one image."""
        return sliding_window(to_device(img, self.device), self.opts.tile or self.size, self.opts.overlap, self.logits, self.batch_size)

    # -- the three ways through: each gives masks and confidences per image ----------------------
    def groups(self, images: np.ndarray, errors: list[str | None]) -> tuple[list[int], list[int], list[int]]:
        """Rows to stack as they are, to resize to the model input, and to tile (error rows are in none).

        Images at the model's size are stacked only when every untiled image is; one of another size sends them
        all through the resize path, which still runs them as one forward pass."""
        whole, tiled = [], []
        for i, e in enumerate(errors):
            if e is None:
                (tiled if self.needs_tiling(*images[i].shape[:2]) else whole).append(i)
        if all(images[i].shape[:2] == (self.size, self.size) for i in whole):
            return whole, [], tiled
        return [], whole, tiled

    @torch.inference_mode()
    def stacked(self, imgs: list[np.ndarray]) -> list[Segmented]:
        """The common case, images at the model's size: one stack in, masks and confidences out in one copy each."""
        mask, conf = mask_and_confidence(self.logits(to_device(np.stack(imgs), self.device)))
        masks, means, confmaps = mask.cpu().numpy(), conf.mean(dim=(1, 2)).cpu().numpy(), self._confidence_map(conf)
        return [(masks[j], means[j], None if confmaps is None else confmaps[j]) for j in range(len(imgs))]

    def resized(self, imgs: list[np.ndarray]) -> list[Segmented]:
        return [self._segmented(lg) for lg in self.resized_logits(imgs)]

    def tiled(self, img: np.ndarray) -> Segmented:
        return self._segmented(self.tiled_logits(img))

    def _segmented(self, lg: torch.Tensor) -> Segmented:
        with torch.inference_mode():
            mask, conf = mask_and_confidence(lg)
        return mask.cpu().numpy(), conf.mean().item(), self._confidence_map(conf)

    def _confidence_map(self, conf: torch.Tensor) -> np.ndarray | None:
        return (conf * 255).round().to(torch.uint8).cpu().numpy() if self.confidence_map else None

    # -- the Ray Data stage -----------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, errors = batch["image"], errors_of(batch)
        images, errors = self.inputs(images, batch.get("dtype"), errors)  # uint8 stays uint8 (fast path); deeper: float32
        stack, resize, tile = self.groups(images, errors)
        results: dict[int, Segmented] = {}
        if stack:
            results.update(zip(stack, self.stacked([images[i] for i in stack])))
        if resize:
            results.update(zip(resize, self.resized([images[i] for i in resize])))
        for i in tile:  # one image at a time: its full-size logits are the largest tensor the predictor holds
            results[i] = self.tiled(images[i])
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
