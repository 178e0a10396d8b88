"""`rayseg bench`: the model alone, a naive single-process loop and the rayseg pipeline, measured in one run.

    rayseg bench --json bench.json                    # 2,000 synthetic 256x256 images, lraspp_mobilenet_v3_large, batch 16
    rayseg bench --count 24 --small-count 8 --model unet --input-size 64     # a smoke run in seconds
    rayseg bench --input 'archive/*.tar' --checkpoint runs/x/best --workdir /tmp/b

Each measurement runs in a fresh process, so its peak memory is its own and start-up is real:
- model-only: the forward pass on pre-decoded, pre-batched tensors on the device (the ceiling), fed exactly as
  the predictor feeds it: an NHWC uint8 stack permuted to NCHW (channels_last), float, normalised;
- naive: read, decode (cv2), infer, argmax, PNG, statistics, Parquet, one process, no Ray, same model/batch/layout;
- pipeline: `rayseg segment` in a subprocess with its own embedded Ray, start-up and model load included.
Steady-state throughput of naive and pipeline = (count - small count) / (time(count) - time(small count)), with
times taken from model ready (naive) or Ray ready (pipeline), so what fixed costs remain (actor start, model load
in the actor) cancel out. The small run reads a prefix of the shards. End-to-end times run from process launch.
CPU ms/image (all processes, same difference) is the figure that holds up when the machine is shared.
Peak memory is the RSS summed over the process tree (driver, raylet, workers), sampled every 0.1 s; shared
pages (the object store) count once per process that maps them, so it overstates, never understates.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rayseg import storage
from rayseg.cliutil import add_config_arguments, config_from_args
from rayseg.config import ModelConfig, _f
from rayseg.errors import UserError


@dataclass(frozen=True)
class BenchConfig(ModelConfig):
    input: tuple[str, ...] = _f((), "archive to measure on (paths, globs or URLs; default: a synthetic one is made)")
    count: int = _f(2000, "images in the large run (synthetic archive size)")
    small_count: int = _f(200, "images in the small run; steady state = the difference of the two runs")
    batch_size: int = _f(16, "images per model batch")
    image_size: int | None = _f(None, "side of the synthetic images (default: the input size, 256)")
    layout: str = _f("tar", "layout of the synthetic archive", choices=("files", "tar", "h5", "parquet"))
    device: str = _f("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = _f(False, "torch.compile the model (all three measurements)")
    actors: str = _f("", "pipeline: predictor actor pool MIN:MAX, as `rayseg segment --actors` (default: its own choice)")
    threads: int | None = _f(None, "pipeline: torch threads per CPU actor, as `rayseg segment --threads`")
    repeat: int = _f(1, "measure everything this many times, interleaved, and report the median of each figure")
    json: str | None = _f(None, "also write the figures to this JSON file")
    workdir: str | None = _f(None, "keep the archive and outputs here, and reuse a synthetic archive made before (default: a temp dir, removed)")
    min_seconds: float = _f(8.0, "time the model-only loop for at least this long")

    def __post_init__(self):
        if self.count < 2 or self.small_count < 1 or self.small_count >= self.count:
            raise UserError("need 1 <= --small-count < --count")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.repeat < 1:
            raise UserError("--repeat must be at least 1")


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


def _in_process(target, *args) -> tuple[dict, dict]:
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
    import torch

    from rayseg.models import for_inference, load_bundle
    from rayseg.predict import autocast_dtype, resolve_device

    bundle = load_bundle(cfg["checkpoint"], cfg["model"], cfg["num_classes"], cfg["weights"], cfg["input_size"])
    device = resolve_device(cfg["device"])
    model = for_inference(bundle.build(), device, cfg["compile"])  # the predictor's own model: like with like
    mean = torch.tensor(bundle.card.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(bundle.card.std, device=device).view(1, 3, 1, 1) * 255
    return bundle, device, autocast_dtype(device, cfg["precision"]), model, mean, std


def model_only(cfg: dict, q) -> None:
    """Forward passes on one pre-decoded, pre-normalised channels_last float batch, warm-up excluded."""
    try:
        import numpy as np
        import torch

        bundle, device, amp, model, mean, std = _setup_torch(cfg)
        s, b = bundle.card.input_size, cfg["batch_size"]
        stack = np.random.default_rng(0).integers(0, 256, (b, s, s, 3), dtype=np.uint8)
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


def naive(cfg: dict, shard_list: list[tuple[str, str]], out_dir: str, q) -> None:
    """The loop a user would write without Ray: one process, batches of `batch_size`, one Parquet file."""
    try:
        import cv2
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch
        import torch.nn.functional as F

        from rayseg.shards import read_shard
        from rayseg.stats import SCHEMA

        bundle, device, amp, model, mean, std = _setup_torch(cfg)
        ready = time.time()
        s, k = bundle.card.input_size, bundle.card.num_classes
        os.makedirs(out_dir, exist_ok=True)
        writer = pq.ParquetWriter(os.path.join(out_dir, "part-0.parquet"), SCHEMA)
        rows: list[dict] = []
        pending: list[tuple[dict, np.ndarray]] = []

        def infer(batch):
            imgs = [img if img.shape[:2] == (s, s) else cv2.resize(img, (s, s), interpolation=cv2.INTER_LINEAR) for _, img in batch]
            x = torch.from_numpy(np.stack(imgs)).to(device).permute(0, 3, 1, 2).float()
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x).float()
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

        def flush_rows():
            writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
            rows.clear()

        images = 0
        for url, kind in shard_list:
            for r in read_shard(url, kind, {}):
                img = cv2.imdecode(np.frombuffer(r["data"], np.uint8), cv2.IMREAD_COLOR) if r["error"] is None else None
                if img is None:
                    rows.append({**{n: None for n in SCHEMA.names}, "image_id": r["image_id"], "source": r["source"], "shard": r["shard"],
                                 "model": bundle.label, "error": r["error"] or "could not decode"})
                    continue
                pending.append((r, cv2.cvtColor(img, cv2.COLOR_BGR2RGB)))
                images += 1
                if len(pending) == cfg["batch_size"]:
                    infer(pending)
                    pending.clear()
                if len(rows) >= 256:
                    flush_rows()
        if pending:
            infer(pending)
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


def pipeline(cfg: dict, urls: list[str], out_dir: str) -> tuple[dict, dict]:
    """`rayseg segment` in a subprocess with its own embedded Ray; times from launch to the summary written."""
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
    # its own Ray, so start-up is part of the figure: "local" starts a new instance even where another Ray runs on
    # this machine (with no address, ray.init joins the latest one it finds)
    env = {**os.environ, "RAY_ADDRESS": "local"}
    info_file = os.path.join(out_dir + ".child.json")
    launched = time.time()
    proc = subprocess.Popen([sys.executable, "-c", PIPELINE_CHILD, info_file, *argv], env=env,
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
    result = {
        "images": summary["images"],
        "errors": summary["errors"],
        "e2e_s": child["done_at"] - launched,
        "exit_s": exited - launched,
        "startup_s": (child["started_at"] - launched) + summary["startup_s"],  # interpreter + imports + Ray ready
        "ray_ready_s": child["started_at"] - launched + summary["startup_s"],
        "run_s": summary["elapsed_s"] - summary["startup_s"],
        "spill_mb": None if child["spilled_bytes"] is None else round(child["spilled_bytes"] / 2**20, 1),
    }
    return result, mem


# -- the archive --------------------------------------------------------------------------------

def _count_rows(url: str, kind: str) -> int:
    from rayseg.shards import read_shard

    return sum(1 for _ in read_shard(url, kind, {}))


def archive(cfg: BenchConfig, workdir: Path, input_size: int) -> tuple[list[tuple[str, str, int]], dict]:
    """[(url, kind, images)] of the large run, and a description. A synthetic archive is made (or reused)."""
    if cfg.input:
        shards, _ = storage.discover(cfg.input)
        listed = [(s.url, s.kind, _count_rows(s.url, s.kind)) for s in shards]
        return listed, {"input": list(cfg.input), "images": sum(n for *_, n in listed), "shards": len(listed)}
    from rayseg.synth import write_archive

    side = cfg.image_size or input_size
    per_shard = max(1, cfg.small_count // 2)  # the small run is the first shards: at least two, so reads overlap
    shards = 1 if cfg.layout == "files" else max(1, math.ceil(cfg.count / per_shard))
    spec = {"layout": cfg.layout, "count": cfg.count, "shards": shards, "side": side, "seed": 0}
    root = workdir / "archive"
    marker = root / "_bench_spec.json"
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        print(f"rayseg bench: writing {cfg.count} synthetic {side}x{side} images ({cfg.layout}, {shards} shards) to {root}", file=sys.stderr)
        write_archive(str(root), cfg.layout, cfg.count, labelled=False, seed=0, min_size=side, max_size=side, shards=shards)
        print(f"rayseg bench: archive written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        marker.write_text(json.dumps(spec))
    found, _ = storage.discover([str(root)])
    if cfg.layout == "files":
        return [(s.url, s.kind, 1) for s in found], {**spec, "images": len(found)}
    sizes = [len(r) for r in _split_sizes(cfg.count, shards)]
    return [(s.url, s.kind, n) for s, n in zip(found, sizes)], {**spec, "images": cfg.count}


def _split_sizes(count: int, shards: int) -> list[range]:
    from rayseg.synth import _split

    return _split(count, shards)


def prefix(listed: list[tuple[str, str, int]], small_count: int) -> list[tuple[str, str, int]]:
    """The first shards holding at least `small_count` images."""
    out, n = [], 0
    for item in listed:
        if n >= small_count:
            break
        out.append(item)
        n += item[2]
    if len(out) == len(listed):
        raise UserError(f"the archive has too few shards to make a small run of {small_count} images distinct from the whole")
    return out


# -- putting it together --------------------------------------------------------------------------

def machine() -> dict:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        m = re.search(r"^Model name:\s*(.+)$", text, re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    import ray
    import torch

    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_1m": round(os.getloadavg()[0], 2), "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _steady(n_big: int, t_big: float, n_small: int, t_small: float) -> tuple[float, str]:
    """Images/s past the fixed costs: the difference of two runs; when noise swamps a tiny difference, the large run alone."""
    if t_big > t_small:
        return (n_big - n_small) / (t_big - t_small), "difference"
    return n_big / t_big, "large run only (the difference was not positive: counts too close for the noise)"


def measure_round(mcfg: dict, listed: list, small: list, workdir: Path, say) -> dict:
    """One of each measurement. Small and large runs of naive and pipeline alternate (naive small, pipeline small,
    naive large, pipeline large), so a machine whose speed drifts (a shared VM) moves both paths alike."""
    n_big, n_small = sum(n for *_, n in listed), sum(n for *_, n in small)
    say("model-only")
    mo, mem = _in_process(model_only, mcfg)
    mo_ips = mo["images"] / mo["seconds"]
    mem.pop("cpu_s")  # the whole process; its timed loop measures its own
    res: dict = {"model_only": {"images_per_s": mo_ips, "ratio": 1.0, "images": mo["images"], "seconds": mo["seconds"],
                                "cpu_ms_per_image": 1000 * mo["cpu_s"] / mo["images"], **mem}}
    runs = {}
    for label, shards in (("small", small), ("large", listed)):
        for name in ("naive", "pipeline"):
            say(f"{name} on {n_small if label == 'small' else n_big} images")
            out_dir = str(workdir / f"out-{name}-{label}")
            shutil.rmtree(out_dir, ignore_errors=True)
            if name == "naive":
                r, mem = _in_process(naive, mcfg, [(u, k) for u, k, _ in shards], out_dir)
            else:
                r, mem = pipeline(mcfg, [u for u, _, _ in shards], out_dir)
            runs[name, label] = {**r, **mem}
    for name in ("naive", "pipeline"):
        big, sm = runs[name, "large"], runs[name, "small"]
        # run_s starts once the model is ready (naive) or Ray is (pipeline): interpreter and ray.init noise stay out
        steady, method = _steady(n_big, big["run_s"], n_small, sm["run_s"])
        e2e = n_big / big["e2e_s"]
        entry = {
            "steady_images_per_s": steady,
            "steady_ratio": steady / mo_ips,
            "steady_method": method,
            "e2e_images_per_s": e2e,
            "e2e_ratio": e2e / mo_ips,
            "e2e_s": big["e2e_s"],
            "small_e2e_s": sm["e2e_s"],
            "run_s": big["run_s"],
            "small_run_s": sm["run_s"],
            "peak_rss_mb": big["peak_rss_mb"],
            "small_peak_rss_mb": sm["peak_rss_mb"],
            "memory_growth": big["peak_rss_mb"] / sm["peak_rss_mb"],
            # CPU work per image past the fixed costs, all processes (Ray's own included)
            "cpu_ms_per_image": 1000 * max(big["cpu_s"] - sm["cpu_s"], 1e-3) / (n_big - n_small),
            "device_busy": big["device_busy"],
        }
        if name == "pipeline":
            entry.update({"startup_s": big["startup_s"], "exit_s": big["exit_s"], "spill_mb": big["spill_mb"],
                          "errors": big["errors"] + sm["errors"]})
        res[name] = entry
    p, nv = res["pipeline"], res["naive"]
    res["targets"] = {
        "steady_vs_naive": p["steady_images_per_s"] / nv["steady_images_per_s"],
        "steady_vs_model_only": p["steady_ratio"],
        "e2e_vs_naive": p["e2e_images_per_s"] / nv["e2e_images_per_s"],
    }
    return res


def median_of(rounds: list[dict]) -> dict:
    """Each numeric figure as its median over the rounds (ratios too: each round's own ratio, then the median);
    anything else from the first round."""
    out: dict = {}
    for section in rounds[0]:
        out[section] = {}
        for key, value in rounds[0][section].items():
            vals = [r[section][key] for r in rounds]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            out[section][key] = statistics.median(vals) if numeric else value
    return out


def run(cfg: BenchConfig) -> dict:
    from rayseg.models import DEFAULT_INPUT_SIZE

    input_size = cfg.input_size or DEFAULT_INPUT_SIZE
    keep = cfg.workdir is not None
    workdir = Path(cfg.workdir or tempfile.mkdtemp(prefix="rayseg-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        listed, arch = archive(cfg, workdir, input_size)
        small = prefix(listed, cfg.small_count)
        n_big, n_small = sum(n for *_, n in listed), sum(n for *_, n in small)
        mcfg = {**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, "input_size": cfg.input_size or (None if cfg.checkpoint else input_size)}
        res: dict = {"machine": machine(), "archive": arch, "config": {**mcfg, "input": list(cfg.input)}, "counts": {"large": n_big, "small": n_small}}
        rounds = []
        for i in range(cfg.repeat):
            tag = f"round {i + 1}/{cfg.repeat}: " if cfg.repeat > 1 else ""
            rounds.append(measure_round(mcfg, listed, small, workdir, lambda text: print(f"rayseg bench: {tag}{text}", file=sys.stderr, flush=True)))  # noqa: B023
        res.update(median_of(rounds))
        res["rounds"] = [{**r["targets"], "memory_growth": r["pipeline"]["memory_growth"]} for r in rounds] if cfg.repeat > 1 else []
        res["machine"]["load_1m_end"] = round(os.getloadavg()[0], 2)
        return res
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def _num(v, fmt: str = "{:.1f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def table(res: dict) -> str:
    c, m, n = res["config"], res["machine"], res["counts"]
    head = (f"rayseg bench: {c['checkpoint'] or c['model']}, batch {c['batch_size']}, input {c['input_size'] or 'checkpoint'}, "
            f"{n['large']} / {n['small']} images; {m['cpu']}, {m['cores']} CPUs, {m['ram_gib']} GiB"
            f"{', ' + m['gpu'] if m['gpu'] else ''}; load {m['load_1m']} -> {m['load_1m_end']}")
    rows = [("", "images/s", "x model-only", "CPU ms/image", "peak RSS MiB", "spill MiB", "device busy")]
    mo, nv, p = res["model_only"], res["naive"], res["pipeline"]
    rows.append(("model-only", _num(mo["images_per_s"]), "1.00", _num(mo["cpu_ms_per_image"]), _num(mo["peak_rss_mb"], "{:.0f}"), "-",
                 _num(mo["device_busy"], "{:.0%}")))
    for name, e in (("naive", nv), ("pipeline", p)):
        spill = _num(e.get("spill_mb"), "{:.0f}") if name == "pipeline" else "-"
        rows.append((f"{name} steady", _num(e["steady_images_per_s"]), _num(e["steady_ratio"], "{:.2f}"), _num(e["cpu_ms_per_image"]), "", "", ""))
        rows.append((f"{name} end-to-end {n['large']}", _num(e["e2e_images_per_s"]), _num(e["e2e_ratio"], "{:.2f}"), "",
                     _num(e["peak_rss_mb"], "{:.0f}"), spill, _num(e["device_busy"], "{:.0%}")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(r[0].ljust(widths[0]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(r))) for r in rows]
    t = res["targets"]
    lines.append(f"pipeline start-up: {p['startup_s']:.1f} s to Ray ready (interpreter, imports, discovery, model check, ray.init); "
                 f"{n['large']} images done {p['e2e_s']:.1f} s after launch, process exited at {p['exit_s']:.1f} s")
    for name, e in (("naive", nv), ("pipeline", p)):
        if e["steady_method"] != "difference":
            lines.append(f"note: {name} steady state is from the {e['steady_method']}")
    lines.append(f"peak memory {n['small']} -> {n['large']} images: naive {_num(nv['memory_growth'], '{:.2f}')}x, pipeline {_num(p['memory_growth'], '{:.2f}')}x")
    for i, r in enumerate(res.get("rounds") or []):
        lines.append(f"round {i + 1}: pipeline vs naive steady {r['steady_vs_naive']:.2f}x, end-to-end {r['e2e_vs_naive']:.2f}x; "
                     f"steady vs model-only {r['steady_vs_model_only']:.2f}x; peak memory {n['small']} -> {n['large']} images {r['memory_growth']:.2f}x")
    cpu = m["gpu"] is None  # the CPU targets; on a GPU: >= 0.9x model-only and >= 3x naive (docs/PERFORMANCE.md)
    median = f" (median of {len(res['rounds'])} rounds)" if res.get("rounds") else ""
    lines.append(f"pipeline vs naive{median}: steady {_num(t['steady_vs_naive'], '{:.2f}')}x{' (target >= 1.0x)' if cpu else ''}, "
                 f"end-to-end {_num(t['e2e_vs_naive'], '{:.2f}')}x{' (>= 0.8x)' if cpu else ''}; "
                 f"steady vs model-only {_num(t['steady_vs_model_only'], '{:.2f}')}x{' (>= 0.85x)' if cpu else ''}")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure model-only, a naive loop and the pipeline on one archive",
                       description=__doc__.split("\n\n")[0])
    add_config_arguments(p, BenchConfig)
    p.set_defaults(func=_run)


def _run(args) -> int:
    cfg = config_from_args(BenchConfig, args)
    res = run(cfg)
    print(table(res))
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(res, indent=2, default=str))
    return 0
