"""`rayseg evaluate`: score a checkpoint on labelled pairs, distributed over Ray Data.

    rayseg evaluate --checkpoint runs/shapes/best --data data/test --json runs/shapes/test.json

read pairs (tasks) -> predict with segment's Predictor (actor pool), so masks are exactly what `rayseg segment`
would write -> one confusion matrix per batch (tasks) -> summed on the driver. The counts are exact
integers, so the scores equal those of one process looping over the same images.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass

import numpy as np

from rayseg import storage
from rayseg.cliutil import add_command, config_from
from rayseg.config import _f, actor_range, public_config
from rayseg.decode import errors_of
from rayseg.errors import UserError
from rayseg.metrics import ConfusionMatrix, confusion_matrix, format_table

log = logging.getLogger("rayseg")


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = _f("", "rayseg checkpoint directory URL (e.g. runs/x/best)")
    data: tuple[str, ...] = _f((), "labelled data: HDF5/tar shards or folders with images/ and masks/")
    json: str | None = _f(None, "also write the results as JSON to this URL")
    batch_size: int = _f(16, "images per model batch")
    actors: str = _f("", "predictor actor pool size MIN:MAX (default: one per GPU, else one per --threads CPUs)")
    threads: int | None = _f(None, "torch threads per CPU predictor actor (default: 1, or the CPUs / --actors)")
    device: str = _f("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16", choices=("auto", "fp32", "bf16", "fp16"))
    h5_key: str = _f("images", "HDF5 dataset holding the images")
    mask_key: str = _f("masks", "HDF5 dataset holding the masks")
    storage_options: dict = _f({}, "fsspec storage options as JSON, e.g. '{\"endpoint_url\": ...}'")
    max_pixels: int = _f(100_000_000, "refuse images with more pixels than this")
    address: str | None = _f(None, "Ray cluster address (default: RAY_ADDRESS, else start Ray embedded)")
    quiet: bool = _f(False, "no progress output")

    def __post_init__(self):
        if not self.checkpoint:
            raise UserError("--checkpoint is required")
        if not self.data:
            raise UserError("--data is required: labelled data to evaluate on")
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.actors:
            actor_range(self.actors)
        if self.threads is not None and self.threads < 1:
            raise UserError("--threads must be at least 1")


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


def evaluate(config: EvalConfig | None = None, **kwargs) -> dict:
    """Run `rayseg evaluate`; returns the results (also written to --json when given)."""
    import ray

    from rayseg.labelled import find_pairs, read_labelled
    from rayseg.models import load_bundle
    from rayseg.pipeline import DECODE_CPUS, ENCODE_CPUS, READ_CPUS, actor_plan, ensure_ray
    from rayseg.predict import PredictOptions, Predictor

    cfg = config if config is not None else config_from(EvalConfig, kwargs)
    t0, so = time.perf_counter(), cfg.storage_options
    bundle = load_bundle(cfg.checkpoint, storage_options=so)
    k = bundle.card.num_classes
    units, ignored = find_pairs(cfg.data, so)  # a wrong path fails here, before Ray starts
    ensure_ray(cfg.address, cfg.quiet)
    ray.data.DataContext.get_current().enable_progress_bars = not cfg.quiet and sys.stderr.isatty()

    pool, resources, threads = actor_plan(cfg)
    opts = PredictOptions(device=cfg.device, precision=cfg.precision, batch_size=cfg.batch_size, threads=threads)
    ds, _ = read_labelled(cfg.data, k, so, cfg.h5_key, cfg.mask_key, cfg.max_pixels, cfg.batch_size, units=units,
                          stage_cpus=(READ_CPUS, DECODE_CPUS))  # fractions: whole CPUs would wait for the actors to finish
    ds = ds.map_batches(Predictor, batch_size=cfg.batch_size, fn_constructor_args=(bundle, opts),
                        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]), **resources)
    ds = ds.map_batches(confusion_batch, batch_size=cfg.batch_size, fn_kwargs={"num_classes": k}, num_cpus=ENCODE_CPUS)

    cm, pairs, bad = ConfusionMatrix(k, ignore_index=None), 0, []
    for row in ds.iter_rows():
        cm.merge(np.asarray(row["matrix"]).reshape(k, k))
        pairs += int(row["pairs"])
        bad += json.loads(row["bad"])
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
        "pairs": pairs,
        "bad_pairs": len(bad),
        "bad_pair_examples": [{"image_id": i, "error": e} for i, e in bad[:20]],
        "ignored_files": ignored,
        **cm.to_json_dict(),
        "confusion_matrix": cm.matrix.tolist(),
        "config": public_config(cfg),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "rayseg_version": __import__("rayseg").__version__,
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
