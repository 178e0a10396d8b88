"""Faults injected into a running `segment`: a predictor actor SIGKILLed, a worker node removed, object storage
refusing requests for a while. Each run must finish with every input in the output exactly once.

    pytest tests/system/test_faults.py

The node test starts its own multi-node cluster in a child process (the session's embedded Ray lives in
this one); everything it starts is stopped by the child, and the child is killed if it overruns.
"""

from __future__ import annotations

import collections
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
from rayseg import segment, storage

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


MODEL_ACTORS = ("MapBatches(Predictor)", "MapBatches(Segmenter)")  # the GPU plan's model stage, the CPU plan's


def is_model_actor(title: str) -> bool:
    return title.startswith("ray::") and any(a in title for a in MODEL_ACTORS)


def predictor_workers(ray_mod) -> list[psutil.Process]:
    """Worker processes of *this* Ray session (children of its raylet) whose title names the model's actor."""
    from ray._private import ray_constants

    raylet = ray_mod._private.worker._global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if is_model_actor(title):
            found.append(p)
    return found


@pytest.mark.flow("actor-killed")
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
    runner.join(timeout=300)
    assert not runner.is_alive(), "segment did not finish within 5 minutes of the kill"
    assert "error" not in result, result.get("error")
    assert not psutil.pid_exists(victim.pid) or victim.status() == psutil.STATUS_ZOMBIE
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
    # still fits model actors (3/4 CPU each) plus the read/write tasks
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
                titles = []
                for c in psutil.Process(raylet_pid).children(recursive=True):
                    try:  # a child may exit (or be a zombie) between listing and reading its title
                        titles.append(" ".join(c.cmdline()))
                    except psutil.Error:
                        pass
                if any(x.startswith("ray::") and ("MapBatches(Predictor)" in x or "MapBatches(Segmenter)" in x) for x in titles):
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


@pytest.mark.flow("node-removed")
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


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of the S3 endpoint that breaks requests on purpose, then stops by itself.

    It reads each request's head, then either forwards it (with `Connection: close`, so the next request comes on
    a new connection and is judged too) or fails it: a 503 SlowDown reply or a reset connection, alternately.
    - an outage of `window_s` seconds for reads, starting at the first GET of an object, and another for writes,
      starting at the first PUT/POST: every object GET, PUT and POST fails while one is open (bucket listings and
      HEADs pass: discovery is not what this exercises);
    - every request whose path holds `cursed` fails, as long as the proxy is faulty;
    - it is faulty for at most `max_faults` failures and `max_seconds` seconds; after that it only forwards.
    """

    def __init__(self, upstream: str, window_s: float = 12, cursed: str = "cursed", max_faults: int = 2000, max_seconds: float = 240):
        import socket

        self.up = upstream.removeprefix("http://").split(":")
        self.window_s, self.cursed, self.max_faults = window_s, cursed, max_faults
        self.until = time.monotonic() + max_seconds
        self.opened: dict[str, float] = {}  # "read" / "write" -> when its outage began
        self.faults: list[tuple[str, str, str]] = []  # (method, path, how)
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _verdict(self, method: str, path: str) -> str | None:
        with self.lock:
            now = time.monotonic()
            if len(self.faults) >= self.max_faults or now > self.until:
                return None
            key = path.split("?")[0].strip("/")
            if method not in ("GET", "PUT", "POST") or "/" not in key:
                return None
            phase = "read" if method == "GET" else "write"
            began = self.opened.setdefault(phase, now)
            if self.cursed in key or now - began < self.window_s:
                how = "503" if len(self.faults) % 2 == 0 else "reset"
                self.faults.append((method, path, how))
                return how
            return None

    def _handle(self, conn):
        import socket

        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path = lines[0].decode("latin-1").split(" ")[:2]
            how = self._verdict(method, path)
            if how == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
                return
            if how == "503":
                body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                conn.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                return
            kept = [ln for ln in lines[1:] if not ln.lower().startswith(b"connection:")]
            up = socket.create_connection((self.up[0], int(self.up[1])))
            with up:
                up.sendall(b"\r\n".join([lines[0], *kept, b"Connection: close"]) + b"\r\n\r\n" + rest)
                t = threading.Thread(target=self._pipe, args=(conn, up), daemon=True)
                t.start()
                self._pipe(up, conn)
                t.join(timeout=60)

    @staticmethod
    def _pipe(src, dst):
        import socket

        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def stop(self):
        self.stopped = True
        self.sock.close()


@pytest.mark.flow("storage-outage", "s3")
def test_object_storage_fails_for_a_while(ray_local, s3, tmp_path):
    import fsspec

    bucket, opts = s3
    fs = fsspec.filesystem("s3", **opts)
    rng = np.random.default_rng(3)
    good = [f"{bucket}/in/img{i:02d}.png" for i in range(12)]
    for name in good:
        fs.pipe_file(name, png_bytes(random_image(rng, 10, 14)))
    fs.pipe_file(f"{bucket}/in/zz_cursed.png", png_bytes(random_image(rng, 10, 14)))  # read last, after the outage
    # A 10 s outage for reads, then one for writes. botocore's retries are turned down (standard mode, max_attempts 1,
    # i.e. 2 tries), so botocore and s3fs together give up after about 5 s: the rest of the outage is rayseg's to
    # ride out (storage.retry for image reads, the read-back and the summary; Ray Data's write retry, taught
    # fsspec's messages, for the Parquet files). With botocore's defaults the library alone rides out ~15 s.
    proxy = FaultProxy(opts["endpoint_url"], window_s=10)
    try:
        flaky_opts = {**opts, "endpoint_url": proxy.url, "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
        summary = segment(inputs=[f"{bucket}/in/*.png"], output=f"{bucket}/out", storage_options=flaky_opts, model="unet",
                          num_classes=2, input_size=32, batch_size=4, quiet=True)
        # the proxy stops faulting only by its bounds, not because the run asked it to
        with proxy.lock:
            faults = list(proxy.faults)
    finally:
        proxy.stop()
    methods = {m for m, _, _ in faults}
    assert {"GET", "PUT"} <= methods or {"GET", "POST"} <= methods, faults[:20]  # reads and writes were both hit
    assert {h for _, _, h in faults} == {"503", "reset"}
    table = pd.read_parquet(f"{bucket.removeprefix('s3://')}/out/images", filesystem=fs)
    assert table["image_id"].is_unique and len(table) == len(good) + 1
    rows = table.set_index("image_id")
    assert rows.loc[[f"s3://{g.removeprefix('s3://')}" for g in good], "error"].isna().all()
    err = rows.loc[f"{bucket}/in/zz_cursed.png", "error"]
    assert isinstance(err, str) and f"could not read the file after {storage.RETRY_ATTEMPTS} tries" in err, err
    print(f"{len(faults)} faults injected: {sorted(collections.Counter((m, h) for m, _, h in faults).items())}")
    assert summary["rows"] == len(good) + 1 and summary["errors"] == 1
    assert json.loads(fs.cat_file(f"{bucket}/out/_rayseg.json"))["rows"] == len(good) + 1
