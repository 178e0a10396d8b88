"""Shared fixtures: one embedded Ray per test session, a real S3 endpoint on loopback (moto server), tiny archives."""

from __future__ import annotations

import io
import os
import socket
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


# The files that take longest go first, longest first (from `--durations=0`). With pytest-xdist (`-n 2`, and
# addopts' `--dist loadfile --no-loadscope-reorder`: a file's tests stay on one worker, so a module's fixtures are
# built once, and files are handed out in this order) both workers then stay busy to the end instead of one waiting
# on a slow file started last. The rest keep their order.
SLOW_FILES_FIRST = ("system/test_nightly_lease.py", "system/test_nightly_scale.py", "system/test_train_deep.py", "system/test_jobs.py",
                    "system/test_nightly.py", "system/test_faults.py", "system/test_train.py", "system/test_console.py",
                    "system/test_bench.py", "unit/test_lease.py", "system/test_real_images.py", "system/test_tiling.py",
                    "system/test_nightly_fence.py", "system/test_own_model.py", "system/test_gpu_plan.py", "unit/test_regions.py",
                    "system/test_segment.py", "system/test_demo.py", "system/test_large_images.py", "system/test_security.py",
                    "system/test_evaluate.py", "system/test_plan.py", "system/test_slide_planning.py")
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(TESTS).as_posix(), len(rank)))


@pytest.fixture(scope="session")
def ray_local():
    """An embedded Ray sized for the 2-core machine; segment() joins it instead of starting its own."""
    import ray

    from rayseg.runtime import LOCAL_SYSTEM_CONFIG

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, log_to_driver=False,
                 _system_config=LOCAL_SYSTEM_CONFIG)  # as `rayseg segment` starts it
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """One `ray start --head` on this machine (2 CPUs, no dashboard, its own temp dir, HOME and token) for the flows
    whose commands run as processes of their own. A command run with `ray_head.client_env()` joins it by default, as
    a user's commands join the Ray that `ray start` runs, so Ray's start and stop are paid once per session, not by
    every command. Kills still kill the command's whole process session: its driver; the job's actors are then
    ended by Ray. Flows that must kill or pause a whole embedded Ray keep their own."""
    import shutil
    import tempfile

    from ray_cluster import Cluster, started_pids

    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    head = Cluster(tmp)
    try:
        head.start(0, 2, False, f"--object-store-memory={1024 * 2**20}")
        yield head
    finally:
        head.stop()
        left = started_pids(tmp, head.sids)
        shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"processes of the session's `ray start --head` still alive: {left}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on 127.0.0.1 (moto in server mode); s3fs talks to it over HTTP like to AWS."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server):
    """A fresh bucket; returns (bucket URL, storage options)."""
    import uuid

    import s3fs

    opts = {"endpoint_url": s3_server, "key": "testing-key", "secret": "testing-secret-value", "client_kwargs": {"region_name": "us-east-1"}}
    bucket = f"rayseg-{uuid.uuid4().hex[:10]}"
    # created without a region: s3fs would turn client_kwargs' region into a LocationConstraint moto refuses
    s3fs.S3FileSystem(endpoint_url=s3_server, key=opts["key"], secret=opts["secret"]).mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{bucket}", opts


def png_bytes(img: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()
