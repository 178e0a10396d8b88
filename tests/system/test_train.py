"""rayseg train: DDP on 2 CPU workers, a worker killed mid-run, resume, best/ into segment and evaluate, learning.

One Ray Train run (the `blobs_run` fixture) serves most tests: starting a trainer costs tens of seconds here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import cv2
import h5py
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from conftest import png_bytes
from rayseg.evaluate import evaluate
from rayseg.models import load_bundle
from rayseg.synth import write_archive
from rayseg.train import train

# At lr 3e-3 the blob Dice sits near 0.90 for ~9 epochs before it climbs (14 epochs: 0.98); at 6e-3 it is past 0.97
# by epoch 5. An epoch is 1-2 s of a run whose two worker-group starts (first and after the kill) take most of it.
EPOCHS, LR = 8, 6e-3


def train_workers() -> list[psutil.Process]:
    """The Ray Train worker processes of this test session's Ray (Ray names each process after its actor class)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def latest_checkpoint(run_dir) -> str | None:
    """The checkpoint Ray Train resumes from, as its controller recorded it (a snapshot being written reads as None)."""
    try:
        latest = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError):
        return None
    return latest["checkpoint_dir_name"] if latest else None


def kill_after_first_checkpoint(run_dir, killed: dict) -> None:
    """Once Ray Train has recorded epoch 1's checkpoint, SIGKILL a training worker, from outside the run.

    The workers are stopped (SIGSTOP) first and the controller given a moment, so the checkpoint they resume from
    is known for certain when one of them dies: `killed["last_checkpoint"]`.
    """
    deadline = time.time() + 240
    while time.time() < deadline:
        workers = train_workers()
        if workers and latest_checkpoint(run_dir) is not None:
            for w in workers:
                w.send_signal(signal.SIGSTOP)
            time.sleep(1.0)
            killed["last_checkpoint"] = latest_checkpoint(run_dir)
            killed["pid"] = workers[0].pid
            workers[0].send_signal(signal.SIGKILL)
            for w in workers[1:]:
                w.send_signal(signal.SIGCONT)
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def blobs_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("blobs")
    common = dict(labelled=True, generator="blobs", num_classes=2, min_size=48, max_size=48)
    write_archive(str(root / "train"), "h5", 64, seed=1, shards=2, **common)
    write_archive(str(root / "val"), "h5", 16, seed=2, **common)
    write_archive(str(root / "test"), "h5", 16, seed=3, **common)
    bad = root / "bad"  # one unusable pair next to the good shards: skipped and counted, the run goes on
    (bad / "images").mkdir(parents=True)
    (bad / "masks").mkdir()
    (bad / "images" / "x.png").write_bytes(png_bytes(np.zeros((48, 48, 3), np.uint8)))
    (bad / "masks" / "x.png").write_bytes(png_bytes(np.full((48, 48), 5, np.uint8)))

    out = root / "run"
    killed: dict = {}
    watcher = threading.Thread(target=kill_after_first_checkpoint, args=(out / "run", killed), daemon=True)
    watcher.start()
    try:
        summary = train(data=(str(root / "train"), str(bad)), val_data=(str(root / "val"),), output=str(out), model="unet",
                        num_classes=2, input_size=48, epochs=EPOCHS, batch_size=4, lr=LR, workers=2, seed=0,
                        class_names=("background", "blob"), quiet=True)
    finally:
        watcher.join(timeout=5)
    return {"root": root, "out": out, "summary": summary, "killed": killed}


@pytest.mark.flow("ddp")
def test_ddp_run_writes_checkpoints_best_and_metrics(blobs_run):
    s, out = blobs_run["summary"], blobs_run["out"]
    assert s["workers"] == 2 and s["epochs_completed"] == EPOCHS
    assert [r["rank"] for r in s["ranks"]] == [0, 1] and all(r["node_id"] and r["hostname"] for r in s["ranks"])
    assert s["channels_last"] is True and s["sync_batchnorm"] is False  # SyncBatchNorm is for small batches on GPUs
    assert s["train_pairs"] == 64 and s["val_pairs"] == 16
    assert s["bad_pairs"] == 1 and "outside 0..1" in s["bad_pair_examples"][0]["error"]
    assert [h["epoch"] for h in s["history"]] == list(range(1, EPOCHS + 1))
    assert all(0 <= h["val_miou"] <= 1 and h["train_loss"] > 0 for h in s["history"])
    assert sorted(os.listdir(out / "best")) == ["model.json", "model.pt"]
    card = json.loads((out / "best" / "model.json").read_text())
    assert card["architecture"] == "unet" and card["num_classes"] == 2 and card["class_names"] == ["background", "blob"]
    assert card["input_size"] == 48 and card["metrics"]["epoch"] == s["best_epoch"]
    assert card["metrics"]["validation"]["miou"] == pytest.approx(s["best_metrics"]["val_miou"])
    assert s["best_metrics"]["val_miou"] == max(h["val_miou"] for h in s["history"])
    checkpoints = sorted(p for p in os.listdir(out / "run") if p.startswith("epoch-"))
    # --keep-checkpoints 2 (the default): the two best by val mIoU, and the latest whatever its score
    assert 1 <= len(checkpoints) <= 3 and f"epoch-{EPOCHS:04d}" in checkpoints
    assert f"epoch-{s['best_epoch']:04d}" in checkpoints
    assert json.loads((out / "train_summary.json").read_text())["best_epoch"] == s["best_epoch"]


@pytest.mark.flow("train-worker-killed")
def test_killed_worker_resumes_from_last_checkpoint(blobs_run):
    s = blobs_run["summary"]
    killed = blobs_run["killed"]
    assert killed.get("pid"), "the watcher never saw epoch 1's checkpoint"
    last = int(killed["last_checkpoint"].removeprefix("epoch-"))
    assert 1 <= last < EPOCHS, f"the worker was killed at {killed['last_checkpoint']}, not mid-run"
    assert s["starts"] == [1, last + 1], "after the kill the run must go on after its last checkpoint, not start again at 1"
    assert (blobs_run["out"] / "best" / "model.pt").exists()


def test_rerun_of_finished_run_says_so_and_republishes_best(blobs_run, caplog):
    out = blobs_run["out"]
    (out / "best" / "model.pt").unlink()
    s = train(data=(str(blobs_run["root"] / "train"),), val_data=(str(blobs_run["root"] / "val"),), output=str(out),
              model="unet", num_classes=2, input_size=48, epochs=EPOCHS, quiet=True)
    assert s["already_finished"] is True and s["epochs_completed"] == EPOCHS
    assert load_bundle(str(out / "best")).card.num_classes == 2


def test_best_checkpoint_segments_held_out_blobs_with_dice_over_09(blobs_run, tmp_path):
    from rayseg.segment import segment

    root, best = blobs_run["root"], str(blobs_run["out"] / "best")
    summary = segment(inputs=(str(root / "test"),), output=str(tmp_path / "seg"), checkpoint=best, quiet=True)
    digest = load_bundle(best).digest
    table = pq.read_table(tmp_path / "seg" / "images").to_pylist()
    with h5py.File(root / "test" / "shard-00000.h5") as f:
        truth = f["masks"][:]
    assert summary["errors"] == 0 and len(table) == 16
    inter = total = 0
    for row in table:
        assert row["model"] == f"unet@{digest[:16]}"
        mask = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        assert mask.max() < 2
        t = truth[int(row["image_id"].rsplit("::", 1)[1])]
        inter += int(((mask == 1) & (t == 1)).sum())
        total += int((mask == 1).sum() + (t == 1).sum())
    print(f"held-out blob Dice {2 * inter / total:.4f} (>= 0.9 asked)")
    assert 2 * inter / total >= 0.9

    result = evaluate(checkpoint=best, data=(str(root / "test"),), quiet=True)
    assert result["pairs"] == 16 and result["dice"][1] == pytest.approx(2 * inter / total)


def test_output_holding_another_models_run_is_refused(blobs_run, capsys):
    from rayseg.cli import main

    args = ["train", "--data", str(blobs_run["root"] / "train"), "--val-data", str(blobs_run["root"] / "val"),
            "--output", str(blobs_run["out"]), "--num-classes", "3"]
    assert main(args) == 2
    assert "holds a run of unet with 2 classes" in capsys.readouterr().err
