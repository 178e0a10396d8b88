"""ONNX files behind the adapter protocol (rayseg.adapters): checked in the driver, one ONNX Runtime session per actor.

    rayseg segment photos/ --output out/ --model s3://bucket/models/seg.onnx --num-classes 3    # pip install 'rayseg[onnx]'

The card comes from the file's metadata (`rayseg export` writes `rayseg.card` and `rayseg.graph`; other files may set
metadata keys named like the card's fields, values as JSON), then flags. A session gets the actor's CPUs as intra-op
threads, one inter-op thread and no spinning (onnxruntime ignores cgroups and would otherwise start one thread per
core of the node in every actor, each spinning); on a GPU the CUDA provider with a memory limit.
"""

from __future__ import annotations

import json
import os
import posixpath

import numpy as np
import torch

from rayseg.adapters import SourceBundle, digest_of, make_card, needs
from rayseg.errors import EnvError, UserError
from rayseg.storage import filesystem

# operator domains onnxruntime implements itself; any other domain needs a custom-op library, which rayseg never loads
BUILTIN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "com.microsoft", "com.microsoft.nchwc",
                   "org.pytorch.aten"}
MODEL_FILE = "model.onnx"
GPU_MEMORY_FRACTION = 0.8  # of the memory free when the session starts: one actor per GPU, leaving room for torch's copies
CARD_KEY, GRAPH_KEY = "rayseg.card", "rayseg.graph"


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for g in [attr.g, *attr.graphs]:
                if g is not None and g.node:
                    yield from _nodes(g)


def _tensors(graph):
    yield from graph.initializer
    for node in _nodes(graph):
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def check_model(proto, url: str) -> list[str]:
    """Refuse custom-op domains and external data outside the file's folder; the external data's relative paths."""
    local = {f.domain for f in proto.functions}  # functions defined inside the file (the dynamo exporter writes some)
    used = {n.domain for n in _nodes(proto.graph)} | {n.domain for f in proto.functions for n in f.node}
    custom = sorted(used - local - BUILTIN_DOMAINS)
    if custom:
        raise UserError(f"{url} uses operators of the custom domain {custom[0]!r}, which need a custom-op library; rayseg does not load those")
    external = []
    for t in _tensors(proto.graph):
        if t.data_location != 1:  # TensorProto.EXTERNAL
            continue
        where = {e.key: e.value for e in t.external_data}.get("location", "")
        norm = posixpath.normpath(where.replace("\\", "/"))
        if not where or posixpath.isabs(norm) or norm.startswith("..") or ":" in norm.split("/")[0]:
            raise UserError(f"{url} keeps the weights of {t.name!r} in {where!r}, outside the model's own folder; refused")
        external.append(norm)
    return sorted(set(external))


def _recorded(proto) -> tuple[dict, dict]:
    """(card fields, graph record) from the file's metadata_props."""
    meta = {p.key: p.value for p in proto.metadata_props}
    card: dict = {}
    for k, v in meta.items():
        try:
            card[k] = json.loads(v)
        except ValueError:
            card[k] = v
    graph = card.pop(GRAPH_KEY, None) or {}
    card = {**card, **(card.pop(CARD_KEY, None) or {})}
    return card, graph


def load(kind: str, url: str, cfg, storage_options: dict) -> SourceBundle:
    needs("onnxruntime", "onnx")
    onnx = needs("onnx", "onnx")
    fs, path = filesystem(url, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise UserError(f"the model file {url} does not exist") from None
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise UserError(f"{url} is not an ONNX model: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    files = [(MODEL_FILE, data)]
    for rel in check_model(proto, url):
        try:
            files.append((rel, fs.cat_file(posixpath.join(posixpath.dirname(path), rel))))
        except FileNotFoundError:
            raise UserError(f"{url} keeps weights in {rel}, which is not beside it") from None
    recorded, graph = _recorded(proto)
    in_graph = graph.get("input") == "pixels"
    if in_graph:  # raw pixel values in: the predictor's standardisation is the identity
        c = int(recorded.get("in_channels", 3))
        recorded = {**recorded, "intensity": {"mode": "none", "spec": "none"}, "mean": [0.0] * c, "std": [1 / 255] * c,
                    "input_dtypes": graph.get("dtypes", [])}
    shape = [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if len(shape) == 4 and shape[2] and shape[3] and shape[2] == shape[3] and not cfg.input_size:
        recorded["input_size"] = shape[2]  # a fixed-size graph: the predictor resizes to it, and tiles at it
    if len(shape) == 4 and shape[1] and "in_channels" not in recorded and not cfg.in_channels:
        recorded["in_channels"] = shape[1]
    name = posixpath.basename(path)
    card = make_card(cfg, f"onnx:{name}", recorded)
    if len(shape) == 4 and shape[1] and shape[1] != card.in_channels:
        raise UserError(f"{url} takes {shape[1]} input channel(s), but the card says {card.in_channels} (--in-channels)")
    return SourceBundle(card, kind, url, tuple(files), digest_of(files, card, ""), in_graph)


def actor_cpus() -> int:
    """The CPUs Ray gave this actor (1 outside Ray, or where Ray gave none): onnxruntime's thread count."""
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    except Exception:  # noqa: BLE001 - the driver, or a Ray without a runtime context
        pass
    return 1


def session_options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: its warnings about unused initialisers are not the user's business
    return so


class OnnxRunner:
    """The runner of an ONNX model: torch NCHW float in, torch logits out, on the predictor's device."""

    def __init__(self, bundle: SourceBundle, device: torch.device, threads: int | None = None):
        import onnxruntime as ort

        self.device = device
        self.threads = threads or actor_cpus()
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EnvError("this onnxruntime has no CUDA provider; install onnxruntime-gpu in place of onnxruntime")
            free, _ = torch.cuda.mem_get_info(device)
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0, "gpu_mem_limit": int(free * GPU_MEMORY_FRACTION),
                                                    "arena_extend_strategy": "kSameAsRequested"})] + providers
        so = session_options(self.threads)
        if len(bundle.files) == 1:
            self.session = ort.InferenceSession(bundle.file(MODEL_FILE), so, providers=providers)
        else:  # external data: the files laid out as they were, in a folder of this actor's own
            import tempfile

            self._dir = tempfile.TemporaryDirectory(prefix="rayseg-onnx-")
            for name, data in bundle.files:
                os.makedirs(os.path.dirname(os.path.join(self._dir.name, name)), exist_ok=True)
                with open(os.path.join(self._dir.name, name), "wb") as f:
                    f.write(data)
            self.session = ort.InferenceSession(os.path.join(self._dir.name, MODEL_FILE), so, providers=providers)
        first = self.session.get_inputs()[0]
        self.input, self.output = first.name, self.session.get_outputs()[0].name
        self.one_at_a_time = first.shape[0] == 1  # a graph exported with a fixed batch of 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().contiguous().cpu().numpy()
        parts = [arr[i : i + 1] for i in range(len(arr))] if self.one_at_a_time else [arr]
        try:
            outs = [self.session.run([self.output], {self.input: p})[0] for p in parts]
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; running out of memory must halve the batch
            if self.device.type == "cuda" and "allocat" in str(e).lower():
                raise torch.OutOfMemoryError(str(e)) from None
            raise
        return torch.from_numpy(np.concatenate(outs) if len(outs) > 1 else outs[0]).to(self.device)
