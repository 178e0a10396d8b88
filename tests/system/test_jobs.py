"""jobs/: the `ray job submit` entrypoints, run for real on a two-node local Ray cluster with token auth.

The cluster is started with `ray start` (head + one joined node, one CPU each) under its own temp dir and HOME,
and stopped by killing exactly the processes it started: never `ray stop`, which would stop every Ray here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import png_bytes, random_image, tar_bytes
from ray_cluster import Cluster, started_pids
from rayseg.cliutil import config_from_args
from rayseg.config import SegmentConfig
from rayseg.errors import UserError
from rayseg.table import open_table, read_table

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
JOB_TIMEOUT = 240


def load_entry():
    spec = importlib.util.spec_from_file_location("jobs_entry", REPO / "jobs" / "_entry.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_job_config_file_and_flags_merge():
    """--config gives every option; a flag given beside it wins (the same parser as `rayseg segment`)."""
    entry = load_entry()
    args = entry.parse("segment", ["--config", str(REPO / "jobs/configs/segment.yaml"), "--batch-size", "4", "--output", "o"])
    cfg = config_from_args(SegmentConfig, args, args.config)
    from_file = yaml.safe_load((REPO / "jobs/configs/segment.yaml").read_text())
    assert cfg.batch_size == 4 and from_file["batch_size"] != 4
    assert cfg.inputs == tuple(from_file["inputs"]) and cfg.checkpoint == from_file["checkpoint"]
    args = entry.parse("segment", ["--config", str(REPO / "jobs/configs/segment.yaml"), "in/*.tar", "--output", "o"])
    assert config_from_args(SegmentConfig, args, args.config).inputs == ("in/*.tar",)
    args = entry.parse("nightly", ["--config", str(REPO / "jobs/configs/nightly.yaml"), "--output", "o", "--mask-format", "png"])
    from rayseg.config import NightlyConfig

    cfg = config_from_args(NightlyConfig, args, args.config)
    assert (cfg.mask_format, cfg.output) == ("png", "o")
    from rayseg.config import TrainConfig

    args = entry.parse("train", ["--config", str(REPO / "jobs/configs/train.yaml"), "--output", "o", "--workers", "1", "--use-gpu"])
    cfg = config_from_args(TrainConfig, args, args.config)
    assert (cfg.workers, cfg.use_gpu, cfg.data) == (1, True, tuple(yaml.safe_load((REPO / "jobs/configs/train.yaml").read_text())["data"]))
    with pytest.raises(UserError, match="unknown option"):
        args = entry.parse("segment", ["--config", str(REPO / "jobs/configs/train.yaml"), "--output", "o"])
        config_from_args(SegmentConfig, args, args.config)


# ---- a real cluster ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="rsj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    c = Cluster(tmp)
    try:
        c.start()
        c.jobs = c.client()
        yield c
    finally:
        c.stop()
        left = started_pids(tmp, c.sids)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"cluster processes still alive: {left}"


def runtime_env() -> dict:
    """What `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml` sends."""
    env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    return {**env, "working_dir": str(REPO)}


def submit(cluster, entrypoint: str) -> str:
    return cluster.jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env())


def wait(cluster, job_id: str) -> tuple[str, str]:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_TIMEOUT
    while (status := cluster.jobs.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            cluster.jobs.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {JOB_TIMEOUT}s:\n{cluster.jobs.get_job_logs(job_id)[-3000:]}")
        time.sleep(1)
    return str(status.value), cluster.jobs.get_job_logs(job_id)


def summary_of(logs: str) -> dict:
    return json.loads(logs.strip().splitlines()[-1])


def write_tar(path: Path, n: int, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    path.write_bytes(tar_bytes({f"k{i}.png": png_bytes(random_image(rng, 24, 32)) for i in range(n)}))
    return {f"file://{path}::k{i}" for i in range(n)}


def rows_once(out: Path, expected: set[str]) -> None:
    df = read_table(str(out)).to_table(columns=["image_id"]).to_pandas()  # the documented read path
    assert not df.image_id.duplicated().any()
    assert set(df.image_id) == expected


OPTS = "--model unet --input-size 32 --batch-size 4 --quiet"


@pytest.mark.flow("two-node-cluster", "job-submit")
@pytest.mark.timeout(600)
def test_jobs_on_a_two_node_cluster(cluster, tmp_path):
    assert cluster.alive_nodes() == 2
    inp = tmp_path / "in"
    inp.mkdir()
    expected = write_tar(inp / "a.tar", 3, 0) | write_tar(inp / "b.tar", 3, 1)
    (inp / "c.png").write_bytes(png_bytes(random_image(np.random.default_rng(2), 20, 20)))
    expected.add(f"file://{inp}/c.png")
    config = tmp_path / "segment.yaml"
    config.write_text(yaml.safe_dump({"inputs": [str(inp)], "model": "unet", "input_size": 32, "batch_size": 16, "quiet": True}))

    # A bad argument fails the job at once: exit 2, one line saying why, no traceback.
    bad = submit(cluster, f"python jobs/nightly.py {inp} --output {tmp_path}/bad --batch-size 0")
    # The upload is the working dir minus .rayignore: no virtualenv, no tests.
    seg = submit(cluster, f"test ! -e .venv && test ! -e tests && python jobs/segment.py --config {config} --output {tmp_path}/seg --batch-size 4")

    status, logs = wait(cluster, bad)
    assert status == "FAILED"
    assert "rayseg nightly: error: --batch-size must be at least 1" in logs and "Traceback" not in logs
    assert "exit code 2" in cluster.jobs.get_job_info(bad).message

    status, logs = wait(cluster, seg)
    assert status == "SUCCEEDED", logs[-3000:]
    summary = summary_of(logs)
    assert (summary["command"], summary["rows"], summary["errors"]) == ("segment", 7, 0)
    rows_once(tmp_path / "seg", expected)

    # a batch and a wave per image (--commit-every caps the write stage's batch): the 7 images make 7 write tasks
    # (and --compact-mb 0 keeps the files as the workers wrote them)
    nightly = f"python jobs/nightly.py {inp} --output {tmp_path}/nightly --model unet --input-size 32 --quiet --batch-size 1 --commit-every 1 --compact-mb 0"
    status, logs = wait(cluster, submit(cluster, nightly))
    assert status == "SUCCEEDED", logs[-3000:]
    assert (summary_of(logs)["shards_new"], summary_of(logs)["rows"]) == (3, 7)
    assert summary_of(logs)["cluster"]["nodes"] == 2  # the job joined the cluster rather than starting its own Ray
    rows_once(tmp_path / "nightly", expected)
    # workers wrote the data files, on both nodes: each committed file is named by its writer's node
    files = open_table(str(tmp_path / "nightly"), None).file_uris()
    writers = {os.path.basename(f).split("-")[0] for f in files}
    assert writers == {n["node_id"][:12] for n in cluster.nodes() if n["state"] == "ALIVE"}, (files, summary_of(logs)["waves"])

    status, logs = wait(cluster, submit(cluster, nightly))
    assert status == "SUCCEEDED", logs[-3000:]
    assert summary_of(logs)["nothing_new"] and summary_of(logs)["shards_skipped"] == 3
    assert summary_of(logs)["cluster"] is None  # answered from the ledger without Ray

    expected |= write_tar(inp / "d.tar", 2, 3)
    status, logs = wait(cluster, submit(cluster, nightly))
    assert status == "SUCCEEDED", logs[-3000:]
    assert (summary_of(logs)["shards_new"], summary_of(logs)["shards_skipped"], summary_of(logs)["rows"]) == (1, 3, 2)
    rows_once(tmp_path / "nightly", expected)


@pytest.mark.flow("ddp-across-nodes")
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_training_job_runs_one_worker_on_each_node_and_its_best_checkpoint_segments(cluster, tmp_path):
    """DDP across the two nodes (one CPU each: one worker each, nothing else may need a CPU while they train), its
    checkpoints in storage both reach, then `segment` with the best one."""
    from rayseg.synth import write_archive

    labelled = dict(labelled=True, generator="blobs", num_classes=2, min_size=32, max_size=32)
    write_archive(str(tmp_path / "train"), "h5", 8, seed=1, **labelled)
    write_archive(str(tmp_path / "val"), "h5", 4, seed=2, **labelled)
    out = tmp_path / "model"
    train = (f"python jobs/train.py --data {tmp_path}/train --val-data {tmp_path}/val --output {out} --model unet "
             "--input-size 32 --num-classes 2 --epochs 2 --workers 2 --batch-size 4 --quiet")
    status, logs = wait(cluster, submit(cluster, train))  # about 45 s here
    assert status == "SUCCEEDED", logs[-3000:]

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["epochs_completed"] == 2 and [h["epoch"] for h in summary["history"]] == [1, 2]
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    cluster_nodes = {n["node_id"] for n in cluster.nodes() if n["state"] == "ALIVE"}
    assert len({r["node_id"] for r in ranks}) == 2 and {r["node_id"] for r in ranks} == cluster_nodes, (ranks, cluster_nodes)
    assert "epoch-0002" in os.listdir(out / "run") and (out / "run" / "epoch-0002" / "model.pt").is_file()
    assert sorted(os.listdir(out / "best")) == ["model.json", "model.pt"]
    assert json.loads((out / "best" / "model.json").read_text())["architecture"] == "unet"

    inp = tmp_path / "in"
    inp.mkdir()
    expected = write_tar(inp / "a.tar", 3, 4)
    segment = f"python jobs/segment.py {inp} --checkpoint {out}/best --output {tmp_path}/seg --batch-size 4 --quiet"
    status, logs = wait(cluster, submit(cluster, segment))
    assert status == "SUCCEEDED", logs[-3000:]
    assert (summary_of(logs)["rows"], summary_of(logs)["errors"]) == (3, 0)
    rows_once(tmp_path / "seg", expected)
