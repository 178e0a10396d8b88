"""`rayseg segment`: the Ray Data plan, top to bottom.

    rayseg segment 'images/*.png' shards/*.tar s3://bucket/archive/ --output out/ --checkpoint runs/x/best

discover -> read (tasks) -> decode (tasks) -> predict (actor pool) -> encode + stats (tasks) -> write Parquet,
then OUT/_rayseg.json last: its presence means the run finished. Rows land in OUT/images/. On CPUs decode,
predict and encode share one actor per core (`Segmenter`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import time
import warnings

import ray

from rayseg import progress, storage
from rayseg.cliutil import add_command, config_from, print_summary
from rayseg.config import SegmentConfig, actor_range, public_config
from rayseg.decode import decode_batch
from rayseg.errors import UserError
from rayseg.models import ModelBundle, load_bundle
from rayseg.objects import OBJECTS_DIR, write_objects
from rayseg.predict import CPU_BATCH_SIZE, MAX_AUTO_BATCH_SIZE, PredictOptions, Predictor
from rayseg.shards import read_units
from rayseg.stats import encode_batch

log = logging.getLogger("rayseg")

IMAGES_DIR, SUMMARY_FILE = "images", "_rayseg.json"
FILES_PER_UNIT = 16  # single image files are read 16 to a task: one task per file costs more in scheduling than in reading


def work_units(shards: list[storage.Shard]) -> list[dict]:
    units, files = [], []
    for s in shards:
        if s.kind == "image":
            files.append(s.url)
        else:
            units.append({"kind": s.kind, "urls": [s.url]})
    units += [{"kind": "image", "urls": files[i : i + FILES_PER_UNIT]} for i in range(0, len(files), FILES_PER_UNIT)]
    return units


# Ray kills an idle worker process after 1 s once a node has more workers than CPUs, and the predictor actors are
# workers too: with one actor per core every read/decode/encode worker was over the limit, so workers were killed
# between tasks and started again (11 worker starts instead of 3 for 2,000 images, ~1.3 CPU s each; PERFORMANCE.md).
# A cluster sets the same through RAY_num_workers_soft_limit (cluster/).
LOCAL_SYSTEM_CONFIG = {"num_workers_soft_limit": 4 * (os.cpu_count() or 1) + 4}


def ensure_ray(address: str | None, quiet: bool = False) -> None:
    """Join the cluster at --address / RAY_ADDRESS, or start Ray embedded in this process."""
    if ray.is_initialized():
        return
    # "local" rather than None: ray.init() alone would quietly join whatever Ray already runs on this machine
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    extra = {"_system_config": LOCAL_SYSTEM_CONFIG} if address == "local" else {}
    ray.init(address=address, log_to_driver=not quiet, configure_logging=True, logging_level=logging.WARNING, **extra)
    log.info("Ray %s, resources %s", ray.__version__, {k: v for k, v in ray.cluster_resources().items() if "node:" not in k})


# What a CPU predictor actor reserves, per torch thread: a core's worth would leave no logical CPU for the light
# stages on a small machine, and Ray's CPUs are only a scheduling budget, so the actors take 3/4 of theirs and the
# OS shares the cores.
CPU_ACTOR_SHARE = 0.75


def actor_plan(cfg) -> tuple[tuple[int, int], dict, int]:
    """(pool min:max, ray resources per actor, torch threads per actor) from the cluster's resources.

    On GPUs: one actor per GPU. On CPUs: one single-threaded actor per core (`--threads N`: one per N cores), all
    started at once. Independent models on separate cores beat one model spread over them with intra-op
    threads: no barrier between the cores, and while one actor encodes its batch the others compute
    (docs/PERFORMANCE.md). `--actors` fixes the pool; each then gets an equal share of the cores.
    """
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), max(1, int(res.get("CPU", 1)))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus > 0)
    if use_gpu:
        pool = actor_range(cfg.actors) if cfg.actors else (1, max(1, gpus))
        return pool, {"num_gpus": 1, "num_cpus": 1}, 1
    fixed = actor_range(cfg.actors) if cfg.actors else None
    threads = cfg.threads or (max(1, cpus // fixed[1]) if fixed else 1)
    pool = fixed or (max(1, cpus // threads),) * 2
    return pool, {"num_cpus": round(CPU_ACTOR_SHARE * min(threads, cpus / pool[1]), 4)}, threads


# Ray resources of the light stages: fractions, so they run beside the actors. Read and decode must differ from each
# other and from the actor's: Ray Data fuses neighbouring stages with equal resources, and a fused stage takes its
# input in bundles of its largest batch size, so read fused with decode got 16 shards in ONE task (no streaming,
# memory growing with the archive), and decode fused into the actor ran serially with the model. Encode and the
# Parquet write are equal on purpose: they fuse into one task, so an encoded batch is written where it was made
# (the writer's default of 1 CPU also left it starved by the actors' reservations until the last batch).
# Read at 0.2 rather than less: beside one CPU actor per core on 2 cores that is two reads, or a read and a write, at
# a time, which keeps the models fed; 0.125 ran four reads, read ahead further and kept more worker processes,
# and peak memory grew 1.27-1.28x from 200 to 2,000 images instead of 1.14-1.22x (docs/PERFORMANCE.md).
READ_CPUS, DECODE_CPUS, ENCODE_CPUS = 0.2, 0.25, 0.25
WRITE_ARGS = {"num_cpus": ENCODE_CPUS}


class Segmenter:
    """The CPU plan's one stage: decode, predict and encode in the actor that holds the model.

    On CPUs every core runs a model, so a decode or encode task could only take a core from one; done in the
    actor, each image skips two object-store hops (the decoded image, the mask) and the task workers that
    carried them (docs/PERFORMANCE.md). On a GPU the actor's one CPU must keep the device fed, so there decode and
    encode stay parallel tasks.
    """

    def __init__(self, bundle: ModelBundle, opts: PredictOptions, max_pixels: int, encode_fn, encode_kw: dict):
        self.predictor = Predictor(bundle, opts)
        self.max_pixels, self.encode_fn, self.encode_kw = max_pixels, encode_fn, encode_kw

    def __call__(self, batch: dict):
        return self.encode_fn(self.predictor(decode_batch(batch, self.max_pixels)), **self.encode_kw)


def build_plan(cfg: SegmentConfig, shards: list[storage.Shard], bundle: ModelBundle, counter=None):
    """The whole Ray Data plan as one dataset of output rows (pyarrow tables with stats.SCHEMA).

    GPU: read (tasks) -> decode (tasks) -> predict (one actor per GPU) -> encode (tasks).
    CPU: read (tasks) -> decode + predict + encode (one actor per core, `Segmenter`).
    With --objects the rows carry an extra `objects` column; `counter` (a progress.Counter) gets what the
    read and encode stages finish.
    """
    pool, resources, threads = actor_plan(cfg)
    opts = PredictOptions(device=cfg.device, precision=cfg.precision, batch_size=cfg.batch_size, tile=cfg.tile,
                          overlap=cfg.overlap, tta=cfg.tta, compile=cfg.compile, confidence_map=cfg.objects, threads=threads)
    actors = ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1])
    on_gpu = "num_gpus" in resources
    # rows per call of each stage; with an automatic batch size a GPU actor gets the most it may choose and splits it
    rows = cfg.batch_size or (MAX_AUTO_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)
    units = work_units(shards)
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    read_kw = {"storage_options": cfg.storage_options, "h5_key": cfg.h5_key, "image_column": cfg.image_column}
    read_fn, read_kw = (read_units, read_kw) if counter is None else (progress.read_counted, {**read_kw, "counter": counter})
    ds = ds.map_batches(read_fn, batch_size=1, fn_kwargs=read_kw, num_cpus=READ_CPUS)
    encode_kw = {"num_classes": bundle.card.num_classes, "mask_format": cfg.mask_format, "objects": cfg.objects, "min_area": cfg.min_area}
    encode_fn, encode_kw = (encode_batch, encode_kw) if counter is None else (progress.encode_counted, {**encode_kw, "counter": counter})
    if not on_gpu:
        return ds.map_batches(Segmenter, batch_size=rows, fn_constructor_args=(bundle, opts, cfg.max_pixels, encode_fn, encode_kw),
                              compute=actors, **resources)
    ds = ds.map_batches(decode_batch, batch_size=rows, fn_kwargs={"max_pixels": cfg.max_pixels}, num_cpus=DECODE_CPUS)
    ds = ds.map_batches(Predictor, batch_size=rows, fn_constructor_args=(bundle, opts), compute=actors, **resources)
    return ds.map_batches(encode_fn, batch_size=rows, fn_kwargs=encode_kw, num_cpus=ENCODE_CPUS)


def count_output(url: str, storage_options: dict) -> tuple[int, int, list[dict]]:
    """(rows, error rows, up to 20 error examples) read back from what was written."""
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(url, storage_options)
    try:
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_id", "error"])
    except FileNotFoundError:
        return 0, 0, []
    errors = table.filter(table["error"].is_valid())
    examples = errors.slice(0, 20).to_pylist()
    return table.num_rows, errors.num_rows, examples


def segment(config: SegmentConfig | None = None, **kwargs) -> dict:
    """Run `rayseg segment`; returns the summary that is also written to OUT/_rayseg.json."""
    cfg = config if config is not None else config_from(SegmentConfig, kwargs)
    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    so = cfg.storage_options
    shards, ignored = storage.discover(cfg.inputs, so)
    if storage.is_nonempty(cfg.output, so):
        if not cfg.overwrite:
            raise UserError(f"the output {cfg.output} is not empty; pass --overwrite to replace it")
        storage.remove(cfg.output, so)
    bundle = load_bundle(cfg.checkpoint, cfg.model, cfg.num_classes, cfg.weights, cfg.input_size, so)
    ensure_ray(cfg.address, cfg.quiet)
    ray.data.DataContext.get_current().enable_progress_bars = not cfg.quiet and sys.stderr.isatty()
    # Ray Data retries a Parquet file write whose error matches one of these; a retried write task rewrites the same
    # file name (write uuid + task index), so a retry replaces a file, never adds one. Its defaults only know
    # pyarrow's own S3 messages; ours come through fsspec.
    ctx = ray.data.DataContext.get_current()
    with warnings.catch_warnings():  # Ray warns on any change of the list; ours are valid regular expressions too
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.retried_io_errors = list(dict.fromkeys([*ctx.retried_io_errors, *storage.RETRIED_IO_ERRORS]))
    t_ready = time.perf_counter()

    images_url = storage.join(cfg.output, IMAGES_DIR)
    pa_fs, images_path = storage.pyarrow_filesystem(images_url, so)
    reporter = progress.Reporter(len(work_units(shards))) if progress.wants_log_lines(cfg.quiet) else None
    with reporter or contextlib.nullcontext():
        build_plan(cfg, shards, bundle, reporter and reporter.counter).write_parquet(images_path, filesystem=pa_fs, ray_remote_args=WRITE_ARGS)
        rows, errors, examples = storage.retry(count_output, images_url, so, what="reading the output back")
        if reporter:
            reporter.finish(rows)
    if cfg.objects:  # a second streaming pass, after the images are written: OUT/images -> OUT/objects/
        write_objects(images_path, storage.pyarrow_filesystem(storage.join(cfg.output, OBJECTS_DIR), so)[1], pa_fs)
    summary = {
        "command": "segment",
        "output": cfg.output,
        "images_table": images_url,
        "objects_table": storage.join(cfg.output, OBJECTS_DIR) if cfg.objects else None,
        "shards": len(shards),
        "images": rows,
        "rows": rows,
        "errors": errors,
        "error_examples": examples,
        "ignored_files": ignored,
        "model": bundle.label,
        "model_digest": bundle.digest,
        "classes": bundle.card.names(),
        "config": public_config(cfg),
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "startup_s": round(t_ready - t0, 3),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "rayseg_version": __import__("rayseg").__version__,
        "ray_version": ray.__version__,
    }
    storage.write_json(storage.join(cfg.output, SUMMARY_FILE), summary, so)
    return summary


def register(sub) -> None:
    add_command(sub, "segment", SegmentConfig, lambda cfg: print_summary(segment(cfg), omit=("config", "error_examples")),
                help="segment image shards into a Parquet table of masks and statistics", description=__doc__.split("\n\n")[0])
