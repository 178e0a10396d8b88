"""Frozen configuration dataclasses. Each field is one CLI flag (`--batch-size`) and one YAML key (`batch_size`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rayseg.errors import UserError

MODEL_NAMES = ("unet", "pointwise", "fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")


def _f(default=None, help="", **meta):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ModelConfig:
    """How to get a model: a rayseg checkpoint, or an architecture built fresh."""

    model: str = _f("lraspp_mobilenet_v3_large", "model architecture", choices=MODEL_NAMES)
    num_classes: int = _f(2, "number of classes, background included")
    weights: str | None = _f(None, "torchvision weights name (e.g. DEFAULT); needs a model hub")
    checkpoint: str | None = _f(None, "rayseg checkpoint directory URL (overrides --model/--num-classes)")
    input_size: int | None = _f(None, "side of the square model input (default: checkpoint's, else 256)")


@dataclass(frozen=True)
class SegmentConfig(ModelConfig):
    inputs: tuple[str, ...] = _f((), "input paths, globs or URLs (any fsspec protocol)", positional=True, optional=True)  # optional: a --config YAML may give them
    output: str = _f("", "output folder URL", short="-o")
    storage_options: dict = _f({}, "fsspec storage options as JSON, e.g. '{\"endpoint_url\": ...}'")
    h5_key: str = _f("images", "HDF5 dataset holding the images")
    image_column: str = _f("image", "Parquet column holding encoded image bytes")
    batch_size: int | None = _f(None, "images per model batch (default: 16 on CPU; on a GPU the largest power of two up to 256 "
                                      "whose forward pass fits in half the free device memory)")
    actors: str = _f("", "predictor actor pool size MIN:MAX (default: one per GPU, else one per --threads CPUs)")
    threads: int | None = _f(None, "torch threads per CPU predictor actor (default: 1, or the CPUs / --actors)")
    device: str = _f("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16", choices=("auto", "fp32", "bf16", "fp16"))
    mask_format: str = _f("png", "png, rle or both", choices=("png", "rle", "both"))
    max_pixels: int = _f(100_000_000, "refuse images with more pixels than this (decompression bombs)")
    objects: bool = _f(False, "also write one row per connected component to OUT/objects/")
    min_area: int = _f(0, "with --objects: drop components smaller than this many pixels")
    tile: int | None = _f(None, "tile side for large images (default: the input size, when an image is over 2x it)")
    overlap: float = _f(0.25, "fraction of a tile shared with its neighbours")
    tta: str = _f("none", "test-time augmentation: none or flip", choices=("none", "flip"))
    compile: bool = _f(False, "torch.compile the model")
    overwrite: bool = _f(False, "replace a non-empty output folder")
    address: str | None = _f(None, "Ray cluster address (default: RAY_ADDRESS, else start Ray embedded)")
    quiet: bool = _f(False, "no progress output")

    def __post_init__(self):
        if not self.inputs:
            raise UserError("give at least one INPUT path, glob or URL")
        if not self.output:
            raise UserError("--output is required")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.num_classes < 1 or self.num_classes > 255:
            raise UserError("--num-classes must be between 1 and 255")
        if not 0 <= self.overlap < 1:
            raise UserError("--overlap must be in [0, 1)")
        if self.actors:
            actor_range(self.actors)
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")


def public_config(cfg) -> dict:
    """A config as a dict that is safe to log, write or hand to workers: credentials in storage options redacted."""
    from rayseg.storage import redact

    return {**asdict(cfg), "storage_options": redact(cfg.storage_options)}


def actor_range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = text.partition(":")
        lo_i = int(lo)
        hi_i = int(hi) if hi else lo_i
    except ValueError:
        raise UserError(f"--actors must look like MIN:MAX or N, got {text!r}") from None
    if lo_i < 1 or hi_i < lo_i:
        raise UserError(f"--actors {text!r}: need 1 <= MIN <= MAX")
    return lo_i, hi_i
