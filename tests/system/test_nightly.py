"""`rayseg nightly`: only uncommitted shards are segmented, and every shard's rows are in the table exactly once,
across reruns, new shards, changed shards, a new model or output option, and a driver killed with SIGKILL at
random moments."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import png_bytes, random_image, tar_bytes
from nightly_flows import run_here
from ray_cluster import session_pids
from rayseg import models
from rayseg.errors import UserError
from rayseg.layout import IMAGES_DIR
from rayseg.nightly import NightlyConfig, nightly
from rayseg.table import MANIFEST_DIR, open_table, read_state, read_table

RAYSEG = str(Path(sys.executable).with_name("rayseg"))
OPTS = {"model": "unet", "input_size": 32, "batch_size": 8, "quiet": True}
# One predictor actor for the runs of a few tiny tar shards: the number of images in a tar is not known before it is
# read, so without --actors a run starts one actor per CPU (a process importing torch each), where the product's own
# rule for a job known to hold this few batches (runtime.BATCHES_PER_ACTOR) gives one.
ONE_ACTOR = {"actors": "1"}


def write_tar(path: Path, n: int, seed: int) -> list[str]:
    """A tar shard of n tiny PNGs; returns the image_ids nightly must produce for it."""
    rng = np.random.default_rng(seed)
    path.write_bytes(tar_bytes({f"img{i}.png": png_bytes(random_image(rng, 24, 32)) for i in range(n)}))
    return [f"file://{path}::img{i}" for i in range(n)]


def checkpoint(path: Path, seed: int) -> str:
    torch.manual_seed(seed)
    models.save_checkpoint(models.UNet(2), models.ModelCard("unet", 2, input_size=32), str(path))
    return str(path)


def table(out: Path, storage_options: dict | None = None) -> pd.DataFrame:
    """The output read the documented way: one snapshot of the table."""
    return read_table(str(out), storage_options).to_table().to_pandas()


def assert_exactly_once(out: Path, expected: set[str], storage_options: dict | None = None) -> pd.DataFrame:
    df = table(out, storage_options)
    dupes = df.image_id[df.image_id.duplicated()].tolist()
    assert not dupes, f"rows committed twice: {dupes[:5]}"
    assert set(df.image_id) == expected
    return df


def run(inputs: Path, out: Path, **kw) -> dict:
    return nightly(NightlyConfig(inputs=(str(inputs),), output=str(out), **{**OPTS, **ONE_ACTOR, **kw}))


def data_files(out: Path) -> list[str]:
    return sorted(open_table(str(out), None).file_uris())


@pytest.mark.flow("nightly")
def test_nightly_commits_each_shard_once(ray_local, tmp_path, monkeypatch):
    from rayseg import waves

    received = []  # what the driver's wave writer is handed: the workers' file metadata, never rows
    real_add = waves.WaveWriter.add
    monkeypatch.setattr(waves.WaveWriter, "add", lambda self, meta: (received.append(meta), real_add(self, meta))[1])
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    expected = {i for s in range(3) for i in write_tar(inp / f"s{s}.tar", 4, s)}
    (inp / "broken.tar").write_bytes(b"this is not a tar archive")
    expected.add(f"file://{inp}/broken.tar::#unreadable")  # the error row a broken shard gets
    ckpt_a, ckpt_b = checkpoint(tmp_path / "a", 1), checkpoint(tmp_path / "b", 2)

    first = run(inp, out, checkpoint=ckpt_a)
    assert (first["shards_new"], first["shards_skipped"], first["shards_failed"], first["shards_pending"]) == (4, 0, 1, 0)
    assert first["failed_shards"] == [f"file://{inp}/broken.tar"]
    assert (first["rows"], first["errors"]) == (13, 1)
    assert_exactly_once(out, expected)
    assert received and all(m.schema == waves.FILE_SCHEMA for m in received)  # no mask, no image bytes
    assert sum(m.num_rows for m in received) == 4 and sum(m.nbytes for m in received) < 4096  # a row per (file, shard)
    assert len(read_state(str(out), None).records) == 4
    assert json.loads((out / "_runs" / f"{first['run_id']}.json").read_text())["shards_new"] == 4
    assert json.loads((out / "_lease.json").read_text())["released"]  # at the end of the run

    # Nothing new: answered from the manifest, the table untouched.
    version = open_table(str(out), None).version()
    second = run(inp, out, checkpoint=ckpt_a)
    assert second["nothing_new"] and second["shards_new"] == 0 and second["shards_skipped"] == 4
    assert second["elapsed_s"] < 10 and second["cluster"] is None and first["cluster"]["CPU"] == 2
    assert open_table(str(out), None).version() == version

    # A new shard is segmented alone.
    expected |= set(write_tar(inp / "s3.tar", 3, 3))
    third = run(inp, out, checkpoint=ckpt_a)
    assert (third["shards_new"], third["shards_skipped"], third["rows"]) == (1, 4, 3)
    assert_exactly_once(out, expected)

    # A shard rewritten with fewer images: its old rows go, its new ones replace them.
    expected -= {i for i in expected if "/s0.tar::" in i}
    expected |= set(write_tar(inp / "s0.tar", 2, 10))
    fourth = run(inp, out, checkpoint=ckpt_a)
    assert (fourth["shards_new"], fourth["shards_changed"], fourth["rows"]) == (1, 1, 2)
    assert_exactly_once(out, expected)
    # the other shards' rows in s0's old files were copied to new files (by Ray tasks): the manifest names those
    live = {os.path.basename(u) for u in data_files(out)}
    assert all(os.path.basename(f) in live for r in read_state(str(out), None).records.values() for f in r["files"])

    # A new model reprocesses every shard; the old model's rows are replaced, not kept beside the new ones.
    fifth = run(inp, out, checkpoint=ckpt_b)
    assert fifth["model_digest"] != first["model_digest"]
    assert (fifth["shards_new"], fifth["shards_changed"], fifth["shards_skipped"]) == (5, 5, 0)
    df = assert_exactly_once(out, expected)
    assert set(df.model) == {fifth["model"]}
    assert len(data_files(out)) == 1  # one wave, one file: files grow with the data, not with the shards

    # So does an option that changes rows (here --mask-format), and --status tells it before any run.
    status = run(inp, out, checkpoint=ckpt_b, mask_format="rle", status=True)
    assert (status["shards_new"], status["shards_changed"], status["shards_done"], status["running"]) == (0, 5, 0, None)
    sixth = run(inp, out, checkpoint=ckpt_b, mask_format="rle")
    assert (sixth["shards_changed"], sixth["rows"]) == (5, 14)
    df = assert_exactly_once(out, expected)
    assert df.mask_png.isna().all() and df[df.error.isna()].mask_rle.notna().all()
    assert run(inp, out, checkpoint=ckpt_b, mask_format="rle")["nothing_new"]

    # A changed --intensity changes what the model sees: it reprocesses too, and --status says so first.
    status = run(inp, out, checkpoint=ckpt_b, mask_format="rle", intensity="fixed:0:100", status=True)
    assert (status["shards_changed"], status["shards_done"]) == (5, 0)
    seventh = run(inp, out, checkpoint=ckpt_b, mask_format="rle", intensity="fixed:0:100")
    assert (seventh["shards_changed"], seventh["rows"]) == (5, 14)
    assert_exactly_once(out, expected)
    assert run(inp, out, checkpoint=ckpt_b, mask_format="rle", intensity="fixed:0:100")["nothing_new"]


def test_nightly_ignores_what_a_killed_run_left(ray_local, tmp_path):
    """A kill leaves a wave file the log never named and a manifest part no commit names: neither counts."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    expected = {i for s in range(2) for i in write_tar(inp / f"s{s}.tar", 3, s)}
    run(inp, out)
    committed = Path(data_files(out)[0].removeprefix("file://"))
    orphan = out / IMAGES_DIR / "20000101T000000Z-deadbeef" / "w00001.parquet"  # the same rows again, never committed
    orphan.parent.mkdir()
    shutil.copy(committed, orphan)
    (out / MANIFEST_DIR / "parts").mkdir(parents=True, exist_ok=True)
    shutil.copy(next((out / MANIFEST_DIR).glob("snapshot-*.parquet")), out / MANIFEST_DIR / "parts" / "20000101T000000Z-deadbeef-w00001.parquet")
    assert_exactly_once(out, expected)
    expected |= set(write_tar(inp / "s2.tar", 3, 2))
    again = run(inp, out)
    assert (again["shards_new"], again["shards_skipped"]) == (1, 2)
    assert_exactly_once(out, expected)
    assert not list((out / MANIFEST_DIR / "parts").iterdir())  # folded into the snapshot, or dropped


def test_nightly_refuses_segment_only_options(tmp_path):
    with pytest.raises(UserError, match="never clears"):
        NightlyConfig(inputs=("x",), output=str(tmp_path), overwrite=True)


def _kill_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL the driver's whole session (it and the Ray processes it started), and wait until none is left."""
    sid = proc.pid  # start_new_session: the driver leads its own session and process group
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while left := session_pids(sid):
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {left}"
        for pid in left:  # Ray daemons that left the process group but kept the session
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)



def committed_version(out: Path) -> int:
    logs = sorted((out / IMAGES_DIR / "_delta_log").glob("*.json"))
    return int(logs[-1].stem) if logs else -1


@pytest.mark.flow("nightly-driver-killed")
@pytest.mark.timeout(420)
def test_nightly_driver_killed_at_random_moments(tmp_path, ray_head, ray_local):
    """SIGKILL the nightly driver 3 times at random moments, then run it to the end.

    The first kill lands anywhere in start-up or segmentation of a driver that started its own embedded Ray: its
    whole session dies, that Ray with it (the suite's one SIGKILL of a driver with an embedded Ray of its own). The
    next two count from a run's first wave and kill drivers joined to the session's `ray start --head`, as a user's
    commands join the Ray running on their machine (Ray then ends the dead job's actors): a Ray start each would
    prove nothing more of the table. The last run, which kills nothing, is in this process on the session's
    embedded Ray."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    expected = {i for s in range(4) for i in write_tar(inp / f"s{s}.tar", 3, s)}
    ray_tmp = tempfile.mkdtemp(prefix="rsn", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    embedded = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    embedded.update(HOME=str(tmp_path), RAY_TMPDIR=ray_tmp)  # the embedded Ray's token and sessions stay in tmp dirs
    joined = ray_head.client_env(HOME=str(tmp_path))
    cmd = [RAYSEG, "nightly", str(inp), "--output", str(out), "--model", "unet", "--input-size", "32",
           "--batch-size", "4", "--quiet", "--commit-every", "3", "--lease-seconds", "5", "--lease-wait", "30"]
    rng = random.Random(5)
    try:
        for attempt in range(3):
            if attempt == 2:  # a rewritten shard (new mtime, same images), so this run has work even if the last finished
                write_tar(inp / "s1.tar", 3, 1)
            before = committed_version(out)
            proc = subprocess.Popen(cmd, env=joined if attempt else embedded, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            # The first kill lands anywhere in start-up or segmentation. The others count their random delay from
            # this run's first wave (its second commit: a run that takes the lease commits a fence first), so they
            # land while it writes or commits the next waves.
            if attempt:
                deadline = time.monotonic() + 150
                while committed_version(out) <= before + 2 and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
            delay = rng.uniform(2.0, 20.0) if attempt == 0 else rng.uniform(0.0, 0.5)
            time.sleep(delay)
            _kill_session(proc)
            print(f"kill {attempt + 1} (+{delay:.2f}s): table version {committed_version(out)}")
            if (out / IMAGES_DIR / "_delta_log").exists():
                df = table(out)  # what a reader sees between runs: whole shards, no row twice
                assert not df.image_id.duplicated().any()
                assert set(df.image_id) <= expected
                assert set(df.groupby("shard").size()) <= {3}
        summary, _ = run_here([*cmd, "--actors", "1"])
        assert summary["shards_new"] + summary["shards_skipped"] == 4 and summary["shards_pending"] == 0
        assert_exactly_once(out, expected)
        assert len(read_state(str(out), None).records) == 4
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.flow("nightly-s3")
def test_nightly_on_object_storage(ray_local, s3, tmp_path):
    """Shards and OUT on S3 (a real S3 endpoint): versions are ETags; the table's log and lease use conditional puts."""
    import s3fs

    bucket, opts = s3
    fs = s3fs.S3FileSystem(**opts)
    expected = set()
    for s in range(2):
        write_tar(tmp_path / f"s{s}.tar", 2, s)
        fs.put(str(tmp_path / f"s{s}.tar"), f"{bucket}/in/s{s}.tar")
        expected |= {f"{bucket}/in/s{s}.tar::img{i}" for i in range(2)}
    cfg = NightlyConfig(inputs=(f"{bucket}/in/",), output=f"{bucket}/out", storage_options=opts, **OPTS)
    first = nightly(cfg)
    assert (first["shards_new"], first["rows"], first["errors"]) == (2, 4, 0)
    assert nightly(cfg)["nothing_new"]
    df = table(f"{bucket}/out", opts)
    assert len(df) == 4 and set(df.image_id) == expected
    fs.invalidate_cache()
    assert json.loads(fs.cat(f"{bucket}/out/_lease.json"))["released"]
