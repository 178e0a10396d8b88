"""The three measurements of `rayseg bench` (model-only, naive, pipeline), each in a fresh process, and the
sampler that reads the memory, CPU time and GPU busy fraction of that process and all its children.
"""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from rayseg import storage

# -- measuring a process tree ------------------------------------------------------------------

class Sampler(threading.Thread):
    """Peak RSS of a process and all its descendants, their CPU seconds, and the mean GPU busy fraction.

    CPU seconds are summed over every process seen (the last reading of each), so they hold up when other work
    shares the machine, where wall-clock figures do not.
    """

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        import psutil

        self.root, self.interval = psutil.Process(pid), interval
        self.peak, self.busy, self.cpu = 0, [], {}
        self.done = threading.Event()
        self.nvml = _nvml_handle()

    def sample(self) -> None:
        import psutil

        total = 0
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                total += p.memory_info().rss
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)
        if self.nvml is not None:
            import pynvml

            self.busy.append(pynvml.nvmlDeviceGetUtilizationRates(self.nvml).gpu / 100)

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.sample()

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {"peak_rss_mb": round(self.peak / 2**20, 1), "cpu_s": round(sum(self.cpu.values()), 2),
                "device_busy": round(sum(self.busy) / len(self.busy), 3) if self.busy else None}


def _nvml_handle():
    try:
        import pynvml
        import torch

        if not torch.cuda.is_available():
            return None
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - no pynvml, no GPU: busy fraction is n/a
        return None


def in_process(target, *args) -> tuple[dict, dict]:
    """Run target(*args, queue) in a fresh (spawned) process; returns (its result, its sampled memory)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    launched = time.time()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    sampler = Sampler(p.pid)
    sampler.start()
    result = q.get()
    p.join()
    mem = sampler.stop()
    if "error" in result:
        raise RuntimeError(f"{target.__name__} failed: {result['error']}")
    result["e2e_s"] = result.pop("done_at") - launched
    return result, mem


# -- the three measurements -------------------------------------------------------------------

def _setup_torch(cfg: dict):
    from rayseg.adapters import load_model
    from rayseg.config import ModelConfig
    from rayseg.devices import resolve_device
    from rayseg.predict import autocast_dtype

    bundle = load_model(ModelConfig(**{k: cfg[k] for k in ModelConfig.__dataclass_fields__}))
    device = resolve_device(cfg["device"])
    # the predictor's own runner: like with like (torch: batch norm folded, channels_last; ONNX: its session)
    import torch

    model = bundle.runner(device, cfg["compile"], threads=cfg.get("threads") or torch.get_num_threads())  # ONNX: torch's count
    mean, std = bundle.card.pixel_mean_std(device)
    return bundle, device, autocast_dtype(device, cfg["precision"]), model, mean, std


def model_only(cfg: dict, q) -> None:
    """Forward passes on one pre-decoded, pre-normalised channels_last float batch, warm-up excluded."""
    try:
        import numpy as np
        import torch

        bundle, device, amp, model, mean, std = _setup_torch(cfg)
        s, b = bundle.card.input_size, cfg["batch_size"]
        stack = np.random.default_rng(0).integers(0, 256, (b, s, s, bundle.card.in_channels), dtype=np.uint8)
        x = torch.from_numpy(stack).to(device).permute(0, 3, 1, 2).float()  # NCHW view of NHWC memory: channels_last
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)

        def step():
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        for _ in range(2):
            step()
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        min_batches = max(3, cfg["small_count"] // b)
        while n < min_batches or time.perf_counter() - t0 < cfg["min_seconds"]:
            step()
            n += 1
        elapsed = time.perf_counter() - t0
        q.put({"images": n * b, "seconds": elapsed, "cpu_s": time.process_time() - c0, "done_at": time.time()})
    except Exception as e:  # noqa: BLE001 - reported by the parent
        q.put({"error": repr(e)})


def _naive_infer(setup: tuple, batch: list[tuple[dict, object]]) -> list[dict]:
    """Output rows of one batch of (input row, RGB image), as segment writes them: resize to the model input,
    infer, logits back to the image size, argmax, PNG, class pixels and components."""
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    bundle, device, amp, model, mean, std = setup
    s, k = bundle.card.input_size, bundle.card.num_classes
    imgs = [img if img.shape[:2] == (s, s) else cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR) for _, img in batch]
    x = torch.from_numpy(np.stack(imgs)).to(device).permute(0, 3, 1, 2).float()
    x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = model(x).float()
    rows = []
    for (r, img), lg in zip(batch, logits):
        h, w = img.shape[:2]
        if (h, w) != (s, s):
            lg = F.interpolate(lg[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        conf, mask = torch.softmax(lg, 0).max(0)
        mask = mask.to(torch.uint8).cpu().numpy()
        ok, png = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        counts = np.bincount(mask.ravel(), minlength=k)[:k]
        comps = [cv2.connectedComponents((mask == c).astype(np.uint8), connectivity=8)[0] - 1 if counts[c] else 0 for c in range(k)]
        rows.append({"image_id": r["image_id"], "source": r["source"], "shard": r["shard"], "height": h, "width": w,
                     "mask_png": png.tobytes(), "mask_rle": None, "class_pixels": counts.tolist(), "num_components": comps,
                     "mean_confidence": float(conf.mean()), "model": bundle.label, "error": None})
    return rows


def naive(cfg: dict, shard_list: list[tuple[str, str]], out_dir: str, q) -> None:
    """The loop a user would write without Ray: one process, batches of `batch_size`, one Parquet file."""
    try:
        import cv2
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        from rayseg.shards import read_shard
        from rayseg.stats import SCHEMA

        setup = _setup_torch(cfg)
        label = setup[0].label
        ready = time.time()
        os.makedirs(out_dir, exist_ok=True)
        writer = pq.ParquetWriter(os.path.join(out_dir, "part-0.parquet"), SCHEMA)
        rows: list[dict] = []
        pending: list[tuple[dict, np.ndarray]] = []

        def flush_rows():
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
            rows.clear()

        images = 0
        for url, kind in shard_list:
            for r in read_shard(url, kind, {}):
                img = cv2.imdecode(np.frombuffer(r["data"], np.uint8), cv2.IMREAD_COLOR) if r["error"] is None else None
                if img is None:
                    rows.append({**{n: None for n in SCHEMA.names}, "image_id": r["image_id"], "source": r["source"], "shard": r["shard"],
                                 "model": label, "error": r["error"] or "could not decode"})
                    continue
                pending.append((r, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)))
                images += 1
                if len(pending) == cfg["batch_size"]:
                    rows += _naive_infer(setup, pending)
                    pending.clear()
                if len(rows) >= 256:
                    flush_rows()
        if pending:
            rows += _naive_infer(setup, pending)
        flush_rows()
        writer.close()
        done = time.time()
        q.put({"images": images, "done_at": done, "run_s": done - ready})
    except Exception as e:  # noqa: BLE001
        q.put({"error": repr(e)})


PIPELINE_CHILD = r"""
import json, sys, time
started = time.time()
from rayseg.cli import main
rc = main(sys.argv[2:])
done = time.time()
spilled = None
try:
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address
    reply = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address))
    spilled = reply.store_stats.spilled_bytes_total
except Exception:
    pass
with open(sys.argv[1], "w") as f:
    json.dump({"rc": rc, "started_at": started, "done_at": done, "spilled_bytes": spilled}, f)
sys.exit(rc)
"""


def segment_argv(cfg: dict, urls: list[str], out_dir: str) -> list[str]:
    """The `rayseg segment` command line of the pipeline measurement: the same model, batch and device as the others."""
    argv = ["segment", *urls, "--output", out_dir, "--overwrite", "--quiet", "--batch-size", str(cfg["batch_size"]),
            "--device", cfg["device"], "--precision", cfg["precision"]]
    if cfg["checkpoint"]:
        argv += ["--checkpoint", cfg["checkpoint"]]
    else:
        argv += ["--model", cfg["model"], "--num-classes", str(cfg["num_classes"])]
    if cfg["input_size"]:
        argv += ["--input-size", str(cfg["input_size"])]
    if cfg["compile"]:
        argv.append("--compile")
    if cfg["actors"]:
        argv += ["--actors", cfg["actors"]]
    if cfg["threads"]:
        argv += ["--threads", str(cfg["threads"])]
    return argv


def startup_steps(summary: dict, interpreter_s: float, command_s: float) -> dict:
    """Seconds after launch at which a pipeline run reached each step of its start-up (from its summary's timeline):
    the interpreter up, the command running (imports done), Ray ready, the first predictor actor ready (a process,
    torch, the model) and the first batch written out. Model check and Ray start overlap (runtime.ensure_ray_beside)."""
    t = summary["timeline_s"]
    steps = {"interpreter_s": interpreter_s, "command_s": command_s}
    steps.update({f"{step}_s": command_s + t[step] for step in ("model_checked", "ray_ready", "predictor_ready", "first_batch") if step in t})
    return {**{k: round(v, 3) for k, v in steps.items()}, "dashboard": t.get("dashboard"), "ray_joined": t.get("ray_joined")}


def pipeline(cfg: dict, urls: list[str], out_dir: str) -> tuple[dict, dict]:
    """`rayseg segment` in a subprocess with its own embedded Ray (or, with bench's --address, joining that Ray);
    times from launch to the summary written."""
    # its own Ray, so start-up is part of the figure: "local" starts a new instance even where `ray start` runs one
    # on this machine; `--address auto` (or an address) measures a job that joins a Ray already running instead
    env = {**os.environ, "RAY_ADDRESS": cfg.get("address") or "local"}
    info_file = os.path.join(out_dir + ".child.json")
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-c", PIPELINE_CHILD, info_file, *segment_argv(cfg, urls, out_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    exited = time.time()
    mem = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"rayseg segment failed (exit {proc.returncode}):\n{err[-3000:]}")
    child = json.loads(Path(info_file).read_text())
    summary = storage.read_json(storage.join(out_dir, "_rayseg.json"))
    began = dt.datetime.fromisoformat(summary["started_at"]).timestamp()  # when segment() began, after the imports
    result = {
        "images": summary["images"],
        "errors": summary["errors"],
        "e2e_s": child["done_at"] - launched,
        "exit_s": exited - launched,
        "startup_s": began - launched + summary["startup_s"],  # interpreter, imports, discovery, model check, Ray ready
        "startup": startup_steps(summary, child["started_at"] - launched, began - launched),
        "run_s": summary["elapsed_s"] - summary["startup_s"],
        "spill_mb": None if child["spilled_bytes"] is None else round(child["spilled_bytes"] / 2**20, 1),
    }
    return result, mem
