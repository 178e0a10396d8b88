"""`rayseg evaluate`: score a checkpoint on labelled pairs, distributed over Ray Data.

    rayseg evaluate --checkpoint runs/shapes/best --data data/test --json runs/shapes/test.json

read pairs (tasks) -> predict with segment's Predictor (actor pool), so masks are exactly what `rayseg segment`
would write -> one confusion matrix per batch (tasks) -> summed on the driver. The counts are exact
integers, so the scores equal those of one process looping over the same images.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from rayseg import layout, storage
from rayseg.cliutil import add_command, config_from
from rayseg.config import EvalConfig, public_config
from rayseg.devices import DeviceLog, gathered
from rayseg.decode import errors_of
from rayseg.errors import UserError
from rayseg.metrics import ConfusionMatrix, confusion_matrix, format_table

log = logging.getLogger("rayseg")


def confusion_batch(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Ray Data stage: a batch of predicted + target masks -> one row: its confusion matrix and its bad pairs."""
    errors = errors_of(batch)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    bad = []
    for image_id, error, pred, target in zip(batch["image_id"], errors, batch["mask"], batch["target"]):
        if error is None:
            matrix += confusion_matrix(pred, target, num_classes, ignore_index=None)
        else:
            bad.append([str(image_id), error])
    return {"matrix": matrix.reshape(1, -1), "pairs": np.array([len(errors) - len(bad)]), "bad": np.array([json.dumps(bad)], dtype=object)}


def build_plan(cfg: EvalConfig, bundle, units: list[dict], device_log):
    """read pairs (tasks) -> the predictor (actor pool) -> one confusion matrix per batch (tasks)."""
    from rayseg import runtime
    from rayseg.labelled import read_labelled
    from rayseg.predict import Predictor

    k = bundle.card.num_classes
    opts, compute, resources, threads = runtime.predictor_plan(cfg)
    ds, _ = read_labelled(cfg.data, k, cfg.storage_options, cfg.h5_key, cfg.mask_key, cfg.max_pixels, cfg.batch_size, units=units,
                          stage_cpus=(runtime.READ_CPUS, runtime.DECODE_CPUS), mask_mode=cfg.mask_mode)  # fractions: whole CPUs would wait for the actors
    ds = ds.map_batches(Predictor, batch_size=cfg.batch_size, fn_constructor_args=(bundle, opts),
                        fn_constructor_kwargs={"threads": threads, "report": device_log},
                        compute=compute, **resources)
    return ds.map_batches(confusion_batch, batch_size=cfg.batch_size, fn_kwargs={"num_classes": k}, num_cpus=runtime.ENCODE_CPUS)


def evaluate(config: EvalConfig | None = None, **kwargs) -> dict:
    """Run `rayseg evaluate`; returns the results (also written to --json when given)."""
    from rayseg import runtime
    from rayseg.labelled import find_pairs
    from rayseg.adapters import load_model

    cfg = config if config is not None else config_from(EvalConfig, kwargs)
    started, t0, so = layout.now(), time.perf_counter(), cfg.storage_options
    bundle = load_model(cfg, so)
    k = bundle.card.num_classes
    units, ignored = find_pairs(cfg.data, so)  # a wrong path fails here, before Ray starts
    runtime.ensure_ray(cfg.address, cfg.quiet, cfg.dashboard)
    runtime.configure_data(cfg.quiet)

    cm, pairs, bad = ConfusionMatrix(k, ignore_index=None), 0, []
    with gathered(DeviceLog()) as device_log:
        for row in build_plan(cfg, bundle, units, device_log).iter_rows():
            cm.merge(np.asarray(row["matrix"]).reshape(k, k))
            pairs += int(row["pairs"])
            bad += json.loads(row["bad"])
        devices = device_log.devices()
    for image_id, error in bad:
        log.warning("evaluate: skipping %s: %s", image_id, error)
    if bad:
        log.warning("evaluate: skipped %d bad pair(s) of %d", len(bad), pairs + len(bad))
    if pairs == 0:
        raise UserError(f"no usable labelled pairs in {' '.join(cfg.data)} ({len(bad)} bad); nothing to score")
    result = {
        "command": "evaluate",
        "checkpoint": cfg.checkpoint,
        "model": bundle.label,
        "model_digest": bundle.digest,
        "classes": bundle.card.names(),
        "intensity": bundle.card.normalisation() if not cfg.intensity else cfg.intensity,
        "devices": devices,
        "pairs": pairs,
        "bad_pairs": len(bad),
        "bad_pair_examples": [{"image_id": i, "error": e} for i, e in bad[:20]],
        "ignored_files": ignored,
        **cm.to_json_dict(),
        "confusion_matrix": cm.matrix.tolist(),
        "config": public_config(cfg),
        **layout.summary_tail(started, t0),
    }
    if cfg.json:
        storage.write_json(cfg.json, result, so)
    return result


def register(sub) -> None:
    add_command(sub, "evaluate", EvalConfig, _run,
                help="score a checkpoint on labelled pairs: pixel accuracy, IoU, mIoU, Dice", description=__doc__.split("\n\n")[0])


def _run(cfg: EvalConfig) -> int:
    result = evaluate(cfg)
    print(format_table(result, result["classes"]))
    print(f"\n{result['pairs']} pairs scored, {result['bad_pairs']} bad pair(s) skipped" + (f"; results in {result['config']['json']}" if result["config"]["json"] else ""))
    return 0
