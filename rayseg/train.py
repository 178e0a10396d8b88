"""`rayseg train`: a segmentation model trained on labelled pairs with Ray Train (DDP over `--workers` workers).

    rayseg train --data data/train --val-data data/val --model unet --num-classes 3 --output runs/shapes
    rayseg train --data s3://b/train/ --val-data s3://b/val/ --workers 8 --use-gpu --output s3://b/runs/x

First a plan from the training set's fingerprint (rayseg.plan: intensity, input and batch size, geometry,
foreground oversampling; an option given wins), printed and recorded in the card. Each epoch: augment (random
scale, crop/pad, flips) on a thread of its own (rayseg.feed), cross-entropy + Dice,
step; then validate exactly as `rayseg segment` predicts (the same Predictor) and `ray.train.report` the metrics
with a checkpoint: OUTPUT/run/epoch-NNNN/ holds model.pt + model.json (a rayseg checkpoint) and train_state.pt.
The best checkpoint by validation mIoU is then copied to OUTPUT/best/, and OUTPUT/train_summary.json written.
The same command again resumes the run from its last checkpoint (Ray Train resumes a RunConfig(name,
storage_path) it finds in storage); a finished run says so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from typing import Any, NamedTuple

import numpy as np
import torch

from rayseg import storage
from rayseg.cliutil import add_command, config_from, print_summary
from rayseg.config import TrainConfig, public_config
from rayseg.errors import UserError
from rayseg.feed import Prefetch, augmented_batches
from rayseg.metrics import ConfusionMatrix, nan_to_none
from rayseg.ranks import SYNC_BN_BELOW, all_mean, is_mine, wants_sync_batchnorm, where_ranks_run  # noqa: F401 (tests import them here)
from rayseg.intensity import Inputs
from rayseg.loss import criterion, warmup_cosine
from rayseg.models import CARD_FILE, WEIGHTS_FILE, ModelCard, default_mean_std

log = logging.getLogger("rayseg")

RUN_NAME, BEST_DIR, SUMMARY_FILE, STATE_FILE = "run", "best", "train_summary.json", "train_state.pt"


# ---- the Ray Train worker loop ------------------------------------------------------------------------


def build_training(cfg: TrainConfig, train_rows: int, world: int, device: torch.device, in_channels: int = 3):
    """(model wrapped for DDP, optimizer, LR scheduler, run state): new, or from the run's last checkpoint. The state
    records `sync_batchnorm` and `channels_last`; checkpoints keep BatchNorm's keys either way, as segment loads them."""
    import ray.train
    import ray.train.torch

    from rayseg.models import build_model

    torch.manual_seed(cfg.seed)  # the seed controls the initialisation (DDP then broadcasts rank 0's weights)
    model = build_model(cfg.model, cfg.num_classes, in_channels=in_channels)
    state = {"epoch": 0, "history": [], "starts": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, WEIGHTS_FILE), map_location="cpu", weights_only=True))
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    state["sync_batchnorm"] = wants_sync_batchnorm(device.type, world, cfg.batch_size)
    if state["sync_batchnorm"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # channels_last everywhere: what cuDNN's tensor cores want, and on CPU never slower for these models (a 48 px
    # U-Net step at batch 4 on one thread: 36 ms against 47; lraspp_mobilenet_v3_large the same either way)
    model, state["channels_last"] = model.to(memory_format=torch.channels_last), True
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = max(1, math.ceil(train_rows // world / cfg.batch_size)) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, max(1, steps // 20)))
    if checkpoint:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    state["starts"] = list(state["starts"]) + [state["epoch"] + 1]
    return model, optimizer, scheduler, state


def train_one_epoch(model: torch.nn.Module, optimizer, scheduler, shard, cfg: TrainConfig, epoch: int, rank: int,
                    device: torch.device, card: ModelCard) -> float:
    """One pass over this rank's shard of the training data; returns the mean loss over all ranks. Images are
    normalised whole, by the card, before augmentation: what the predictor does before resizing."""
    mean, std = card.pixel_mean_std(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    model.train()
    loss_sum, seen = torch.zeros((), dtype=torch.float64, device=device), 0  # read once an epoch: no sync per step
    # a shuffle buffer of a few batches: batches differ from epoch to epoch, reproducibly for a resumed epoch
    rows = shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", prefetch_batches=1,
                              local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=cfg.seed * 100_003 + epoch)
    rng = np.random.default_rng([cfg.seed, rank, epoch])  # a resumed epoch sees the same augmentations
    batches = augmented_batches(rows, Inputs(card), cfg.input_size, rng, card.mean, pin=device if device.type == "cuda" else None,
                                geometry=card.geometry or "resize", foreground=cfg.oversample or 0.0)
    with Prefetch(batches) as ahead:
        for images, masks in ahead:
            x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
            y = masks.to(device, non_blocking=True).long()
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                logits = model(x)
            loss = criterion(logits.float(), y, cfg.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
    return all_mean(loss_sum, seen)


def validate(model: torch.nn.Module, card: ModelCard, val_iter, batch_size: int, rank: int, world: int) -> ConfusionMatrix:
    """Predict with segment's Predictor on a snapshot of the weights, so validation scores what segment will produce."""
    from rayseg.config import PredictConfig
    from rayseg.models import ModelBundle, state_dict_bytes
    from rayseg.predict import Predictor

    rng_state = torch.random.get_rng_state()  # ModelBundle.build reseeds torch; training must not notice
    predictor = Predictor(ModelBundle(card, state_dict_bytes(model), "validation"), PredictConfig(batch_size=batch_size))
    torch.random.set_rng_state(rng_state)
    cm = ConfusionMatrix(card.num_classes)
    for batch in val_iter.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=1):
        mine = [i for i, iid in enumerate(batch["image_id"]) if is_mine(iid, rank, world)]
        if not mine:
            continue
        images = np.empty(len(mine), dtype=object)
        images[:] = [batch["image"][i] for i in mine]
        out = predictor({"image_id": np.asarray(batch["image_id"])[mine], "image": images, "error": np.full(len(mine), None, dtype=object)})
        for pred, error, i in zip(out["mask"], out["error"], mine):
            if error is None:  # an image the model cannot take (channels) has no mask to score
                cm.update(pred, batch["target"][i])
    return cm.reduce_from_all_processes()


def epoch_metrics(epoch: int, train_loss: float, scores: dict, lr: float, seconds: float) -> dict:
    """What an epoch reports. A val_miou of -1 (no class scored) still ranks the checkpoint, last."""
    return {"epoch": epoch, "train_loss": round(train_loss, 6), "val_miou": scores["miou"] if scores["miou"] is not None else -1.0,
            "val_pixel_accuracy": scores["pixel_accuracy"], "val_mean_dice": scores["mean_dice"], "val_iou": scores["iou"],
            "val_dice": scores["dice"], "lr": lr, "epoch_s": round(seconds, 3)}


def report_epoch(model: torch.nn.Module, optimizer, scheduler, card: ModelCard, state: dict, metrics: dict, rank: int) -> None:
    """ray.train.report the metrics; rank 0 adds the checkpoint (model.pt, model.json, and train_state.pt to resume from)."""
    import ray.train
    from ray.train import Checkpoint

    from rayseg.models import save_checkpoint

    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            save_checkpoint(model, card, d)
            torch.save({**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(d, STATE_FILE))
            ckpt = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}")


def train_loop(loop: dict) -> None:
    """Each Ray Train worker: from the run's last checkpoint (if any), train, validate and report every epoch."""
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**loop["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the validation Predictor asks for "cuda": make that this rank's GPU
    channels = loop["in_channels"]
    model, optimizer, scheduler, state = build_training(cfg, loop["train_rows"], world, device, channels)
    state["ranks"] = where_ranks_run(rank)  # this start's placement: where a resumed run ran last
    card = ModelCard(cfg.model, cfg.num_classes, tuple(cfg.class_names), cfg.input_size, *default_mean_std(channels),
                     tuple(loop["trained_on"]), in_channels=channels, intensity=loop["intensity"], geometry=cfg.geometry,
                     plan=loop.get("plan"))
    train_shard, val_iter = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_loss = train_one_epoch(model, optimizer, scheduler, train_shard, cfg, epoch, rank, device, card)
        model.eval()
        scores = validate(getattr(model, "module", model), card, val_iter, cfg.batch_size, rank, world).to_json_dict()
        metrics = epoch_metrics(epoch, train_loss, scores, scheduler.get_last_lr()[0], time.perf_counter() - t0)
        state["epoch"] = epoch
        state["history"] = list(state["history"]) + [dict(metrics)]
        epoch_card = dataclasses.replace(card, metrics={"validation": scores, "epoch": epoch})
        report_epoch(model, optimizer, scheduler, epoch_card, state, metrics, rank)


# ---- the driver ---------------------------------------------------------------------------------------


def publish_best(checkpoint, output: str, storage_options: dict) -> str:
    """Copy model.pt + model.json of a Ray checkpoint to OUTPUT/best/.

    The card goes last: object stores have no directory rename, so instead a reader (load_bundle) that finds
    model.json finds the model.pt that belongs to it.
    """
    fs, out = storage.filesystem(output, storage_options)
    best = storage.join(out, BEST_DIR)
    with checkpoint.as_directory() as d:
        if fs.exists(best):
            fs.rm(best, recursive=True)
        fs.makedirs(best, exist_ok=True)
        for name in (WEIGHTS_FILE, CARD_FILE):
            fs.put_file(os.path.join(d, name), storage.join(best, name))
    return storage.join(output, BEST_DIR)


def _ray_checkpoint(url: str, storage_options: dict):
    from ray.train import Checkpoint

    pa_fs, path = storage.pyarrow_filesystem(url, storage_options)
    return Checkpoint(path, filesystem=pa_fs)


def _previous_run(cfg: TrainConfig) -> dict | None:
    """The summary of a finished run in OUTPUT that this command would not extend, else None.

    A run (finished or stopped) of another model or class count in OUTPUT is a UserError: resuming it would
    load weights of the wrong shape.
    """
    so = cfg.storage_options
    fs, out = storage.filesystem(cfg.output, so)
    summary_path = storage.join(out, SUMMARY_FILE)
    previous = storage.read_json(storage.join(cfg.output, SUMMARY_FILE), so) if fs.exists(summary_path) else None
    cards = sorted(fs.glob(storage.join(out, RUN_NAME, "epoch-*", CARD_FILE)))
    found = None
    if previous is not None:
        found = (previous.get("model"), previous.get("num_classes"))
    elif cards:  # a stopped run: its last checkpoint's card says what it trains
        card = json.loads(fs.cat_file(cards[-1]))
        found = (card.get("architecture"), card.get("num_classes"))
    if found is not None:
        model, classes = found
        if found != (cfg.model, cfg.num_classes):
            raise UserError(f"{cfg.output} holds a run of {model} with {classes} classes; give a new --output for a different model")
    if previous is not None and previous.get("epochs_completed", 0) >= cfg.epochs:
        return previous
    return None


class TrainData(NamedTuple):
    train: Any  # ray.data.Dataset of the usable training pairs, materialized
    val: Any  # the same for validation
    train_pairs: int
    val_pairs: int
    bad: list  # (image_id, error) of each skipped pair, training data first
    ignored: list  # URLs of files that belong to no labelled layout
    in_channels: int  # of the model: the training images' (rayseg.intensity.model_channels)
    intensity: dict  # the normalisation record for model.json, with dataset statistics where measured
    config: Any  # the TrainConfig with the plan's values where the user gave none
    plan: Any  # rayseg.plan.Plan: what was chosen from the training set, and why


def build_datasets(cfg: TrainConfig) -> TrainData:
    """Find, read and check the labelled pairs. Ray starts here, once the inputs are known to exist."""
    import ray

    from rayseg.intensity import dataset_rows, measure, model_channels, parse
    from rayseg.labelled import find_pairs, read_labelled, split_errors
    from rayseg.plan import log_plan, plan_dataset
    from rayseg.runtime import ensure_ray

    so = cfg.storage_options
    train_units, ignored = find_pairs(cfg.data, so)  # a wrong path fails here, before Ray starts
    val_units, val_ignored = find_pairs(cfg.val_data, so)
    ensure_ray(cfg.address, cfg.quiet, cfg.dashboard)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cpus, gpus = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    if cpus < cfg.workers or (cfg.use_gpu and gpus < cfg.workers):
        # not an error: an autoscaling cluster grows to fit; a fixed one will wait here for ever
        log.warning("train: %d worker(s) need %d CPU%s, the cluster has %g CPU and %g GPU now; waiting for the cluster to grow",
                    cfg.workers, cfg.workers, f" and {cfg.workers} GPU" if cfg.use_gpu else "", cpus, gpus)
    train_ds, val_ds = (read_labelled(d, cfg.num_classes, so, cfg.h5_key, cfg.mask_key, cfg.max_pixels, units=u, mask_mode=cfg.mask_mode)[0]
                        for d, u in ((cfg.data, train_units), (cfg.val_data, val_units)))
    train_ds, n_train, train_bad = split_errors(train_ds, "train data")
    val_ds, n_val, val_bad = split_errors(val_ds, "validation data")
    if n_train < cfg.workers:
        raise UserError(f"only {n_train} usable training pair(s) for {cfg.workers} worker(s); see the skipped pairs above")
    if n_val == 0:
        raise UserError("no usable validation pairs; see the skipped pairs above")
    plan, first = plan_dataset(train_ds, cfg)  # the fingerprint: one distributed pass, which also counts channels
    log_plan(plan)
    cfg = dataclasses.replace(cfg, **plan.values())
    seen, norm = measure(dataset_rows(train_ds), parse(cfg.intensity), first=first)  # a second pass for dataset only
    channels = model_channels(seen["channels"], cfg.in_channels)
    if not norm.measured():
        raise UserError("--intensity dataset measures each channel over the training set: the images need one channel count")
    # materialized so that, while the workers hold every CPU, no Ray Data task is left to schedule
    return TrainData(train_ds.materialize(), val_ds.materialize(), n_train, n_val, train_bad + val_bad, ignored + val_ignored,
                     channels, norm.to_json(), cfg, plan)


def build_trainer(cfg: TrainConfig, data: TrainData):
    """The TorchTrainer of the run: its checkpoints go to OUTPUT/run/, where a second start finds and resumes them."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    pa_fs, path = storage.pyarrow_filesystem(cfg.output, cfg.storage_options)
    local = type(pa_fs).__name__ == "LocalFileSystem"
    storage_path = os.path.abspath(path) if local else path
    os.makedirs(storage_path, exist_ok=True) if local else None
    return TorchTrainer(
        train_loop,
        train_loop_config={"config": public_config(cfg),  # workers read no storage: no secrets travel
                           "train_rows": data.train_pairs, "trained_on": list(cfg.data),
                           "in_channels": data.in_channels, "intensity": data.intensity, "plan": data.plan.to_json()},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.use_gpu else {})}),
        run_config=RunConfig(
            name=RUN_NAME, storage_path=storage_path, storage_filesystem=None if local else pa_fs,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="val_miou", checkpoint_score_order="max"),
        ),
        datasets={"train": data.train, "val": data.val},
        dataset_config=DataConfig(datasets_to_split=["train"]),  # each rank picks its validation rows by id hash
    )


def run_summary(cfg: TrainConfig, data: TrainData, result, best_checkpoint, best_metrics: dict, best: str, t0: float) -> dict:
    """What train_summary.json says of a finished run; `best` is the URL best_checkpoint was published to."""
    import ray

    with result.checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
    run_url = storage.join(cfg.output, RUN_NAME)
    return {
        "command": "train", "output": cfg.output, "best": best,
        "best_checkpoint": storage.join(run_url, os.path.basename(best_checkpoint.path.rstrip("/"))),
        "best_epoch": best_metrics["epoch"],
        "best_metrics": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
        "last_checkpoint": storage.join(run_url, os.path.basename(result.checkpoint.path.rstrip("/"))),
        "epochs_completed": int(state["epoch"]),
        "starts": list(state["starts"]),  # the epoch each attempt began at: [1, 3] = resumed at epoch 3
        "history": nan_to_none(list(state["history"])),
        "model": cfg.model, "num_classes": cfg.num_classes, "in_channels": data.in_channels, "intensity": data.intensity,
        "plan": data.plan.choices(),
        "class_names": ModelCard(cfg.model, cfg.num_classes, tuple(cfg.class_names)).names(),
        "train_pairs": data.train_pairs, "val_pairs": data.val_pairs, "bad_pairs": len(data.bad),
        "bad_pair_examples": [{"image_id": i, "error": e} for i, e in data.bad[:20]],
        "ignored_files": data.ignored, "workers": cfg.workers, "config": public_config(cfg),
        "ranks": list(state.get("ranks", [])), "sync_batchnorm": bool(state.get("sync_batchnorm")),
        "channels_last": bool(state.get("channels_last")),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "rayseg_version": __import__("rayseg").__version__, "ray_version": ray.__version__,
    }


def train(config: TrainConfig | None = None, **kwargs) -> dict:
    """Run `rayseg train`; returns the summary that is also written to OUTPUT/train_summary.json."""
    cfg = config if config is not None else config_from(TrainConfig, kwargs)
    t0, so = time.perf_counter(), cfg.storage_options
    previous = _previous_run(cfg)
    if previous is not None:
        best = publish_best(_ray_checkpoint(previous["best_checkpoint"], so), cfg.output, so)
        log.info("train: the run in %s already finished %d epochs; republished its best checkpoint at %s", cfg.output, previous["epochs_completed"], best)
        return {**previous, "already_finished": True, "best": best}

    data = build_datasets(cfg)
    cfg = data.config  # the plan's values where the user gave none
    result = build_trainer(cfg, data).fit()
    best_checkpoint, best_metrics = max(result.best_checkpoints, key=lambda cm: (cm[1]["val_miou"], cm[1]["epoch"]))
    best = publish_best(best_checkpoint, cfg.output, so)
    summary = run_summary(cfg, data, result, best_checkpoint, best_metrics, best, t0)
    storage.write_json(storage.join(cfg.output, SUMMARY_FILE), summary, so)
    return summary


def register(sub) -> None:
    add_command(sub, "train", TrainConfig, lambda cfg: print_summary(train(cfg), omit=("config", "history", "plan")),
                help="train a segmentation model on labelled pairs with Ray Train", description=__doc__.split("\n\n")[0])
