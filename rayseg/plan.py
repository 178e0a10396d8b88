"""The training plan: what `rayseg train` chooses from the fingerprint of the training set, each choice with its reason.

    rayseg plan data/train --num-classes 3
    rayseg plan s3://b/train/ --num-classes 3 --use-gpu --json plan.json

As nnU-Net does, the choices come from the data rather than from the user: the intensity normalisation from the
dtypes and the intensity distribution, the input size from the median image and the memory of a worker, the batch
size from that memory, foreground oversampling from how rare the classes are, and the geometry (native-scale crops
and a sliding window, or whole images resized) from how much the image sizes vary. An option given on the command
line wins over its planned value, and the plan says so. `rayseg train` prints the plan and records it, with the
fingerprint, in the model card (`plan`); the predictor follows the card's `geometry`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rayseg.fingerprint import Fingerprint

log = logging.getLogger("rayseg")

CT_AIR = -500.0  # values this low exist in CT (Hounsfield units: air is -1000) and in no unitless modality
ZERO_BACKGROUND = 0.2  # a median image with this share of exact zeros has a background outside the body (MRI)
HOT_TAIL = 1.0  # a maximum further past the 99.5th percentile than the window is wide: outliers (hot pixels), which a
# z-score follows and a percentile window ignores
MULTIPLE = 16  # input sides are multiples of this: twice the UNet's total stride (8), as nnU-Net rounds its patch
MIN_INPUT, MAX_INPUT = 32, 512  # past 512 a crop already holds far more context than these models use
MIN_BATCH = 2  # nnU-Net's floor: batch norm needs more than one image
MAX_BATCH = {"cpu": 8, "gpu": 64}  # on a CPU a larger batch only makes each step longer; 8 is train's earlier default
# bytes of training memory per input pixel: twice the most that autograd was measured to save for a forward pass
# (one grey channel, 3 classes: 1.76 KB for unet, 1.71 KB for lraspp_mobilenet_v3_large, 2.77 KB for
# deeplabv3_mobilenet_v3_large), rounded up, since the backward pass holds their gradients beside them; the resnet50
# models were not measured and need more
TRAIN_BYTES_PER_PIXEL = 6 * 1024
MEMORY_SHARE = 0.5  # of a worker's memory, for the step: the rest holds the data, the model and the optimizer
RARE_CLASS = 0.05  # a foreground class under this share of the pixels is rare: random crops often miss it
FOREGROUND_SHARE = 1 / 3  # nnU-Net's oversampling: a third of the crops centred on a foreground pixel
SHARED_SCALE = 0.25  # images whose 99.5th percentiles lie within this fraction of their median share one scale (slices
# of one volume, one acquisition): a window per image would stretch the images with little signal
MIN_SPREAD_IMAGES = 4  # fewer images say nothing about how brightness varies between images
SIZE_SPREAD = 4.0  # longer sides varying more than this (90th percentile over 10th): photos of scenes, not one scale


@dataclass(frozen=True)
class Choice:
    value: Any
    reason: str
    given: bool = False  # the user's option, not the plan's


@dataclass(frozen=True)
class Plan:
    intensity: Choice
    input_size: Choice
    batch_size: Choice
    geometry: Choice
    oversample: Choice
    fingerprint: Fingerprint | None = field(default=None, compare=False)

    NAMES: ClassVar[tuple[str, ...]] = ("intensity", "input_size", "batch_size", "geometry", "oversample")

    def values(self) -> dict:
        return {n: getattr(self, n).value for n in self.NAMES}

    def choices(self) -> dict:
        """{name: {value, reason, given}}: what the summary and the card record."""
        return {n: {"value": c.value, "reason": c.reason, "given": c.given} for n in self.NAMES for c in [getattr(self, n)]}

    def to_json(self) -> dict:
        return {**self.choices(), "fingerprint": self.fingerprint.to_json() if self.fingerprint else None}

    def lines(self) -> list[str]:
        """One line per choice: name, value, who chose it and why."""
        width = max(len(str(getattr(self, n).value)) for n in self.NAMES)
        return [f"{n:<11} {str(c.value):<{width}}  {'given' if c.given else 'planned'}: {c.reason}"
                for n in self.NAMES for c in [getattr(self, n)]]


# ---- the rules: plain functions of the fingerprint ----------------------------------------------------------


def plan_intensity(fp: Fingerprint) -> Choice:
    """nnU-Net's choice by modality, read from the values: CT's units and a scale the images share get the dataset's
    clip and z-score, anything else a z-score per image (over the non-zero pixels: MRI's background stays 0); hot
    pixels, which a z-score follows, a percentile window per image (csbdeep's and stardist's reason for it)."""
    if not fp.deep():
        return Choice("auto", "8-bit images: value / 255, as photos always were")
    lo, hi = fp.value_range
    if lo <= CT_AIR:
        return Choice("dataset", f"values from {lo:g} to {hi:g} (CT's Hounsfield units: air is -1000): one physical scale "
                                 "shared by every image, so the training set's 0.5..99.5 percentile clip and z-score")
    if fp.zero_fraction >= ZERO_BACKGROUND and fp.tail <= HOT_TAIL:
        return Choice("nonzero", f"{fp.zero_fraction:.0%} of a median image is exactly 0 (a background outside the body, as "
                                 "in MRI) and the values have no physical unit: z-score over each image's non-zero pixels")
    if fp.high_spread <= SHARED_SCALE and fp.images >= MIN_SPREAD_IMAGES:
        return Choice("dataset", f"the images' 99.5th percentiles lie within {fp.high_spread:.0%} of each other (one "
                                 "intensity scale, as slices of one volume share): the training set's 0.5..99.5 percentile "
                                 "clip and z-score, which per-image windows would lose")
    if fp.tail > HOT_TAIL:
        # auto: for these deep images exactly percentile 1..99.8, and what cards recorded before there was a plan
        return Choice("auto", f"outliers far past the 99.5th percentile (hot pixels), which a z-score would follow: "
                              "per-image 1..99.8 percentiles")
    return Choice("nonzero", f"{'/'.join(fp.dtypes)} values without a physical unit, brightness varying by image (the 99.5th "
                             f"percentile moves {fp.high_spread:.0%}; fluorescence-like), no hot pixels: nnU-Net's z-score "
                             "per image (over its non-zero pixels: all of them without a zero background)")


def _round_up(n: float, multiple: int = MULTIPLE) -> int:
    return int(math.ceil(n / multiple) * multiple)


def largest_input(memory: float) -> int:
    """The largest side (a multiple of MULTIPLE, at most MAX_INPUT) of which MIN_BATCH images fit in `memory`."""
    side = int(math.sqrt(memory * MEMORY_SHARE / (MIN_BATCH * TRAIN_BYTES_PER_PIXEL))) // MULTIPLE * MULTIPLE
    return max(MIN_INPUT, min(MAX_INPUT, side))


def plan_input_size(fp: Fingerprint, memory: float) -> Choice:
    """The median image whole (nnU-Net's patch: the median shape), unless a worker's memory cannot take it."""
    h, w = fp.median_size
    want, cap = max(MIN_INPUT, _round_up(max(h, w))), largest_input(memory)
    objects = max(fp.object_area_p90, default=0.0)
    across = f"; the larger objects are about {math.sqrt(objects):.0f} px across" if objects else ""
    if want <= cap:
        return Choice(want, f"the median image ({h}x{w}) fits whole, at native scale{across}")
    return Choice(cap, f"the median image ({h}x{w}) is larger than {MIN_BATCH} images of {cap}x{cap} in "
                       f"{memory / 2**30:.1f} GiB per worker: native-scale crops of {cap}{across}")


def plan_batch_size(fp: Fingerprint, side: int, memory: float, device: str, workers: int) -> Choice:
    """As many images of `side` as half a worker's memory takes, a power of two, capped by the device kind and by
    each worker's share of the images."""
    fits = memory * MEMORY_SHARE / (side * side * TRAIN_BYTES_PER_PIXEL)
    share = max(1, fp.images // max(1, workers))
    n = 1
    while n * 2 <= min(fits, MAX_BATCH[device], share):
        n *= 2
    n = max(n, min(MIN_BATCH, share))
    return Choice(n, f"{int(fits)} images of {side}x{side} fit in half of {memory / 2**30:.1f} GiB per worker; at most "
                     f"{MAX_BATCH[device]} on a {device.upper()} and {share} (each worker's share of {fp.images} images)")


def plan_geometry(fp: Fingerprint) -> Choice:
    """Native scale (nnU-Net's crops, and a sliding window at inference) unless the image sizes vary so much that
    the images are scenes whose objects scale with the photo (torchvision's VOC-style whole-image resizing)."""
    small, large = fp.side_range
    spread = large / max(small, 1)
    if spread > SIZE_SPREAD:
        return Choice("resize", f"images' longer sides vary {spread:.1f}x (10th percentile {small}, 90th {large}): whole "
                                "images resized to the input size, in training and at inference")
    return Choice("native", f"images' longer sides vary {spread:.1f}x: native-scale crops in training; at inference a "
                            "sliding window at native scale, smaller images padded, not stretched")


def plan_oversample(fp: Fingerprint, side: int, geometry: str) -> Choice:
    """A third of the crops centred on foreground (nnU-Net) where a class is rare and crops do not hold whole images."""
    h, w = fp.median_size
    if geometry == "resize" or max(h, w) <= side:
        return Choice(0.0, "every crop holds a whole image, so it holds all of that image's foreground")
    fg = fp.class_fraction[1:]
    if not fg:
        return Choice(0.0, "no foreground class")
    rarest = min(range(len(fg)), key=lambda i: fg[i]) + 1
    share = fp.class_fraction[rarest]
    if share < RARE_CLASS:
        return Choice(round(FOREGROUND_SHARE, 4), f"class {rarest} is {share:.2%} of the pixels (in {fp.class_images[rarest]:.0%} "
                                                  "of the images): a third of the crops centred on a foreground pixel")
    return Choice(0.0, f"the rarest class ({rarest}) is {share:.1%} of the pixels: random crops see every class")


def make_plan(fp: Fingerprint, given: dict, memory: float, device: str = "cpu", workers: int = 1) -> Plan:
    """The plan of a training set; `given` holds the options the user set (None or "" where not), which win."""

    def choose(name: str, planned: Choice) -> Choice:
        value = given.get(name)
        return planned if value in (None, "") else Choice(value, f"--{name.replace('_', '-')} given (the plan: {planned.value})", True)

    intensity = choose("intensity", plan_intensity(fp))
    size = choose("input_size", plan_input_size(fp, memory))
    geometry = choose("geometry", plan_geometry(fp))
    return Plan(intensity, size, choose("batch_size", plan_batch_size(fp, size.value, memory, device, workers)), geometry,
                choose("oversample", plan_oversample(fp, size.value, geometry.value)), fp)


# ---- from a training set, on Ray -----------------------------------------------------------------------------


def worker_memory(use_gpu: bool, workers: int) -> tuple[float, str]:
    """(bytes a training worker may use, "gpu" or "cpu"): a GPU's memory (this machine's first, else 16 GiB), or
    Ray's memory over its CPUs (each worker takes one)."""
    import ray

    if use_gpu:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 16 * 2**30
        return float(total), "gpu"
    res = ray.cluster_resources()
    return float(res.get("memory", 4 * 2**30)) / max(1.0, res.get("CPU", 1.0), float(workers)), "cpu"


def plan_dataset(ds, cfg) -> tuple[Plan, dict]:
    """(the plan of a Ray Dataset of decoded training pairs, intensity.combine_stats' totals of the same pass)."""
    from rayseg.fingerprint import measure
    from rayseg.intensity import dataset_rows

    fp, stats = measure(dataset_rows(ds), cfg.num_classes)
    memory, device = worker_memory(cfg.use_gpu, cfg.workers)
    given = {n: getattr(cfg, n, None) for n in Plan.NAMES}
    return make_plan(fp, given, memory, device, cfg.workers), stats


def log_plan(plan: Plan) -> None:
    log.info("plan (from %d training images; an option given wins):", plan.fingerprint.images if plan.fingerprint else 0)
    for line in plan.lines():
        log.info("  %s", line)


def run_plan(cfg) -> int:
    """`rayseg plan`: read and fingerprint DATA on Ray, print the plan (and write it as JSON with --json)."""
    import ray

    from rayseg import storage
    from rayseg.labelled import find_pairs, read_labelled, split_errors
    from rayseg.runtime import ensure_ray

    so = cfg.storage_options
    units, _ = find_pairs(cfg.data, so)
    ensure_ray(cfg.address, cfg.quiet, cfg.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = read_labelled(cfg.data, cfg.num_classes, so, cfg.h5_key, cfg.mask_key, cfg.max_pixels, units=units, mask_mode=cfg.mask_mode)[0]
    ds, n, _ = split_errors(ds, "data")
    if not n:
        from rayseg.errors import UserError

        raise UserError("no usable labelled pairs to plan from; see the skipped pairs above")
    plan, _ = plan_dataset(ds, cfg)
    if cfg.json == "-":
        print(json.dumps(plan.to_json(), indent=2))
        return 0
    print("\n".join(plan.lines()))
    if cfg.json:
        storage.write_json(cfg.json, plan.to_json(), so)
    return 0


def register(sub) -> None:
    from rayseg.cliutil import add_command
    from rayseg.config import PlanConfig

    add_command(sub, "plan", PlanConfig, run_plan, help="print the training plan that `rayseg train` would make from DATA",
                description=__doc__.split("\n\n")[0])
