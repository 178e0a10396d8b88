"""Bring your own model: the adapter protocol and the sources `--model` names beside rayseg's own.

What the predictor needs from any model is a *runner*, a callable from a normalised float NCHW batch on the
device to N x K x H' x W' logits, and a *card* (rayseg.models.ModelCard: classes and their names, input channels,
normalisation, input size, size divisor). The predictor does the rest: padding to the size divisor and upsampling
logits when H' != H (rayseg.predict.fit_logits), tiling, TTA, argmax, statistics, out-of-memory halving.

    --model FILE.onnx                    ONNX Runtime, one session per actor        pip install 'rayseg[onnx]'
    --model smp:ARCH[:ENCODER]           segmentation_models_pytorch, --weights     pip install 'rayseg[smp]'
    --model smp:FOLDER                   a folder smp's save_pretrained wrote
    --model hf:FOLDER                    transformers AutoModelForSemanticSegmentation  pip install 'rayseg[hf]'
    --model FILE.pt2                     torch.export; it unpickles: needs --trust-model-code
    --model python:MODULE:FACTORY        FACTORY() builds the model, --weights FILE; imports code: --trust-model-code

Files and folders are any fsspec URL. What a file does not record, flags give: --num-classes, --class-names,
--in-channels, --intensity, --mean/--std, --input-size. The driver loads the model once and runs one probe batch
(`probe`) before any actor starts, so a wrong class count, channel count or output shape is one sentence.
Every output row names the model by a digest over its files and card, so nightly reprocesses when either changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from rayseg.errors import UserError
from rayseg.models import DEFAULT_INPUT_SIZE, ModelCard, default_mean_std, load_bundle

KINDS = ("onnx", "pt2", "hf", "smp", "python")
TRUSTED = ("pt2", "python")  # the sources that run code when loaded
EXTRAS = {"onnx": ("onnxruntime", "onnx"), "smp": ("segmentation_models_pytorch", "smp"), "hf": ("transformers", "hf")}
PROBE_SIDE = 64  # the probe batch's side (rounded up to the size divisor): enough to see a model's output stride


def source_kind(name: str) -> tuple[str, str] | None:
    """(kind, target) for a model of one's own, None for rayseg's built-in architectures."""
    head, sep, rest = name.partition(":")
    if sep and head in ("hf", "smp", "python"):
        return head, rest
    low = name.lower().split("?")[0]
    for ext in ("onnx", "pt2"):
        if low.endswith("." + ext):
            return ext, name
    return None


def check_name(flag: str, value: str) -> None:
    from rayseg.config import MODEL_NAMES

    if value in MODEL_NAMES or source_kind(value):
        return
    raise UserError(f"{flag} {value!r}: choose one of {', '.join(MODEL_NAMES)}, or a model of your own: FILE.onnx, FILE.pt2, "
                    "hf:FOLDER, smp:ARCH[:ENCODER] or python:MODULE:FACTORY")


def needs(module: str, kind: str):
    """Import an optional dependency, or one sentence naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{kind} models need {module.split('.')[0]}: pip install 'rayseg[{EXTRAS[kind][1]}]'") from None


@dataclass(frozen=True)
class SourceBundle:
    """A model of one's own, as the driver loaded it: what every actor rebuilds its runner from (bytes, no paths)."""

    card: ModelCard
    kind: str
    target: str  # the --model text after the kind: arch:encoder, module:factory, the file's URL
    files: tuple[tuple[str, bytes], ...]  # what the runner loads, by name
    digest: str
    in_graph: bool = False  # an exported file with the normalisation inside: raw pixels in

    @property
    def label(self) -> str:
        return f"{self.card.architecture}@{self.digest[:16]}"

    def file(self, name: str) -> bytes | None:
        return dict(self.files).get(name)

    def runner(self, device: torch.device, compile: bool = False, threads: int | None = None):
        if self.kind == "onnx":
            from rayseg.adapters_onnx import OnnxRunner

            return OnnxRunner(self, device, threads)
        from rayseg.adapters_torch import build
        from rayseg.models import fold_batch_norm

        model = build(self)  # adapters_torch.Logits around the model: batch norm folded inside, where fx can trace
        model.model = fold_batch_norm(model.model)
        model = model.to(device, memory_format=torch.channels_last)
        return torch.compile(model) if compile else model


def digest_of(files, card: ModelCard, target: str) -> str:
    h = hashlib.sha256(target.encode())
    for name, data in sorted(files):
        h.update(name.encode() + hashlib.sha256(data).digest())
    h.update(json.dumps(card.to_json(), sort_keys=True).encode())
    return h.hexdigest()


def make_card(cfg, architecture: str, recorded: dict | None = None) -> ModelCard:
    """The card: what the file records, then the flags for what it does not (channels, names, normalisation and
    input size given as flags win; --num-classes only where the file records no class count)."""
    from rayseg.intensity import parse

    d = {k: v for k, v in (recorded or {}).items() if k in ModelCard.__dataclass_fields__}
    d["architecture"] = architecture
    d.setdefault("num_classes", cfg.num_classes)
    if cfg.in_channels:
        d["in_channels"] = cfg.in_channels
    c = int(d.setdefault("in_channels", 3))
    if cfg.class_names:
        d["class_names"] = cfg.class_names
    for k, default in zip(("mean", "std"), default_mean_std(c)):
        d[k] = getattr(cfg, k) or d.get(k) or default
    for k in ("mean", "std"):
        if len(d[k]) != c:
            raise UserError(f"--{k} gives {len(d[k])} value(s) for a model of {c} input channel(s)")
    if cfg.input_size:
        d["input_size"] = cfg.input_size
    d.setdefault("input_size", DEFAULT_INPUT_SIZE)
    if getattr(cfg, "intensity", ""):
        if d.get("intensity") and d["intensity"].get("mode") == "dataset":
            d.pop("intensity")  # a measured record: let resolve() apply the override against it, with its warning
        else:
            d["intensity"] = parse(cfg.intensity).to_json()
    d.setdefault("intensity", {"mode": "auto", "spec": "auto"})
    card = ModelCard.from_json(d)
    if card.class_names and len(card.class_names) != card.num_classes:
        raise UserError(f"{len(card.class_names)} class names for {card.num_classes} classes; give --class-names for each class, background first")
    return card


def load_model(cfg, storage_options: dict | None = None):
    """The model a command runs, loaded once in the driver: a rayseg checkpoint, a built-in architecture, or a model
    of one's own (a SourceBundle, probed with one batch). Fails with one sentence before any actor starts."""
    source = None if cfg.checkpoint else source_kind(cfg.model)
    if source is None:
        return load_bundle(cfg.checkpoint, cfg.model, cfg.num_classes, cfg.weights, cfg.input_size, storage_options)
    kind, target = source
    if kind in TRUSTED and not cfg.trust_model_code:
        what = "a .pt2 file is unpickled when loaded" if kind == "pt2" else "a python: entry point imports and runs its module"
        raise UserError(f"refusing --model {cfg.model}: {what}, which can run any code; pass --trust-model-code if you trust it")
    if kind == "onnx":
        from rayseg.adapters_onnx import load
    else:
        from rayseg.adapters_torch import load
    bundle = load(kind, target, cfg, storage_options or {})
    if bundle.in_graph and getattr(cfg, "intensity", ""):
        raise UserError(f"{cfg.model} has its intensity normalisation inside the exported graph; --intensity cannot change it")
    probe(bundle)
    return bundle


def probe(bundle) -> None:
    """One batch of two zero images through the model on the CPU, in the driver: the logits must be N x K x H' x W',
    K the card's class count, H and W whole multiples of H' and W'. One sentence otherwise."""
    card = bundle.card
    d = max(1, card.size_divisor)
    side = -(-min(card.input_size, PROBE_SIDE) // d) * d
    c, k = card.in_channels, card.num_classes
    shape = f"2x{c}x{side}x{side}"
    try:
        run = bundle.runner(torch.device("cpu"), threads=1)
        with torch.inference_mode():
            out = run(torch.zeros(2, c, side, side))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any framework's error for a wrong input: reported as one sentence
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"the model {bundle.label} fails on a probe batch of {shape} (its card says {c} input channel(s); "
                        f"--in-channels sets it): {first}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"the model {bundle.label} gives {got} for a {shape} batch; rayseg needs logits shaped N x classes x H x W")
    if out.shape[1] != k:
        raise UserError(f"the model {bundle.label} outputs {out.shape[1]} classes but its card says {k}; "
                        f"give --num-classes {out.shape[1]} (and --class-names to match)")
    h, w = out.shape[-2:]
    if side % h or side % w or side // h != side // w:
        raise UserError(f"the model {bundle.label} gives {h}x{w} logits for a {side}x{side} input; rayseg needs the "
                        "input size or a whole fraction of it")
