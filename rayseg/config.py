"""Every option of every command, declared once, and the frozen config classes composed from them.

An option is one field name, one type, one help text and one check. A field `batch_size` is the flag
`--batch-size`, the YAML key `batch_size` and the keyword `batch_size=` of the Python API. Options come in
groups (storage, cluster, pool, model, read, labelled, predict, output); a command's config is the groups it
takes plus its own options, in `--help` order. Where commands differ only in a default (`--batch-size` is
automatic in segment, 16 in evaluate and bench, 8 in train), the command passes the default; the help text
stays the one declared here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from rayseg.errors import UserError

MODEL_NAMES = ("unet", "pointwise", "fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
MISSING = dataclasses.MISSING
LAYOUTS = ("h5", "folders", "tar", "files", "parquet")  # of archives `rayseg synth` writes
GENERATORS = ("shapes", "blobs")
IMAGE_FORMATS = ("png", "jpeg")


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


def _at_least(n: int) -> Callable[[str, Any], None]:
    def check(flag: str, value) -> None:
        if value is not None and value < n:
            raise UserError(f"{flag} must be at least {n}")

    return check


def _between(lo: float, hi: float, text: str) -> Callable[[str, Any], None]:
    def check(flag: str, value) -> None:
        if value is not None and not lo <= value <= hi:
            raise UserError(f"{flag} must be {text}")

    return check


def _multiple_of(n: int) -> Callable[[str, Any], None]:
    def check(flag: str, value) -> None:
        if value < n or value % n:
            raise UserError(f"{flag} must be a multiple of {n}")
    return check


def _overlap(flag: str, value: float) -> None:
    if not 0 <= value < 1:
        raise UserError(f"{flag} must be in [0, 1)")


def _actors(flag: str, value: str) -> None:
    if value:
        actor_range(value)


def _model_name(flag: str, value: str) -> None:
    from rayseg.adapters import check_name

    check_name(flag, value)


def _intensity(flag: str, value: str) -> None:
    from rayseg.intensity import check_spec

    check_spec(flag, value)


# How an option bears on the rows a run writes (nightly keys its manifest on it: rayseg.nightly.output_key).
KEYED = "keyed"  # rows change with its value: nightly's key holds the value
SAME = "same"  # rows are the same whatever its value (batch size, threads, where the output goes)
BY_MODEL = "model"  # says which model runs: keyed through the model's identity (checkpoint digest, or architecture and classes)


@dataclass(frozen=True)
class Option:
    type: Any
    default: Any
    help: str
    check: Callable[[str, Any], None] | None = None
    meta: dict = field(default_factory=dict)  # cliutil: choices, short, positional, optional, cli, auto
    rows: str = ""  # KEYED, SAME or BY_MODEL; required of the options of the model, read, predict and output groups

    def field(self, default=MISSING, **meta) -> dataclasses.Field:
        value = self.default if default is MISSING else default
        meta = {"help": self.help, **self.meta, **meta}
        if isinstance(value, (dict, list)):
            return field(default_factory=lambda: type(value)(value), metadata=meta)
        return field(default=value, metadata=meta)


_DEVICE = ("auto", "cpu", "cuda")
_PRECISION = ("auto", "fp32", "bf16", "fp16")

OPTIONS: dict[str, Option] = {
    # storage
    "storage_options": Option(dict, {}, "fsspec storage options as JSON, e.g. '{\"endpoint_url\": ...}'"),
    # cluster
    "address": Option(str | None, None, "Ray cluster address (default: RAY_ADDRESS, else the Ray that `ray start` runs on this machine, else start Ray embedded; `local`: always embedded)"),
    "quiet": Option(bool, False, "no progress output"),
    "verbose": Option(bool, False, "show Ray's own log lines on the console"),
    "dashboard": Option(bool, False, "start Ray's dashboard with an embedded Ray (a cluster keeps its own setting)"),
    # pool
    "actors": Option(str, "", "predictor actor pool size MIN:MAX (default: one per GPU, else one per --threads CPUs)", _actors),
    "threads": Option(int | None, None, "torch threads per CPU predictor actor (default: 1, or the CPUs / --actors)", _at_least(1)),
    "cpus_per_gpu": Option(int, 4, "CPUs each GPU predictor actor reserves: it decodes and encodes that many batches at once "
                                   "on them while the GPU runs one at a time", _at_least(1)),
    # model
    "model": Option(str, "lraspp_mobilenet_v3_large", f"model: one of {', '.join(MODEL_NAMES)}; or a model of your own "
                    "(rayseg.adapters): FILE.onnx, FILE.pt2, hf:FOLDER, smp:ARCH[:ENCODER], python:MODULE:FACTORY", _model_name, rows=BY_MODEL),
    "num_classes": Option(int, 2, "number of classes, background included", _between(1, 255, "between 1 and 255"),
                          {"auto": "3 for shapes, 2 for blobs"}, rows=BY_MODEL),
    "weights": Option(str | None, None, "torchvision weights name (e.g. DEFAULT; needs a model hub); for smp: and python: "
                                        "models the weights FILE or URL (safetensors, or a state dict)", rows=BY_MODEL),
    "mean": Option(tuple[float, ...], (), "per channel, the mean the model's input is standardised by, in 0..1 units "
                                          "(default: the card's; ImageNet's for RGB)", rows=KEYED),
    "std": Option(tuple[float, ...], (), "per channel, the std the model's input is standardised by, in 0..1 units", rows=KEYED),
    "trust_model_code": Option(bool, False, "allow model sources that run code when loaded: .pt2 files (they unpickle) and "
                                            "python: entry points (they import); only for files you trust", rows=SAME),
    "to": Option(str, "onnx", "export format", meta={"choices": ("onnx", "pt2")}, rows=SAME),
    "with_mask": Option(bool, False, "export: also output the argmax mask and the top probability, beside the logits", rows=SAME),
    "checkpoint": Option(str | None, None, "rayseg checkpoint directory URL (overrides --model/--num-classes)", rows=BY_MODEL),
    "input_size": Option(int | None, None, "side of the square model input", _at_least(16), {"auto": "the checkpoint's, else 256"}, rows=KEYED),
    # read
    "h5_key": Option(str, "images", "HDF5 dataset holding the images", rows=KEYED),
    "image_column": Option(str, "image", "Parquet column holding encoded image bytes", rows=KEYED),
    "max_pixels": Option(int, 100_000_000, "refuse images with more pixels than this when decoded whole (decompression bombs); "
                                           "huge images read by region are bounded by --max-regions instead", _at_least(1), rows=KEYED),
    # huge images (rayseg.regions)
    "region_pixels": Option(int, 8192 * 8192, "tiled or pyramidal TIFFs with more pixels than this, and every pyramid, are "
                                              "segmented by region over the whole actor pool into a mask store", _at_least(1), rows=KEYED),
    "region_size": Option(int, 1024, "side of a huge image's regions (a multiple of 64)", _multiple_of(64), rows=KEYED),
    "level": Option(int, 0, "pyramid level of huge images to segment at (0: full resolution)", _at_least(0), rows=KEYED),
    "mpp": Option(float | None, None, "huge images: segment the pyramid level closest to this many microns per pixel "
                                      "(from the file's metadata; an image without it is an error row), in place of --level",
                  _between(0.01, 1000, "between 0.01 and 1000 microns"), rows=KEYED),
    "max_regions": Option(int, 100_000, "a huge image needing more regions is an error row (absurd headers)", _at_least(1), rows=KEYED),
    "cog": Option(bool, False, "huge GeoTIFFs: also write the mask as a COG beside its store, with their CRS (rayseg[geo])", rows=SAME),
    "ome_tiff": Option(bool, False, "huge images: also write the mask as a pyramidal OME-TIFF beside its store (QuPath, "
                                    "napari and QGIS open it; rayseg[wsi])", rows=SAME),
    "background": Option(str, "otsu", "regions of huge images to skip: otsu (no tissue: the bright side of Otsu's threshold "
                                      "on an overview) or none", meta={"choices": ("otsu", "none")}, rows=KEYED),
    # labelled
    "data": Option(tuple[str, ...], (), "labelled data: HDF5/tar shards or folders with images/ and masks/"),
    "mask_key": Option(str, "masks", "HDF5 dataset holding the masks"),
    "mask_mode": Option(str, "semantic", "semantic: mask values are class indices; binary: every non-zero value "
                                         "(e.g. instance ids) is class 1", meta={"choices": ("semantic", "binary")}),
    # predict
    "batch_size": Option(int | None, None, "images per model batch (in train: per worker and step)", _at_least(1),
                         {"auto": "16 on CPU; on a GPU the largest power of two up to 256 whose forward pass fits in half the free device memory"}, rows=SAME),
    "device": Option(str, "auto", "auto, cpu or cuda", meta={"choices": _DEVICE}, rows=KEYED),
    "precision": Option(str, "auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16", meta={"choices": _PRECISION}, rows=KEYED),
    "tile": Option(int | None, None, "tile side for large images (default: the input size, when an image is over 2x it)", _at_least(16), rows=KEYED),
    "overlap": Option(float, 0.25, "fraction of a tile shared with its neighbours", _overlap, rows=KEYED),
    "tta": Option(str, "none", "test-time augmentation: none or flip", meta={"choices": ("none", "flip")}, rows=KEYED),
    "compile": Option(bool, False, "torch.compile the model", rows=SAME),
    "intensity": Option(str, "", "intensity normalisation: auto, percentile[:LO:HI], dataset, nonzero, fixed:LO:HI or none "
                                 "(rayseg.intensity); default: the checkpoint's, and in train the plan's", _intensity, rows=KEYED),
    "geometry": Option(str, "", "native: images at native scale (crops in training; a sliding window, smaller images padded); "
                                "resize: whole images resized to the input; default: the checkpoint's, in train the plan's",
                       meta={"choices": ("native", "resize")}, rows=KEYED),
    # output
    "inputs": Option(tuple[str, ...], (), "input paths, globs or URLs (any fsspec protocol)",
                     meta={"positional": True, "optional": True}, rows=SAME),  # optional: a --config YAML may give them
    "output": Option(str, "", "output folder URL (report: the segment output it describes; export: the file to write)",
                     meta={"short": "-o"}, rows=SAME),
    "mask_format": Option(str, "png", "png, rle or both", meta={"choices": ("png", "rle", "both")}, rows=KEYED),
    "objects": Option(bool, False, "also write one row per connected component to OUT/objects/", rows=KEYED),
    "min_area": Option(int, 0, "with --objects: drop components smaller than this many pixels", _at_least(0), rows=KEYED),
    "overwrite": Option(bool, False, "replace a non-empty output folder", rows=SAME),
    # evaluate, bench
    "json": Option(str | None, None, "also write the results as JSON to this file or URL"),
    "workdir": Option(str | None, None, "folder for the generated archives and outputs; bench keeps it and reuses an archive "
                                        "made there before (bench default: a temporary folder, removed)"),
    # train
    "val_data": Option(tuple[str, ...], (), "labelled validation data, same layouts"),
    "class_names": Option(tuple[str, ...], (), "class names, background first (default: class_0, class_1, ...)", rows=SAME),
    "epochs": Option(int, 10, "epochs to train (a resumed run continues up to this many)", _at_least(1)),
    "lr": Option(float, 1e-3, "peak learning rate (AdamW, warm-up then cosine decay)"),
    "weight_decay": Option(float, 1e-4, "AdamW weight decay"),
    "loss": Option(str, "ce_dice", "ce_dice: softmax cross-entropy + Dice; bce_dice: sigmoid BCE + Dice (2 classes only)",
                   meta={"choices": ("ce_dice", "bce_dice")}),
    "workers": Option(int, 2, "Ray Train workers (DDP ranks)", _at_least(1)),
    "use_gpu": Option(bool, False, "one GPU per worker (NCCL, bf16 autocast)"),
    "seed": Option(int, 0, "random seed (model initialisation, augmentations, samples); the same seed gives the same result"),
    "oversample": Option(float | None, None, "share of training crops centred on a foreground pixel", _between(0, 1, "between 0 and 1")),
    "in_channels": Option(int | None, None, "input channels of the model (train: default the training images', grey and RGB "
                                            "mixed: 3; a model file that does not record it: 3)",
                          _at_least(1), rows=KEYED),
    "max_failures": Option(int, 3, "worker failures to recover from (from the last checkpoint)"),
    "keep_checkpoints": Option(int, 2, "checkpoints kept: this many best by val mIoU, plus the latest", _at_least(1)),
    # bench
    "input": Option(tuple[str, ...], (), "archive to measure on (paths, globs or URLs; default: a synthetic one is made)"),
    "count": Option(int, 2000, "number of images (bench: in the large run)", _at_least(1)),
    "small_count": Option(int, 200, "images in the small run; steady state = the difference of the two runs"),
    "image_size": Option(int | None, None, "side of the synthetic images (default: the input size, 256)"),
    "layout": Option(str, "tar", "layout of the synthetic archive", meta={"choices": LAYOUTS}),
    # synth
    "out": Option(str, "", "output folder URL (any fsspec protocol)"),
    "labelled": Option(bool | None, None, "write masks too", meta={"auto": "when the layout can hold them"}),
    "min_size": Option(int, 64, "smallest image side in pixels"),
    "max_size": Option(int, 128, "largest image side in pixels"),
    "shards": Option(int, 1, "number of shard files for the h5, tar and parquet layouts", _at_least(1)),
    "generator": Option(str, "shapes", "shapes of several classes, or two-class blobs", meta={"choices": GENERATORS}),
    "image_format": Option(str, "png", "image encoding for files, folders, tar and parquet", meta={"choices": IMAGE_FORMATS}),
    "metadata": Option(bool, False, "tar layout: add a KEY.json member holding {\"key\": KEY} per image"),
    "repeat": Option(int, 1, "measure everything this many times, interleaved, and report the median of each figure", _at_least(1)),
    "min_seconds": Option(float, 8.0, "time the model-only loop for at least this long"),
    # report
    "html": Option(str, "", "HTML file to write"),
    "sample": Option(int, 12, "random images to show", _at_least(0)),
    "png": Option(str | None, None, "also write each overlay as a PNG file into this folder"),
    # nightly
    "commit_seconds": Option(float, 60.0, "commit a wave once this many seconds have passed since the last commit (at the next "
                                          "whole shard); a killed run redoes about this much work", _between(1, 86400, "between 1 and 86400")),
    "commit_mb": Option(int, 1024, "also commit a wave once its data files reach this many MB", _at_least(1)),
    "commit_every": Option(int | None, None, "also commit a wave once it holds this many images (default: no cap); also caps the rows per data file", _at_least(1)),
    "lease_seconds": Option(float, 300.0, "a run's lease on OUT lasts this long unless renewed (every third of it); "
                                          "the lease of a killed run expires after it", _between(5, 86400, "between 5 and 86400")),
    "lease_wait": Option(float, 0.0, "seconds to wait for another run's lease on OUT before giving up (0: give up at once)",
                         _between(0, 86400, "between 0 and 86400")),
    "status": Option(bool, False, "print the backlog (shards new, changed, done) and exit, without starting Ray"),
    "unsafe_single_writer": Option(bool, False, "run even where OUT's store cannot keep two runs apart (no conditional "
                                                "writes); only if nothing else can ever write OUT at the same time"),
    "keep_hours": Option(int, 168, "time travel: files a commit replaced stay this many hours, so read_table(OUT, "
                                        "night=...) reads any night this recent (up to the log's 30 days)",
                         _between(0, 720, "between 0 and 720")),
    "compact_mb": Option(int, 128, "at the end of a run, merge the table's data files under half this size into files of up "
                                   "to this many MB, in one commit that changes no row (0: never)", _between(0, 4096, "between 0 and 4096")),
    "full_vacuum": Option(bool, False, "list the whole table for files no commit names (a run that ended whole needs none)"),
    # doctor
    "gpu": Option(bool, False, "check the GPU path too: predictor, segment end to end, training and bench on this machine's GPU"),
}

STORAGE = ("storage_options",)
CLUSTER = ("address", "quiet", "verbose", "dashboard")
POOL = ("actors", "threads", "cpus_per_gpu")
MODEL = ("model", "num_classes", "weights", "checkpoint", "input_size", "in_channels", "class_names", "mean", "std", "trust_model_code")
READ = ("h5_key", "image_column", "max_pixels")
LABELLED = ("data", "h5_key", "mask_key", "mask_mode", "max_pixels")
PREDICT = ("batch_size", "device", "precision", "tile", "overlap", "tta", "compile", "intensity", "geometry")
OUTPUT = ("output", "mask_format", "objects", "min_area", "overwrite")
REGIONS = ("region_pixels", "region_size", "level", "mpp", "max_regions", "background", "cog", "ome_tiff")


def _check_options(cfg) -> None:
    for f in dataclasses.fields(cfg):
        opt = OPTIONS.get(f.name)
        if opt is not None and opt.check is not None:
            opt.check(f"--{f.name.replace('_', '-')}", getattr(cfg, f.name))


def compose(name: str, *groups: tuple[str, ...], defaults: dict | None = None, hidden: tuple[str, ...] = (),
            positional: tuple[str, ...] = (), check: Callable[[Any], None] | None = None, doc: str = "",
            auto: dict | None = None) -> type:
    """A frozen dataclass with the options of `groups` in order (a name repeated keeps its first place).

    `defaults` replaces an option's default for this command, `auto` what its help says a default of None means;
    `hidden` options keep their field but get no flag;
    `positional` ones are this command's positional argument.
    `check(cfg)` (what ties options together, or a command's narrower rule) runs, then every option's own check.
    """
    defaults = defaults or {}
    names = list(dict.fromkeys(n for g in groups for n in g))
    fields = []
    for n in names:
        extra = {"cli": False} if n in hidden else {"positional": True} if n in positional else {}
        extra.update({"auto": auto[n]} if n in (auto or {}) else {})
        fields.append((n, OPTIONS[n].type, OPTIONS[n].field(defaults.get(n, MISSING), **extra)))

    def __post_init__(self):
        if check is not None:  # first: a command's own rule is the more precise one (train: 2 to 255 classes)
            check(self)
        _check_options(self)

    def of(cls, other):
        """This group's fields taken from any config that has them (e.g. the predict group of a SegmentConfig)."""
        return cls(**{f.name: getattr(other, f.name) for f in dataclasses.fields(cls)})

    ns = {"__post_init__": __post_init__, "of": classmethod(of), "__doc__": doc or f"Options: {', '.join(names)}.", "__module__": __name__}
    return dataclasses.make_dataclass(name, fields, frozen=True, namespace=ns)


def _require(flag: str, value, message: str) -> None:
    if not value:
        raise UserError(message or f"{flag} is required")


# ---- the groups that stages take whole ------------------------------------------------------------

PredictConfig = compose("PredictConfig", PREDICT, doc="What the predictor takes: batch, device, precision, tiling, TTA.")
ModelConfig = compose("ModelConfig", MODEL, doc="How to get a model: a rayseg checkpoint, or an architecture built fresh.")


# ---- the commands ---------------------------------------------------------------------------------


def _check_segment(cfg) -> None:
    _require("INPUT", cfg.inputs, "give at least one INPUT path, glob or URL")
    _require("--output", cfg.output, "--output is required")


SegmentConfig = compose("SegmentConfig", MODEL, ("inputs",), OUTPUT, STORAGE, READ, REGIONS, PREDICT, POOL, CLUSTER,
                        check=_check_segment, doc="`rayseg segment`: inputs, model, output, and how to run.")


def _check_nightly(cfg) -> None:
    _check_segment(cfg)
    if cfg.overwrite:
        raise UserError("nightly never clears its output; remove the overwrite option")


NightlyConfig = compose("NightlyConfig", MODEL, ("inputs",), OUTPUT, STORAGE, READ, REGIONS, PREDICT, POOL, CLUSTER,
                        ("commit_seconds", "commit_mb", "commit_every", "lease_seconds", "lease_wait", "status",
                         "unsafe_single_writer", "keep_hours", "compact_mb", "full_vacuum"),
                        hidden=("overwrite",), check=_check_nightly,
                        doc="`rayseg nightly`: segment's options, how often to commit, and the lease on OUT; OUT is never cleared.")


def _check_evaluate(cfg) -> None:
    from rayseg.adapters import source_kind

    _require("--checkpoint", cfg.checkpoint or source_kind(cfg.model), "--checkpoint is required (or --model naming a model of your own)")
    _require("--data", cfg.data, "--data is required: labelled data to evaluate on")


EvalConfig = compose("EvalConfig", MODEL, LABELLED, ("json",), PREDICT, POOL, STORAGE, CLUSTER,
                     defaults={"batch_size": 16}, check=_check_evaluate, doc="`rayseg evaluate`: a checkpoint scored on labelled data.")


def _check_train(cfg, plan: bool = False) -> None:
    """train's options; with `plan`, those `rayseg plan` takes too (the training DATA and the classes)."""
    _require("--data", cfg.data, "give the labelled training DATA" if plan else "--data is required: labelled training data")
    if not 2 <= cfg.num_classes <= 255:
        raise UserError("--num-classes must be between 2 and 255")
    if plan:
        return
    _require("--val-data", cfg.val_data, "--val-data is required: labelled validation data (the best checkpoint is picked on it)")
    _require("--output", cfg.output, "--output is required")
    if cfg.class_names and len(cfg.class_names) != cfg.num_classes:
        raise UserError(f"--class-names gives {len(cfg.class_names)} names for --num-classes {cfg.num_classes}")
    if cfg.loss == "bce_dice" and cfg.num_classes != 2:
        raise UserError("--loss bce_dice is for one foreground class: it needs --num-classes 2")
    if not cfg.lr > 0:
        raise UserError("--lr must be positive")


PLANNED = {n: "planned from the training set: see rayseg plan" for n in ("input_size", "batch_size", "oversample")}
TrainConfig = compose("TrainConfig", LABELLED, ("val_data", "output", "model", "num_classes", "class_names", "input_size", "epochs",
                                                "batch_size", "lr", "weight_decay", "loss", "workers", "use_gpu", "seed",
                                                "max_failures", "keep_checkpoints", "intensity", "geometry", "oversample",
                                                "in_channels"), STORAGE, CLUSTER,
                      defaults={"model": "unet"}, auto=PLANNED, check=_check_train,
                      doc="`rayseg train`: labelled data, model, schedule, workers; None or '' where the plan chooses.")


PlanConfig = compose("PlanConfig", LABELLED, ("model", "num_classes", "input_size", "batch_size", "intensity", "geometry",
                                              "oversample", "workers", "use_gpu", "json"), STORAGE, CLUSTER,
                     defaults={"model": "unet"}, auto=PLANNED, positional=("data",), check=lambda cfg: _check_train(cfg, plan=True),
                     doc="`rayseg plan`: the training data and the options `rayseg train` would be given.")


def _check_bench(cfg) -> None:
    if cfg.layout == "folders":
        raise UserError("--layout folders holds labelled pairs; bench measures files, tar, h5 or parquet")
    if cfg.count < 2 or cfg.small_count < 1 or cfg.small_count >= cfg.count:
        raise UserError("need 1 <= --small-count < --count")


BenchConfig = compose("BenchConfig", MODEL, ("input", "count", "small_count", "image_size", "layout"),
                      ("batch_size", "device", "precision", "compile"), POOL, ("repeat", "json", "workdir", "min_seconds", "address"),
                      defaults={"batch_size": 16}, check=_check_bench,
                      doc="`rayseg bench`: model-only, naive loop and pipeline on one archive.")

DemoConfig = compose("DemoConfig", ("workdir", "address", "verbose", "dashboard"), defaults={"workdir": "rayseg-demo"},
                     doc="`rayseg demo`: where to put everything, and which Ray to use.")


def _check_report(cfg) -> None:
    _require("OUT", cfg.output, "give the segment output folder OUT")
    _require("--html", cfg.html, "--html FILE is required")


ReportConfig = compose("ReportConfig", ("output", "html", "sample", "png", "seed"), STORAGE, positional=("output",),
                       check=_check_report, doc="`rayseg report`: the segment output (OUT) and what to show of it.")

def _check_synth(cfg) -> None:
    if cfg.num_classes is not None and not 2 <= cfg.num_classes <= 255:
        raise UserError("--num-classes must be between 2 and 255")


SynthConfig = compose("SynthConfig", ("out", "layout", "labelled", "count", "seed", "num_classes", "min_size", "max_size", "shards",
                                      "generator", "image_format", "metadata"), STORAGE,
                      defaults={"layout": "h5", "count": 100, "num_classes": None}, positional=("out",), check=_check_synth,
                      doc="`rayseg synth`: what archive to write; checked further by synth.check_options.")

def _check_export(cfg) -> None:
    _require("CHECKPOINT", cfg.checkpoint, "give the rayseg CHECKPOINT folder to export")
    _require("--output", cfg.output, "--output FILE is required")


ExportConfig = compose("ExportConfig", ("checkpoint", "to", "output", "with_mask", "intensity"), STORAGE, positional=("checkpoint",),
                       check=_check_export, doc="`rayseg export`: a checkpoint as ONNX or torch.export, its pre- and post-processing inside.")

DoctorConfig = compose("DoctorConfig", ("gpu", "json", "workdir"), doc="`rayseg doctor`: what to check and where to write it.")

COMMAND_CONFIGS = {"synth": SynthConfig, "segment": SegmentConfig, "nightly": NightlyConfig, "evaluate": EvalConfig, "train": TrainConfig,
                   "plan": PlanConfig, "bench": BenchConfig, "demo": DemoConfig, "report": ReportConfig, "doctor": DoctorConfig, "export": ExportConfig}


def public_config(cfg) -> dict:
    """A config as a dict that is safe to log, write or hand to workers: credentials in storage options redacted."""
    from rayseg.storage import redact

    d = asdict(cfg)
    if "storage_options" in d:
        d["storage_options"] = redact(cfg.storage_options)
    return d
