"""Model registry (torchvision segmentation models + a small UNet) and the rayseg checkpoint format.

A checkpoint is a directory: `model.pt` (a plain state_dict, loaded with `torch.load(weights_only=True)`, so
loading it cannot run code) and `model.json` (the model card). Its digest is sha256 over both files. The card
says what the model takes: `in_channels` (1, 3 or N) and `intensity`, how pixel values were normalised in
training (rayseg.intensity); a card without them (older checkpoints) means 3 channels and the 8-bit conversion
of earlier versions.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from rayseg.errors import UserError
from rayseg.storage import filesystem, join

WEIGHTS_FILE, CARD_FILE = "model.pt", "model.json"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GREY_MEAN, GREY_STD = 0.449, 0.226  # ImageNet's over its three channels: the standardisation of any non-RGB channel
TORCHVISION = ("fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large")
DEFAULT_INPUT_SIZE = 256


class _Block(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """The classic encoder-decoder with skip connections (Ronneberger et al. 2015), sized by `width` and `depth`.

    Small by default (width 16, depth 3: ~0.5M parameters) because binary and medical tasks rarely need more,
    and it trains in minutes on a CPU. Any input side works: odd sizes are padded to a multiple of 2**depth.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, depth: int = 3):
        super().__init__()
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_Block(in_channels, chans[0])] + [_Block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))])
        self.merge = nn.ModuleList([_Block(chans[i] * 2, chans[i]) for i in reversed(range(depth))])
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        self.multiple = 2**depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)[..., :h, :w]


class OutOnly(nn.Module):
    """torchvision segmentation models return {"out": ..., "aux": ...}; the pipeline wants the tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def pointwise(num_classes: int, in_channels: int = 3, hidden: int = 16) -> nn.Module:
    """A per-pixel classifier (1x1 convolutions only): a colour-to-class baseline that trains in seconds. Its output at
    a pixel depends on that pixel alone, so tiled and whole-image inference of it must agree (tests rely on that)."""
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv2d(hidden, num_classes, 1))


def build_model(architecture: str, num_classes: int, weights: str | None = None, in_channels: int = 3) -> nn.Module:
    if architecture in ("unet", "pointwise"):
        if weights:
            raise UserError(f"the {architecture} model has no pretrained weights; leave out --weights or pass --checkpoint")
        return UNet(num_classes, in_channels) if architecture == "unet" else pointwise(num_classes, in_channels)
    if architecture not in TORCHVISION:
        raise UserError(f"unknown model {architecture!r}; choose one of unet, pointwise, {', '.join(TORCHVISION)}")
    import torchvision.models.segmentation as seg

    builder = getattr(seg, architecture)
    kwargs: dict = {"weights_backbone": None, "num_classes": num_classes}
    if "aux_loss" in builder.__code__.co_varnames and architecture != "lraspp_mobilenet_v3_large":
        kwargs["aux_loss"] = False
    if weights:
        kwargs = {"weights": weights}
        try:
            model = builder(**kwargs)
        except Exception as e:  # noqa: BLE001 - offline, torchvision raises a URLError deep in its download code
            raise UserError(f"could not load torchvision weights {weights!r} for {architecture} (no model hub reachable?): {str(e).splitlines()[0]}") from None
        _replace_head(model, num_classes)
    else:
        model = builder(**kwargs)
    if in_channels != 3:
        _set_in_channels(model, in_channels)
    return OutOnly(model)


def _set_in_channels(model: nn.Module, channels: int) -> None:
    """Replace the backbone's first convolution (3 input channels) by one taking `channels`. Its RGB filters are
    kept: a grey model gets their sum (a grey image repeated to RGB gives the same response), extra channels the
    mean of the three, so pretrained weights stay a sensible start."""
    name, conv = next((n, m) for n, m in model.backbone.named_modules() if isinstance(m, nn.Conv2d))
    wide = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups,
                     conv.bias is not None)
    with torch.no_grad():
        w = conv.weight
        if channels == 1:
            wide.weight.copy_(w.sum(1, keepdim=True))
        else:
            wide.weight.copy_(torch.cat([w[:, : min(3, channels)], w.mean(1, keepdim=True).expand(-1, max(0, channels - 3), -1, -1)], 1))
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    parent, _, child = name.rpartition(".")
    setattr(model.backbone.get_submodule(parent) if parent else model.backbone, child, wide)


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Pretrained heads predict 21 VOC classes; swap the last classifier conv for one with num_classes outputs."""
    for name in ("classifier", "aux_classifier"):
        head = getattr(model, name, None)
        if head is None:
            continue
        convs = [(n, m) for n, m in head.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == 21]
        for n, m in convs:
            parent = head.get_submodule(n.rpartition(".")[0]) if "." in n else head
            setattr(parent, n.rpartition(".")[2], nn.Conv2d(m.in_channels, num_classes, m.kernel_size))


def default_mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The card's mean and std (0..1 units) for a model of `channels` inputs: ImageNet's for RGB."""
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (GREY_MEAN,) * channels, (GREY_STD,) * channels


@dataclass(frozen=True)
class ModelCard:
    architecture: str
    num_classes: int
    class_names: tuple[str, ...] = ()
    input_size: int = DEFAULT_INPUT_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    trained_on: tuple[str, ...] = ()
    metrics: dict = field(default_factory=dict)
    rayseg_version: str = ""
    in_channels: int = 3
    intensity: dict | None = None  # rayseg.intensity's record; None: a card from before it was kept (16-bit / 257)
    size_divisor: int = 1  # the predictor pads each input to a multiple of this (a model's total stride)
    input_dtypes: tuple[str, ...] = ()  # only these image dtypes (an exported graph for 8-bit pixels); () = any
    geometry: str = ""  # native or resize (rayseg.plan); "" = a card from before it was kept: resize up to 2x the input
    plan: dict | None = None  # the training plan, its reasons and the fingerprint it was made from (rayseg.plan)

    def pixel_mean_std(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalisation in 0..255 units, shaped (1, C, 1, 1): (x - mean) / std of a uint8 image as float."""
        mean = torch.tensor(self.mean, device=device).view(1, -1, 1, 1) * 255
        std = torch.tensor(self.std, device=device).view(1, -1, 1, 1) * 255
        return mean, std

    def normalisation(self) -> str:
        """The intensity normalisation as --intensity text ("legacy": none recorded)."""
        from rayseg.intensity import Intensity

        return Intensity.from_json(self.intensity).spec()

    def names(self) -> list[str]:
        return list(self.class_names) if self.class_names else [f"class_{i}" for i in range(self.num_classes)]

    def to_json(self) -> dict:
        d = {**self.__dict__, "class_names": self.names(), "mean": list(self.mean), "std": list(self.std), "trained_on": list(self.trained_on)}
        for k, default in (("size_divisor", 1), ("input_dtypes", ()), ("geometry", ""), ("plan", None)):  # written only when set: old cards' bytes (and digests) stay
            if d[k] == default:
                del d[k]
            elif k == "input_dtypes":
                d[k] = list(d[k])
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ModelCard":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("class_names", "mean", "std", "trained_on", "input_dtypes"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


@dataclass(frozen=True)
class ModelBundle:
    """What an actor needs to rebuild the model: the card, the weights bytes (None: seeded random init) and a name."""

    card: ModelCard
    weights: bytes | None
    digest: str  # sha256 of the checkpoint files; "random" or the torchvision weights name otherwise
    pretrained: str | None = None

    @property
    def label(self) -> str:
        return f"{self.card.architecture}@{self.digest[:16] if self.weights else self.digest}"

    def runner(self, device: torch.device, compile: bool = False, threads: int | None = None):
        """The adapter protocol (rayseg.adapters): a callable, normalised float NCHW on `device` -> logits NKH'W'."""
        return for_inference(self.build(), device, compile)

    def build(self) -> nn.Module:
        torch.manual_seed(0)  # every actor builds the same random model, so masks don't depend on which actor ran
        model = build_model(self.card.architecture, self.card.num_classes, self.pretrained, self.card.in_channels)
        if self.weights is not None:
            state = torch.load(io.BytesIO(self.weights), map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        return model.eval()


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """An eval-mode model with every BatchNorm that follows a convolution folded into that convolution's weights.

    The same function, computed with one op less per layer: on CPU a fifth less time for lraspp_mobilenet_v3_large
    (docs/PERFORMANCE.md), outputs equal to float rounding. torch.fx finds conv->bn pairs anywhere (ResNet keeps
    them as attributes); a model fx cannot trace (the UNet pads by input size) gets its pairs folded where they
    sit next to each other in an nn.Sequential. The original model is left untouched.
    """
    import copy

    from torch.fx.experimental.optimization import fuse
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = model.eval()
    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - fx raises several types for untraceable control flow
        pass
    model = copy.deepcopy(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if type(conv) is nn.Conv2d and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                seq[i], seq[i + 1] = fuse_conv_bn_eval(conv, bn), nn.Identity()
    return model


def for_inference(model: nn.Module, device: torch.device, compile: bool = False) -> nn.Module:
    """The model as rayseg runs it: batch norm folded, channels_last on the device, optionally torch.compile'd.
    The predictor and every row of `rayseg bench` use this, so bench's ratios compare like with like."""
    model = fold_batch_norm(model).to(device, memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


def state_dict_bytes(model: nn.Module) -> bytes:
    """The model's state_dict on the CPU, contiguous (a channels_last model saves the same bytes), as `model.pt` holds it."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return buf.getvalue()


def save_checkpoint(model: nn.Module, card: ModelCard, url: str, storage_options: dict | None = None) -> str:
    """Write model.pt and model.json under `url`; returns the digest."""
    from rayseg import __version__

    weights = state_dict_bytes(getattr(model, "module", model))  # unwrap DDP
    card_bytes = json.dumps({**card.to_json(), "rayseg_version": __version__}, indent=2, sort_keys=True).encode()
    fs, path = filesystem(url, storage_options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(join(path, WEIGHTS_FILE), weights)
    fs.pipe_file(join(path, CARD_FILE), card_bytes)
    return checkpoint_digest(weights, card_bytes)


def checkpoint_digest(weights: bytes, card_bytes: bytes) -> str:
    h = hashlib.sha256()
    for part in (weights, card_bytes):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


def load_bundle(checkpoint: str | None = None, architecture: str = "lraspp_mobilenet_v3_large", num_classes: int = 2,
                weights: str | None = None, input_size: int | None = None, storage_options: dict | None = None) -> ModelBundle:
    """Read a checkpoint (any fsspec URL) or describe a fresh model. Fails early with one sentence if unusable."""
    if checkpoint:
        fs, path = filesystem(checkpoint, storage_options)
        try:
            card_bytes = fs.cat_file(join(path, CARD_FILE))
            weight_bytes = fs.cat_file(join(path, WEIGHTS_FILE))
        except FileNotFoundError:
            raise UserError(f"{checkpoint} is not a rayseg checkpoint (needs {WEIGHTS_FILE} and {CARD_FILE})") from None
        try:
            card = ModelCard.from_json(json.loads(card_bytes))
        except (ValueError, TypeError) as e:
            raise UserError(f"the model card {join(checkpoint, CARD_FILE)} is invalid: {e}") from None
        if input_size:
            card = ModelCard.from_json({**card.to_json(), "input_size": input_size})
        bundle = ModelBundle(card, weight_bytes, checkpoint_digest(weight_bytes, card_bytes))
        try:
            bundle.build()
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - weights_only refuses pickled code; shapes may not match the card
            raise UserError(f"cannot load the weights in {checkpoint}: {str(e).splitlines()[0]}") from None
        return bundle
    card = ModelCard(architecture, num_classes, input_size=input_size or DEFAULT_INPUT_SIZE, intensity={"mode": "auto", "spec": "auto"})
    bundle = ModelBundle(card, None, f"pretrained-{weights}" if weights else "random-seed0", pretrained=weights)
    bundle.build()  # fail here, in the driver, rather than in every actor
    return bundle
