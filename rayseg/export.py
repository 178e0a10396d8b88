"""`rayseg export`: a rayseg checkpoint as one ONNX or torch.export file, its pre- and post-processing inside.

    rayseg export runs/shapes/best --to onnx --output shapes.onnx              # pip install 'rayseg[onnx]'
    rayseg export runs/shapes/best --to pt2 --output shapes.pt2 --with-mask
    rayseg segment photos/ --model shapes.onnx --output out/

The graph takes raw pixel values, float NCHW with dynamic batch, height and width, and holds what segment does
to them: the card's intensity normalisation (percentile windows computed per image and channel in the graph), the
standardisation, the model, upsampling to the input size; with --with-mask also the
argmax and the top probability, as outputs beside the logits. The card is written inside the file (ONNX
metadata_props, .pt2 extra files). Export then checks itself against torch on two shapes (logits within 1e-3
relative, masks at least 99.9% equal) and writes what it compared to FILE.check.json.

ONNX goes through torch.onnx.export's dynamo exporter (torch.export, then onnxscript): the TorchScript exporter is
deprecated in torch 2.14. Both specialise shape-dependent branches, such as the UNet padding odd sizes inside its
forward, and torch.export cannot prove a symbolic reflect padding valid; so the graph takes sides that are
multiples of the model's (its card's size_divisor) and `rayseg segment` pads to them before it, as for any model.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayseg.cliutil import add_command, print_summary
from rayseg.config import ExportConfig
from rayseg.errors import UserError
from rayseg.intensity import Intensity, resolve

CHECK_SHAPES = ((2, 64, 64), (1, 48, 80))  # (batch, height, width): square, and not
MIN_SIDE = 16
CARD_FILE = "rayseg.card.json"  # the .pt2 extra file holding the card, beside the graph record
GRAPH_FILE = "rayseg.graph.json"


def percentiles(x: torch.Tensor, low: float, high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel of x (NCHW), the low-th and high-th percentiles by numpy's linear rule, in the graph."""
    flat = x.flatten(2).sort(dim=-1).values
    last = torch.full((), flat.shape[-1] - 1, dtype=torch.float32)
    out = []
    for q in (low, high):
        pos = last * (q / 100)
        i0 = pos.floor()
        i1 = torch.minimum(i0 + 1, last)
        a, b = flat.index_select(-1, i0.long().reshape(1)), flat.index_select(-1, i1.long().reshape(1))
        out.append((a + (b - a) * (pos - i0))[..., None])
    return out[0], out[1]


class Exported(nn.Module):
    """Raw pixel values (float NCHW) -> logits at the input size [, mask (uint8), top probability]: what segment does."""

    def __init__(self, model: nn.Module, card, norm: Intensity, multiple: int, upsample: bool, with_mask: bool):
        super().__init__()
        self.model, self.norm, self.multiple, self.upsample, self.with_mask = model, norm, multiple, upsample, with_mask
        c = card.in_channels
        self.register_buffer("mean", torch.tensor(card.mean[:c], dtype=torch.float32).view(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(card.std[:c], dtype=torch.float32).view(1, -1, 1, 1) * 255)
        if norm.mode == "dataset":
            lo, hi = zip(*norm.window)
            for name, v in (("lo", lo), ("hi", hi), ("mu", norm.mean), ("sd", [s if s > 0 else 1 for s in norm.std])):
                self.register_buffer(name, torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1))

    def scaled(self, x: torch.Tensor) -> torch.Tensor:
        """The card's intensity normalisation onto the 8-bit scale (rayseg.intensity.normalise, in the graph)."""
        mode = self.norm.mode
        if mode in ("percentile", "fixed"):
            if mode == "percentile":
                lo, hi = percentiles(x, self.norm.low, self.norm.high)
            else:
                lo, hi = torch.tensor(self.norm.low), torch.tensor(self.norm.high)
            span = hi - lo
            scale = torch.where(span > 0, 255 / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(span))
            return ((x - lo) * scale).clamp(0, 255)
        if mode == "dataset":  # folded as rayseg.intensity does: the standardisation below then gives (clip(x) - mu) / sd
            return ((torch.maximum(torch.minimum(x, self.hi), self.lo) - self.mu) / self.sd * (self.std / 255) + self.mean / 255) * 255
        if mode == "nonzero":  # per image and channel, z-scored over its non-zero pixels; zeros stay zero
            nz = (x != 0).to(x.dtype)
            n = nz.sum((-2, -1), keepdim=True).clamp_min(1)
            mu = (x * nz).sum((-2, -1), keepdim=True) / n
            sd = ((x - mu).square() * nz).sum((-2, -1), keepdim=True).div(n).sqrt()
            z = (x - mu) / torch.where(sd > 0, sd, torch.ones_like(sd)) * nz
            return (z * (self.std / 255) + self.mean / 255) * 255
        return x  # 8-bit pixels (auto, none, legacy): already on the scale

    def forward(self, x: torch.Tensor):
        h, w = x.shape[-2:]
        y = (self.scaled(x) - self.mean) / self.std
        out = self.model(y)
        if self.upsample:
            out = F.interpolate(out, size=y.shape[-2:], mode="bilinear", align_corners=False)
        out = out[..., :h, :w]
        if not self.with_mask:
            return out
        top, mask = out.max(dim=1)
        prob = torch.exp(out - top.unsqueeze(1)).sum(dim=1).reciprocal()
        return out, mask.to(torch.uint8), prob


def wrap(bundle, override: str, with_mask: bool) -> tuple[Exported, dict]:
    """The checkpoint's model inside its processing, and the graph record the file carries."""
    from rayseg.models import fold_batch_norm

    card = bundle.card
    norm = resolve(card.intensity, override)
    model = fold_batch_norm(bundle.build())
    multiple = getattr(model, "multiple", 1)
    if hasattr(model, "multiple"):
        model.multiple = 1  # its inputs are multiples already (the graph's dynamic sides), so no shape branch is traced
    with torch.no_grad():
        out = model(torch.zeros(1, card.in_channels, 64, 64))
    exported = Exported(model, card, norm, multiple, out.shape[-2:] != (64, 64), with_mask).eval()
    eight_bit = norm.mode in ("auto", "none", "legacy")
    graph = {"input": "pixels", "layout": "NCHW float32", "dtypes": ["uint8"] if eight_bit else [],
             "normalisation": norm.spec() if not eight_bit else "8-bit pixels as they are (0..255)",
             "outputs": ["logits", "mask", "probability"] if with_mask else ["logits"]}
    return exported, graph


def _dynamic(multiple: int):
    """Batch, height and width dynamic; sides multiples of the model's (the card's size_divisor: segment pads to it)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    if multiple == 1:
        return ({0: batch, 2: torch.export.Dim("height", min=MIN_SIDE), 3: torch.export.Dim("width", min=MIN_SIDE)},)
    h, w = torch.export.Dim("h", min=MIN_SIDE // multiple or 1), torch.export.Dim("w", min=MIN_SIDE // multiple or 1)
    return ({0: batch, 2: multiple * h, 3: multiple * w},)


def _export_program(exported: Exported, c: int):
    x = torch.rand(2, c, 64, 64) * 255
    try:
        return torch.export.export(exported, (x,), dynamic_shapes=_dynamic(exported.multiple), strict=False)
    except Exception as e:  # noqa: BLE001 - torch.export names the operator or guard it could not capture
        raise UserError(f"torch.export cannot capture this model: {str(e).strip().splitlines()[0][:300]}") from None


def to_onnx(exported: Exported, card_json: dict, graph: dict) -> bytes:
    from rayseg.adapters import needs

    import logging

    needs("onnxscript", "onnx")
    needs("onnx", "onnx")
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one INFO line per folded constant
    program = _export_program(exported, card_json["in_channels"])
    names = graph["outputs"]
    try:
        onnx_program = torch.onnx.export(program, dynamo=True, input_names=["pixels"], output_names=names, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter names the operator it has no translation for
        raise UserError(f"torch.onnx.export cannot translate this model: {str(e).strip().splitlines()[0][:300]}") from None
    proto = onnx_program.model_proto
    for key, value in (("rayseg.card", card_json), ("rayseg.graph", graph)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    return proto.SerializeToString()


def to_pt2(exported: Exported, card_json: dict, graph: dict) -> bytes:
    program = _export_program(exported, card_json["in_channels"])
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={CARD_FILE: json.dumps(card_json, sort_keys=True), GRAPH_FILE: json.dumps(graph, sort_keys=True)})
    return buf.getvalue()


def _runner(fmt: str, data: bytes):
    if fmt == "onnx":
        import onnxruntime as ort

        from rayseg.adapters_onnx import session_options

        session = ort.InferenceSession(data, session_options(2), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {"pixels": x.numpy()})[0]
    module = torch.export.load(io.BytesIO(data)).module()

    def run(x):
        with torch.no_grad():
            out = module(x)
        return (out[0] if isinstance(out, tuple) else out).numpy()

    return run


def self_check(exported: Exported, fmt: str, data: bytes, c: int, eight_bit: bool) -> list[dict]:
    """The file against torch on CHECK_SHAPES: logits within 1e-3 relative, masks at least 99.9% equal."""
    run = _runner(fmt, data)
    rng = np.random.default_rng(0)
    report = []
    for n, h, w in CHECK_SHAPES:
        x = torch.from_numpy(rng.integers(0, 256 if eight_bit else 4096, (n, c, h, w)).astype(np.float32))
        with torch.no_grad():
            want = exported(x)
            want = (want[0] if isinstance(want, tuple) else want).numpy()
        got = run(x)
        rel = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        report.append({"shape": [n, c, h, w], "pixels": "uint8 range" if eight_bit else "0..4095", "logits_max_rel_diff": rel,
                       "mask_agreement": agree, "ok": rel <= 1e-3 and agree >= 0.999})
    return report


def export(cfg: ExportConfig) -> dict:
    from rayseg.models import load_bundle
    from rayseg.storage import filesystem

    bundle = load_bundle(cfg.checkpoint, storage_options=cfg.storage_options)
    exported, graph = wrap(bundle, cfg.intensity, cfg.with_mask)
    card_json = {**bundle.card.to_json(), "intensity": exported.norm.to_json(), "size_divisor": exported.multiple,
                 "exported_from": bundle.label}
    data = (to_onnx if cfg.to == "onnx" else to_pt2)(exported, card_json, graph)
    checks = self_check(exported, cfg.to, data, bundle.card.in_channels, bool(graph["dtypes"]))
    summary = {"command": "export", "output": cfg.output, "format": cfg.to, "model": bundle.label, "bytes": len(data),
               "graph": graph, "checks": checks}
    if not all(c["ok"] for c in checks):
        raise UserError(f"the exported {cfg.to} file does not match torch (checks: {json.dumps(checks)}); nothing written")
    fs, path = filesystem(cfg.output, cfg.storage_options)
    fs.pipe_file(path, data)
    fs.pipe_file(path + ".check.json", json.dumps(summary, indent=2).encode())
    return summary


def register(sub) -> None:
    add_command(sub, "export", ExportConfig, lambda cfg: print_summary(export(cfg)),
                help="export a checkpoint as ONNX or torch.export, with its pre- and post-processing inside",
                description=__doc__.split("\n\n")[0])
