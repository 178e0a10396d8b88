"""Faults injected into a running `segment`: a predictor actor SIGKILLed, a worker node removed, object storage
refusing requests for a while. Each run must finish with every input in the output exactly once.

    pytest tests/test_faults.py

The node test starts its own multi-node cluster in a child process (the session's embedded Ray lives in
this one); everything it starts is stopped by the child, and the child is killed if it overruns.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from conftest import png_bytes, random_image
from rayseg import segment

N_IMAGES = 200


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    names = []
    for i in range(n):
        (folder / f"img{i:04d}.png").write_bytes(png_bytes(random_image(rng, 12, 16)))
        names.append(f"file://{folder}/img{i:04d}.png")
    return names


def assert_exactly_once(out: Path, expected_ids: list[str]) -> pd.DataFrame:
    df = pd.read_parquet(out / "images")
    dupes = df["image_id"][df["image_id"].duplicated()].tolist()
    assert not dupes, f"{len(dupes)} duplicated rows, e.g. {dupes[:3]}"
    missing = sorted(set(expected_ids) - set(df["image_id"]))
    assert not missing, f"{len(missing)} inputs missing, e.g. {missing[:3]}"
    assert len(df) == len(expected_ids)
    assert df["error"].isna().all(), df["error"].dropna().unique()[:3]
    assert json.loads((out / "_rayseg.json").read_text())["rows"] == len(expected_ids)
    return df


def predictor_workers(ray_mod) -> list[psutil.Process]:
    """Worker processes of *this* Ray session (children of its raylet) whose title names the Predictor actor."""
    from ray._private import ray_constants

    raylet = ray_mod._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if title.startswith("ray::") and "Predictor" in title:
            found.append(p)
    return found


def test_predictor_actor_sigkilled_mid_run(ray_local, tmp_path):
    ids = write_images(tmp_path / "in", N_IMAGES)
    out = tmp_path / "out"
    result: dict = {}

    def run():
        try:
            result["summary"] = segment(inputs=[str(tmp_path / "in")], output=str(out), model="unet", num_classes=2,
                                        input_size=32, batch_size=4, quiet=True)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            result["error"] = e

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    # Kill once the first rows are written (mid-run), or 20 s after the actor came up if no file shows by then.
    victim, first_seen, deadline = None, None, time.monotonic() + 240
    while runner.is_alive() and time.monotonic() < deadline:
        procs = predictor_workers(ray_local)
        if procs and first_seen is None:
            first_seen = time.monotonic()
        written = list((out / "images").glob("*.parquet")) if (out / "images").exists() else []
        if procs and (written or time.monotonic() - first_seen > 20):
            victim = procs[0]
            os.kill(victim.pid, signal.SIGKILL)
            print(f"killed {victim.pid} with {len(written)} files written, {time.monotonic() - first_seen:.1f}s after the actor came up")
            break
        time.sleep(0.2)
    assert victim is not None, f"no predictor actor to kill before the run ended: {result}"
    assert runner.is_alive(), "the run ended before the kill: the test proves nothing"
    killed_at = time.monotonic()
    runner.join(timeout=300)
    assert not runner.is_alive(), "segment did not finish within 5 minutes of the kill"
    assert "error" not in result, result.get("error")
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
    assert time.monotonic() > killed_at
    assert_exactly_once(out, ids)
    assert result["summary"]["rows"] == N_IMAGES and result["summary"]["errors"] == 0


NODE_SCRIPT = textwrap.dedent(r'''
    import json, sys, threading, time
    from pathlib import Path

    import ray
    from ray.cluster_utils import Cluster

    from rayseg import segment

    inp, out = sys.argv[1], Path(sys.argv[2])
    # head without CPUs, so all work lands on the workers; 2 CPUs per worker so that after one is gone the other
    # still fits the predictor actor (1 CPU) plus the encode/write tasks
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 150 * 2**20,
                                                            "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=150 * 2**20) for _ in range(2)]
    cluster.wait_for_nodes()
    report = {}
    try:
        def run():
            try:
                report["summary"] = segment(inputs=[inp], output=str(out), model="unet", num_classes=2, input_size=32,
                                            batch_size=4, quiet=True, address=cluster.address)
            except BaseException as e:
                report["error"] = repr(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        raylets = {w.all_processes["raylet"][0].process.pid: w for w in workers}
        deadline, first_seen = time.monotonic() + 240, None
        while t.is_alive() and time.monotonic() < deadline and "removed" not in report:
            for raylet_pid, node in raylets.items():
                import psutil
                titles = [" ".join(c.cmdline()) for c in psutil.Process(raylet_pid).children(recursive=True) if c.is_running()]
                if any(x.startswith("ray::") and "Predictor" in x for x in titles):
                    first_seen = first_seen or time.monotonic()
                    written = list((out / "images").glob("*.parquet")) if (out / "images").exists() else []
                    if written or time.monotonic() - first_seen > 20:
                        report["removed"] = {"files_written": len(written), "alive": t.is_alive()}
                        cluster.remove_node(node, allow_graceful=False)
                        break
            time.sleep(0.2)
        t.join(timeout=300)
        report["finished"] = not t.is_alive()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("REPORT " + json.dumps(report, default=str))
''')


def test_worker_node_removed_mid_run(tmp_path):
    ids = write_images(tmp_path / "in", N_IMAGES, seed=1)
    out = tmp_path / "out"
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("RAY_ADDRESS")
    child = subprocess.Popen([sys.executable, "-c", NODE_SCRIPT, str(tmp_path / "in"), str(out)], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = child.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)  # the child's whole session: its Ray head and workers too
        log, _ = child.communicate()
        pytest.fail("the multi-node run overran 7 minutes:\n" + log[-3000:])
    lines = [ln for ln in log.splitlines() if ln.startswith("REPORT ")]
    assert lines, log[-3000:]
    report = json.loads(lines[-1][len("REPORT "):])
    print(report)
    assert "removed" in report and report["removed"]["alive"], f"no node was removed mid-run: {report}"
    assert report["finished"] and "error" not in report, report
    assert_exactly_once(out, ids)
