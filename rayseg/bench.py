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
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rayseg import storage
from rayseg.bench_measure import in_process, model_only, naive, pipeline
from rayseg.cliutil import add_command
from rayseg.config import BenchConfig
from rayseg.errors import UserError


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
    from rayseg.synth import shard_ranges, write_archive

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
    sizes = [len(r) for r in shard_ranges(cfg.count, shards)]
    return [(s.url, s.kind, n) for s, n in zip(found, sizes)], {**spec, "images": cfg.count}


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


def measure_model_only(mcfg: dict) -> dict:
    mo, mem = in_process(model_only, mcfg)
    mem.pop("cpu_s")  # the whole process; its timed loop measures its own
    return {"images_per_s": mo["images"] / mo["seconds"], "ratio": 1.0, "images": mo["images"], "seconds": mo["seconds"],
            "cpu_ms_per_image": 1000 * mo["cpu_s"] / mo["images"], **mem}


def measure_paths(mcfg: dict, listed: list, small: list, workdir: Path, say) -> dict:
    """{(path, "small" | "large"): its figures} of naive and pipeline. The runs alternate (naive small, pipeline small,
    naive large, pipeline large), so a machine whose speed drifts (a shared VM) moves both paths alike."""
    n_big, n_small = sum(n for *_, n in listed), sum(n for *_, n in small)
    runs = {}
    for label, shards in (("small", small), ("large", listed)):
        for name in ("naive", "pipeline"):
            say(f"{name} on {n_small if label == 'small' else n_big} images")
            out_dir = str(workdir / f"out-{name}-{label}")
            shutil.rmtree(out_dir, ignore_errors=True)
            if name == "naive":
                r, mem = in_process(naive, mcfg, [(u, k) for u, k, _ in shards], out_dir)
            else:
                r, mem = pipeline(mcfg, [u for u, _, _ in shards], out_dir)
            runs[name, label] = {**r, **mem}
    return runs


def path_figures(name: str, big: dict, sm: dict, n_big: int, n_small: int, model_only_ips: float) -> dict:
    """The figures of one path (naive or pipeline) from its large and its small run."""
    # run_s starts once the model is ready (naive) or Ray is (pipeline): interpreter and ray.init noise stay out
    steady, method = _steady(n_big, big["run_s"], n_small, sm["run_s"])
    e2e = n_big / big["e2e_s"]
    entry = {
        "steady_images_per_s": steady,
        "steady_ratio": steady / model_only_ips,
        "steady_method": method,
        "e2e_images_per_s": e2e,
        "e2e_ratio": e2e / model_only_ips,
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
                      "errors": big["errors"] + sm["errors"], **{f"startup_{k}": v for k, v in big["startup"].items()}})
    else:  # the model ready, the loop about to start
        entry["startup_s"] = big["e2e_s"] - big["run_s"]
    return entry


def measure_round(mcfg: dict, listed: list, small: list, workdir: Path, say) -> dict:
    """One of each measurement: model-only, then the small and large runs of naive and pipeline."""
    n_big, n_small = sum(n for *_, n in listed), sum(n for *_, n in small)
    say("model-only")
    res: dict = {"model_only": measure_model_only(mcfg)}
    mo_ips = res["model_only"]["images_per_s"]
    runs = measure_paths(mcfg, listed, small, workdir, say)
    for name in ("naive", "pipeline"):
        res[name] = path_figures(name, runs[name, "large"], runs[name, "small"], n_big, n_small, mo_ips)
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


def startup_line(p: dict, nv: dict, n: dict) -> str:
    """Where each path's fixed cost went, in seconds after launch, and what the small run cost end to end."""
    steps = [("interpreter", "interpreter_s"), ("command running", "command_s"), ("model checked", "model_checked_s"),
             (f"Ray ready (dashboard {'on' if p.get('startup_dashboard') else 'off'})", "ray_ready_s"),
             ("first predictor ready", "predictor_ready_s"), ("first batch", "first_batch_s")]
    told = ", ".join(f"{name} {p['startup_' + key]:.1f}" for name, key in steps if p.get("startup_" + key) is not None)
    return (f"start-up, s after launch: pipeline {told}; {n['large']} images done at {p['e2e_s']:.1f}, exited at {p['exit_s']:.1f}. "
            f"naive: model ready {nv['startup_s']:.1f}, done at {nv['e2e_s']:.1f}\n"
            f"small run, {n['small']} images end to end: naive {nv['small_e2e_s']:.1f} s, pipeline {p['small_e2e_s']:.1f} s "
            f"({nv['small_e2e_s'] / p['small_e2e_s']:.2f}x naive)")


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
    lines.append(startup_line(p, nv, n))
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
                 f"end-to-end {_num(t['e2e_vs_naive'], '{:.2f}')}x{' (>= 0.85x)' if cpu else ''}; "
                 f"steady vs model-only {_num(t['steady_vs_model_only'], '{:.2f}')}x{' (>= 0.85x)' if cpu else ''}")
    return "\n".join(lines)


def register(sub) -> None:
    add_command(sub, "bench", BenchConfig, _run, help="measure model-only, a naive loop and the pipeline on one archive",
                description=__doc__.split("\n\n")[0])


def _run(cfg: BenchConfig) -> int:
    res = run(cfg)
    print(table(res))
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(res, indent=2, default=str))
    return 0
