"""`rayseg doctor`: what this machine's GPU path does, in one JSON, in under five minutes.

    rayseg doctor --gpu --json doctor.json

CUDA, driver and torch versions; the predictor's fast path, mixed sizes and an 8000x8000 tiled image with the peak
device memory of each; bf16 masks against fp32; the probed batch size; `rayseg segment --device cuda` end to end on
3,000 synthetic 512x512 JPEGs with the GPU's utilisation sampled through NVML (`pip install nvidia-ml-py`; the
figure is left out without it); two epochs of `rayseg train --use-gpu`; `rayseg bench --device cuda`. Each step
runs in a process of its own under a timeout from one budget, so a hung step costs its share, not the run.
Without CUDA it refuses in one sentence (exit 1). Without --gpu it only reports the versions.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rayseg.cliutil import add_command
from rayseg.config import DoctorConfig
from rayseg.errors import EnvError

BUDGET_S = 290  # the whole check; every step gets at most its cap and never more than what is left
STEP_CAPS_S = {"predictor": 80, "segment": 90, "train": 70, "bench": 70}  # each Predictor's first CUDA call costs ~8 s


def versions() -> dict:
    import torch

    from rayseg.devices import cuda_problem, nvidia_driver_version

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "driver": nvidia_driver_version(), "cuda_problem": cuda_problem()}
    if out["cuda_problem"] is None:
        p = torch.cuda.get_device_properties(0)
        out.update(devices=torch.cuda.device_count(), name=p.name, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
    return out


# -- the steps, each run as `python -m rayseg.doctor STEP WORKDIR` ---------------------------------------------


def step_predictor(workdir: Path) -> dict:
    """Fast path, mixed sizes, an 8000x8000 tiled image (peak device memory of each), bf16 vs fp32, probed batch."""
    import numpy as np
    import torch

    from rayseg.config import PredictConfig
    from rayseg.models import load_bundle
    from rayseg.predict import Predictor

    bundle = load_bundle(None, "lraspp_mobilenet_v3_large", 21, input_size=512)
    rng = np.random.default_rng(0)

    def batch(images):
        b = {"image_id": np.array([str(i) for i in range(len(images))], dtype=object), "error": np.array([None] * len(images), dtype=object),
             "image": np.empty(len(images), dtype=object)}
        b["image"][:] = images
        return b

    def timed(predictor, images):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = predictor(batch(images))
        torch.cuda.synchronize()
        return out, {"s": round(time.perf_counter() - t, 3), "peak_device_mib": round(torch.cuda.max_memory_allocated() / 2**20)}

    bf16 = Predictor(bundle, PredictConfig(device="cuda"))  # auto: bf16, batch size probed
    res = {"probed_batch_size": bf16.batch_size, "device": bf16.device_info()}
    say(f"predictor: batch size {bf16.batch_size} probed")
    fast = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(2 * bf16.batch_size)]
    timed(bf16, fast[:bf16.batch_size])  # warm-up at the timed batch shape: cuDNN picks its kernels per shape
    out, res["fast_path"] = timed(bf16, fast)
    res["fast_path"]["images_per_s"] = round(len(fast) / res["fast_path"]["s"], 1)
    mixed = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(300, 500), (512, 512), (700, 640), (90, 1000)] * 8]
    say(f"predictor: fast path {res['fast_path']}")
    _, res["mixed_sizes"] = timed(bf16, mixed)
    big = np.ascontiguousarray(np.repeat(np.repeat(rng.integers(0, 256, (125, 125, 3), dtype=np.uint8), 64, 0), 64, 1))  # 8000x8000
    tiled, res["tiled_8000x8000"] = timed(bf16, [big])
    res["tiled_8000x8000"]["error"] = tiled["error"][0]
    say(f"predictor: 8000x8000 tiled {res['tiled_8000x8000']}")
    fp32 = Predictor(bundle, PredictConfig(device="cuda", precision="fp32", batch_size=bf16.batch_size))
    ref = fp32(batch(fast[:32]))
    agree = [float((a == b).mean()) for a, b in zip(ref["mask"], out["mask"][:32])]
    res["bf16_vs_fp32"] = {"images": len(agree), "min_pixel_agreement": round(min(agree), 4), "mean_pixel_agreement": round(float(np.mean(agree)), 4),
                           "max_confidence_difference": round(float(np.abs(ref["mean_confidence"] - out["mean_confidence"][:32]).max()), 4)}
    return res


def step_segment(workdir: Path) -> dict:
    """`rayseg segment --device cuda` on 3,000 synthetic 512x512 JPEGs, GPU utilisation sampled from NVML."""
    archive = workdir / "jpegs"
    if not archive.exists():
        _cli("synth", str(archive), "--layout", "files", "--count", "3000", "--min-size", "512", "--max-size", "512",
             "--image-format", "jpeg", "--seed", "1")
    sampler = NvmlSampler()
    sampler.start()
    t = time.perf_counter()
    try:
        _cli("segment", str(archive), "--output", str(workdir / "out"), "--overwrite", "--device", "cuda", "--quiet")
    finally:
        sampler.stop.set()
        sampler.join()
    summary = json.loads((workdir / "out" / "_rayseg.json").read_text())
    return {"images": summary["images"], "errors": summary["errors"], "devices": summary.get("devices"),
            "elapsed_s": summary["elapsed_s"], "startup_s": summary["startup_s"], "wall_s": round(time.perf_counter() - t, 1),
            "images_per_s_after_startup": round(summary["images"] / max(1e-6, summary["elapsed_s"] - summary["startup_s"]), 1),
            **sampler.figures()}


def step_train(workdir: Path) -> dict:
    """Two epochs of `rayseg train --use-gpu` on a small synthetic labelled archive."""
    for name, count, seed in (("train", 200, 2), ("val", 40, 3)):
        if not (workdir / name).exists():
            _cli("synth", str(workdir / name), "--layout", "h5", "--count", str(count), "--seed", str(seed))
    t = time.perf_counter()
    _cli("train", "--data", str(workdir / "train"), "--val-data", str(workdir / "val"), "--model", "unet", "--num-classes", "3",
         "--input-size", "128", "--epochs", "2", "--workers", "1", "--use-gpu", "--output", str(workdir / "run"))
    best = workdir / "run" / "best" / "model.json"
    return {"epochs": 2, "s": round(time.perf_counter() - t, 1), "best_checkpoint": best.exists(),
            "metrics": json.loads(best.read_text()).get("metrics") if best.exists() else None}


def step_bench(workdir: Path) -> dict:
    """`rayseg bench --device cuda`, shortened to fit the budget."""
    out = workdir / "bench.json"
    _cli("bench", "--device", "cuda", "--count", "1000", "--small-count", "200", "--min-seconds", "4", "--workdir", str(workdir / "bench"),
         "--json", str(out))
    return json.loads(out.read_text())


STEPS = {"predictor": step_predictor, "segment": step_segment, "train": step_train, "bench": step_bench}


def _cli(*argv: str) -> None:
    """A rayseg command with its own embedded Ray; its progress lines go to this step's stderr, so a step stopped at
    its timeout still says how far it got."""
    say(f"rayseg {' '.join(argv)}")
    env = {**os.environ, "RAY_ADDRESS": "local", "RAYSEG_PROGRESS_INTERVAL": "5"}
    proc = subprocess.run([sys.executable, "-m", "rayseg.cli", *argv], stdout=subprocess.DEVNULL, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"rayseg {argv[0]} exited {proc.returncode} (its output is above)")


def say(line: str) -> None:
    print(f"rayseg doctor: {line}", file=sys.stderr, flush=True)


class NvmlSampler(threading.Thread):
    """GPU utilisation and memory every 0.2 s through NVML (nvidia-ml-py), when it is installed."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop, self.util, self.mem = threading.Event(), [], []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self.nvml = None

    def run(self):
        while self.nvml and not self.stop.wait(0.2):
            self.util.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)
            self.mem.append(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)

    def figures(self) -> dict:
        if not self.util:
            return {"gpu_utilisation": "n/a (pip install nvidia-ml-py)"}
        busy = [u for u in self.util if u > 0]
        return {"gpu_utilisation_mean_pct": round(sum(self.util) / len(self.util), 1),
                "gpu_utilisation_mean_pct_while_busy": round(sum(busy) / max(1, len(busy)), 1),
                "gpu_memory_peak_mib": round(max(self.mem) / 2**20)}


def run_step(name: str, workdir: Path, timeout: float) -> dict:
    """One step in a process group of its own, killed whole at `timeout`: its JSON, or what went wrong.

    The group holds what the step started too (a `rayseg segment` and its embedded Ray), so a step that overruns
    cannot keep the GPU and CPUs busy under the next one. A timed-out step reports its last line of output, which
    says how far it got."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rayseg.doctor", name, str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        last = (err.strip().splitlines() or ["no output"])[-1]
        return {"ok": False, "error": f"timed out after {timeout:.0f} s; its last line: {last}", "s": round(time.perf_counter() - t, 1)}
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": (err.strip().splitlines() or ["no output"])[-1], "s": round(time.perf_counter() - t, 1)}
    return {"ok": True, "s": round(time.perf_counter() - t, 1), **json.loads(lines[-1])}


def doctor(cfg: DoctorConfig) -> dict:
    t0 = time.perf_counter()
    report = {"command": "doctor", "versions": versions()}
    problem = report["versions"]["cuda_problem"]
    if cfg.gpu and problem:
        raise EnvError(f"rayseg doctor --gpu needs CUDA, but {problem}")
    if cfg.gpu:
        workdir = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="rayseg-doctor-"))
        workdir.mkdir(parents=True, exist_ok=True)
        report["workdir"] = str(workdir)
        for name, cap in STEP_CAPS_S.items():
            left = BUDGET_S - (time.perf_counter() - t0)
            report[name] = run_step(name, workdir / name, min(cap, left)) if left > 5 else {"ok": False, "error": "no time left"}
    report["elapsed_s"] = round(time.perf_counter() - t0, 1)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(report, indent=2, default=str))
    return report


def register(sub) -> None:
    add_command(sub, "doctor", DoctorConfig, lambda cfg: print(json.dumps(doctor(cfg), indent=2, default=str)) or 0,
                help="check this machine's GPU path in under five minutes (versions, predictor, segment, train, bench)",
                description=__doc__.split("\n\n")[0])


if __name__ == "__main__":  # one step, in its own process: `python -m rayseg.doctor STEP WORKDIR`
    step, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    print(json.dumps(STEPS[step](folder), default=str))
