"""GPU plans checked on a machine without a GPU: a Ray that advertises a GPU it does not have makes `rayseg segment`
fail in one sentence (never a quiet run on CPU), the pool asks for GPUs the autoscaler can add, and every summary
says what the predictor ran on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import png_bytes, random_image
from rayseg import segment
from rayseg.config import SegmentConfig

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where CUDA cannot start")

REPO = Path(__file__).resolve().parents[2]


def write_images(folder: Path, n: int = 3) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(png_bytes(random_image(rng, 40, 50)))


def test_a_ray_that_advertises_a_gpu_it_cannot_use_fails_in_one_sentence(tmp_path):
    """`ray.init(num_gpus=1)` on a CPU machine, then the CLI: exit 1, one line saying why, no summary."""
    write_images(tmp_path / "in")
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import sys, ray
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
        from rayseg.cli import main
        sys.exit(main(["segment", {str(tmp_path / "in")!r}, "--output", {str(out)!r}, "--model", "pointwise",
                       "--input-size", "32", "--quiet"]))
    """)
    env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("rayseg segment: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "must run on a GPU" in lines[0] and ("no NVIDIA GPU or driver" in lines[0] or "driver" in lines[0]), lines[0]
    assert "Traceback" not in lines[0]
    assert not (out / "_rayseg.json").exists()


def test_device_cuda_asks_for_a_gpu_per_actor_and_a_pool_up_to_max_without_any_gpu_now(ray_local, caplog):
    """On a cluster whose GPU group is at zero nodes, the plan still asks for GPUs, so the autoscaler adds them."""
    from rayseg.runtime import actor_plan, actor_pool

    assert ray_local.cluster_resources().get("GPU", 0) == 0
    caplog.set_level("INFO", logger="rayseg")
    pool, resources, threads = actor_plan(SegmentConfig(inputs=("x",), output="y", device="cuda", actors="1:8"))
    assert pool == (1, 8) and resources == {"num_gpus": 1, "num_cpus": 4} and threads == 1  # --cpus-per-gpu 4 by default
    strategy = actor_pool(pool, resources["num_cpus"])
    assert (strategy.min_size, strategy.max_size, strategy.max_concurrent_calls_per_actor) == (1, 8, 4)
    assert strategy.enable_true_multi_threading  # batches decode and encode on threads while one holds the device
    _, resources, _ = actor_plan(SegmentConfig(inputs=("x",), output="y", device="cuda", cpus_per_gpu=8))
    assert resources == {"num_gpus": 1, "num_cpus": 8}
    assert any("waits for its first GPU" in r.getMessage() for r in caplog.records)
    pool, resources, _ = actor_plan(SegmentConfig(inputs=("x",), output="y", device="cuda"))
    assert pool == (1, 1) and resources["num_gpus"] == 1  # no --actors: (1, max(1, GPUs now))
    pool, resources, _ = actor_plan(SegmentConfig(inputs=("x",), output="y"))  # auto with no GPU now: the CPU plan
    assert "num_gpus" not in resources and pool == (2, 2)


def test_the_summary_says_what_the_predictor_ran_on(ray_local, tmp_path):
    write_images(tmp_path / "in")
    summary = segment(inputs=(str(tmp_path / "in"),), output=str(tmp_path / "out"), model="pointwise", input_size=32, quiet=True)
    assert summary["errors"] == 0
    (dev,) = summary["devices"]
    assert dev["device"] == "cpu" and dev["precision"] == "fp32" and dev["batch_size"] == 16
    assert dev["torch"] == torch.__version__ and dev["actors"] == 1  # 3 files, one batch: one actor (runtime.actor_plan)
    assert json.loads((tmp_path / "out" / "_rayseg.json").read_text())["devices"] == summary["devices"]


def test_concurrent_calls_in_one_actor_give_the_rows_one_call_at_a_time_gives(ray_local, tmp_path):
    """The GPU plan's actor shape (several calls at once on threads, the device one at a time), run on CPU."""
    import dataclasses

    import ray

    from rayseg import progress
    from rayseg.config import PredictConfig
    from rayseg.models import load_bundle
    from rayseg.runtime import actor_pool
    from rayseg.segment import Segmenter, work_units
    from rayseg.storage import discover

    write_images(tmp_path / "in", n=24)
    units = work_units(discover([str(tmp_path / "in")], {})[0])
    units = [{"kind": "image", "urls": [u]} for unit in units for u in unit["urls"]]  # one image a block: many calls
    bundle = load_bundle(None, "unet", 3, input_size=32)
    opts = dataclasses.replace(PredictConfig(batch_size=4), device="cpu")
    encode_kw = {"num_classes": 3, "mask_format": "png", "objects": False, "min_area": 0, "counter": None}

    def rows(calls: int) -> dict:
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(progress.read_stage, batch_size=1, fn_kwargs={"storage_options": {}, "h5_key": "images", "image_column": "image"},
                            num_cpus=0.2)
        ds = ds.map_batches(Segmenter, batch_size=2, fn_constructor_args=(bundle, opts, 1, False, 10**8, encode_kw),
                            compute=actor_pool((1, 1), calls), num_cpus=0.5)
        return {r["image_id"]: r for r in ds.take_all()}

    serial, concurrent = rows(1), rows(3)
    assert len(serial) == len(concurrent) == 24
    for image_id, row in serial.items():
        assert concurrent[image_id]["mask_png"] == row["mask_png"] and concurrent[image_id]["error"] is None
