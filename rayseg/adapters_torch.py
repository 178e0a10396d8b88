"""torch models of one's own behind the adapter protocol (rayseg.adapters): smp, Hugging Face, torch.export, entry points.

    rayseg segment in/ -o out/ --model smp:unet:resnet18 --weights unet.safetensors --num-classes 3   # 'rayseg[smp]'
    rayseg segment in/ -o out/ --model smp:models/unet/          # a folder smp's save_pretrained wrote
    rayseg segment in/ -o out/ --model hf:models/segformer/      # 'rayseg[hf]': config.json, model.safetensors
    rayseg segment in/ -o out/ --model seg.pt2 --trust-model-code
    rayseg segment in/ -o out/ --model python:mynets.unet:build --weights unet.safetensors --num-classes 3 --trust-model-code

Weights are safetensors or a state dict read with `torch.load(weights_only=True)`; pickled code is never loaded (a
.pt2 unpickles its graph, which is why it needs --trust-model-code). Nothing is downloaded: smp models are built
with encoder_weights=None, Hugging Face ones with local_files_only, use_safetensors and trust_remote_code=False.
Every actor rebuilds the model from the bytes the driver read, then runs it as rayseg runs its own (batch norm
folded, channels_last, rayseg.models.for_inference).
"""

from __future__ import annotations

import importlib
import io
import json
import posixpath

import torch
from torch import nn

from rayseg.adapters import SourceBundle, digest_of, make_card, needs
from rayseg.errors import UserError
from rayseg.storage import filesystem, join

SMP_STRIDE = 32  # smp's encoders downsample 5 times
HF_DIVISOR = 32  # SegFormer, UperNet, BEiT... downsample up to 32 times
WEIGHTS = "weights"


class Logits(nn.Module):
    """Whatever a model returns -> its logits tensor: a tensor, {"out": ...} (torchvision), `.logits` (transformers)
    or the first element of a tuple."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        if isinstance(out, dict):
            out = out.get("out", out.get("logits"))
        elif hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        return out


class Program(nn.Module):
    """A torch.export program's module, held where train()/eval() do not reach it (it refuses them: it was exported in
    eval form); .to() still moves its parameters."""

    def __init__(self, module):
        super().__init__()
        self.__dict__["program"] = module  # not a registered child

    def forward(self, x: torch.Tensor):
        return self.program(x)

    def _apply(self, fn, recurse=True):
        self.program._apply(fn)
        return self


def _read(url: str, storage_options: dict, what: str) -> bytes:
    fs, path = filesystem(url, storage_options)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError):
        raise UserError(f"the {what} {url} does not exist") from None


def state_dict(data: bytes, name: str) -> dict:
    """Weights from safetensors bytes, or a state dict that torch.load(weights_only=True) reads (never pickled code)."""
    if name.endswith(".safetensors") or data[8:9] == b"{":
        from safetensors.torch import load

        return load(data)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only refuses pickled code with its own error types
        raise UserError(f"cannot read the weights {name} as a state dict without running code: {str(e).splitlines()[0][:200]}") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"the weights {name} hold a {type(state).__name__}, not a state dict")
    return state


def _load_weights(model: nn.Module, bundle: SourceBundle) -> nn.Module:
    data = bundle.file(WEIGHTS)
    if data is not None:
        try:
            model.load_state_dict(state_dict(data, bundle.card.architecture))
        except RuntimeError as e:
            raise UserError(f"the weights do not fit {bundle.card.architecture}: {str(e).splitlines()[0][:300]}") from None
    return model


# ---- loading in the driver: files read, card made ----------------------------------------------------------


def load(kind: str, target: str, cfg, storage_options: dict) -> SourceBundle:
    return {"smp": _load_smp, "hf": _load_hf, "pt2": _load_pt2, "python": _load_python}[kind](target, cfg, storage_options)


def _weights(cfg, storage_options: dict) -> list[tuple[str, bytes]]:
    return [(WEIGHTS, _read(cfg.weights, storage_options, "weights file"))] if cfg.weights else []


def _folder_files(url: str, names: tuple[str, ...], storage_options: dict, required: tuple[str, ...]) -> list[tuple[str, bytes]]:
    fs, path = filesystem(url, storage_options)
    files = []
    for name in names:
        try:
            files.append((name, fs.cat_file(join(path, name))))
        except FileNotFoundError:
            if name in required:
                raise UserError(f"{url} has no {name}") from None
    return files


def _load_smp(target: str, cfg, so: dict) -> SourceBundle:
    needs("segmentation_models_pytorch", "smp")
    arch, _, encoder = target.partition(":")
    if "/" in target or target.startswith("."):  # a save_pretrained folder: config.json and model.safetensors
        files = _folder_files(target, ("config.json", "model.safetensors"), so, ("config.json", "model.safetensors"))
        config = json.loads(dict(files)["config.json"])
        recorded = {"num_classes": config.get("classes", 1), "in_channels": config.get("in_channels", 3), "size_divisor": SMP_STRIDE}
        card = make_card(cfg, f"smp:{config.get('_model_class', '?')}:{config.get('encoder_name', '?')}", recorded)
        return SourceBundle(card, "smp", target, tuple(files), digest_of(files, card, ""))
    files = _weights(cfg, so)
    card = make_card(cfg, f"smp:{arch}:{encoder or 'resnet34'}", {"size_divisor": SMP_STRIDE})
    return SourceBundle(card, "smp", target, tuple(files), digest_of(files, card, target))


def _load_hf(target: str, cfg, so: dict) -> SourceBundle:
    needs("transformers", "hf")
    files = _folder_files(target, ("config.json", "model.safetensors", "preprocessor_config.json"), so, ("config.json",))
    found = dict(files)
    config = json.loads(found["config.json"])
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise UserError(f"{target} asks for remote code (auto_map in config.json); rayseg runs only the architectures transformers ships")
    if "model.safetensors" not in found:
        raise UserError(f"{target} has no model.safetensors; rayseg does not load pickled weights (pytorch_model.bin): "
                        "save the model with save_pretrained(safe_serialization=True)")
    labels = config.get("id2label") or {}
    recorded: dict = {"size_divisor": HF_DIVISOR, "in_channels": config.get("num_channels", 3)}
    if labels:
        recorded["num_classes"] = len(labels)
        recorded["class_names"] = [labels[k] for k in sorted(labels, key=int)]
    pre = json.loads(found.get("preprocessor_config.json", b"{}"))
    if pre.get("do_normalize", True) and pre.get("image_mean"):
        recorded["mean"], recorded["std"] = pre["image_mean"], pre["image_std"]
    elif not pre.get("do_normalize", True):
        recorded["mean"], recorded["std"] = [0.0] * recorded["in_channels"], [1.0] * recorded["in_channels"]
    size = pre.get("size") or {}
    if isinstance(size, dict) and size.get("height"):
        recorded["input_size"] = max(size["height"], size.get("width", 0))
    card = make_card(cfg, f"hf:{config.get('model_type', '?')}", recorded)
    return SourceBundle(card, "hf", target, tuple(files), digest_of(files, card, ""))


def _load_pt2(target: str, cfg, so: dict) -> SourceBundle:
    from rayseg.export import CARD_FILE, GRAPH_FILE

    data = _read(target, so, "model file")
    extra = {CARD_FILE: "", GRAPH_FILE: ""}
    try:
        torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - a zip that is not a torch.export archive
        raise UserError(f"{target} is not a torch.export file: {str(e).splitlines()[0][:200]}") from None
    recorded = json.loads(extra[CARD_FILE] or "{}")
    graph = json.loads(extra[GRAPH_FILE] or "{}")
    in_graph = graph.get("input") == "pixels"
    if in_graph:
        c = int(recorded.get("in_channels", 3))
        recorded.update(intensity={"mode": "none", "spec": "none"}, mean=[0.0] * c, std=[1 / 255] * c, input_dtypes=graph.get("dtypes", []))
    files = [("model.pt2", data)]
    card = make_card(cfg, f"pt2:{posixpath.basename(target.rstrip('/'))}", recorded)
    return SourceBundle(card, "pt2", target, tuple(files), digest_of(files, card, ""), in_graph)


def _load_python(target: str, cfg, so: dict) -> SourceBundle:
    module, _, factory = target.rpartition(":")
    if not module or not factory:
        raise UserError(f"--model python:{target}: give python:MODULE:FACTORY, e.g. python:mynets.unet:build")
    files = _weights(cfg, so)
    card = make_card(cfg, f"python:{target}", {})
    bundle = SourceBundle(card, "python", target, tuple(files), digest_of(files, card, target))
    _factory(bundle)  # the import fails here, in the driver, with one sentence
    return bundle


# ---- building in each actor --------------------------------------------------------------------------------


def _factory(bundle: SourceBundle):
    module, _, name = bundle.target.rpartition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import {name} from {module}: {e}") from None


def build(bundle: SourceBundle) -> nn.Module:
    """The model as an nn.Module returning logits, in eval mode; random parts seeded so every actor builds the same."""
    torch.manual_seed(0)
    kind, card = bundle.kind, bundle.card
    if kind == "smp":
        import segmentation_models_pytorch as smp

        config = json.loads(bundle.file("config.json") or b"{}")
        if config:
            arch = config.pop("_model_class")
            kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
            model = smp.create_model(arch, **{**kwargs, "encoder_weights": None})
            model.load_state_dict(state_dict(bundle.file("model.safetensors"), "model.safetensors"))
        else:
            arch, _, encoder = bundle.target.partition(":")
            model = _load_weights(smp.create_model(arch, encoder_name=encoder or "resnet34", encoder_weights=None,
                                                   in_channels=card.in_channels, classes=card.num_classes), bundle)
    elif kind == "hf":
        model = _hf_model(bundle)
    elif kind == "pt2":
        model = Program(torch.export.load(io.BytesIO(bundle.file("model.pt2"))).module())
    else:
        model = _factory(bundle)()
        if not isinstance(model, nn.Module):
            raise UserError(f"{bundle.target} returned a {type(model).__name__}, not a torch.nn.Module")
        model = _load_weights(model, bundle)
    return Logits(model).eval()


def _hf_model(bundle: SourceBundle) -> nn.Module:
    import tempfile

    from transformers import AutoModelForSemanticSegmentation

    with tempfile.TemporaryDirectory(prefix="rayseg-hf-") as d:  # from_pretrained reads a local folder: this actor's copy
        for name, data in bundle.files:
            with open(f"{d}/{name}", "wb") as f:
                f.write(data)
        return AutoModelForSemanticSegmentation.from_pretrained(d, local_files_only=True, use_safetensors=True, trust_remote_code=False)
