"""`rayseg segment`: the Ray Data plan, top to bottom.

    rayseg segment 'images/*.png' shards/*.tar s3://bucket/archive/ --output out/ --checkpoint runs/x/best

discover -> read (tasks) -> decode (tasks) -> predict (actor pool) -> encode + stats (tasks) -> write Parquet,
then OUT/_rayseg.json last: its presence means the run finished. Rows land in OUT/images/. On CPUs decode,
predict and encode share one actor per core (`Segmenter`).
"""

from __future__ import annotations

import contextlib

import ray

from rayseg import bigimage, layout, progress, runtime, storage
from rayseg.cliutil import add_command, config_from, print_summary
from rayseg.config import PredictConfig, SegmentConfig, public_config
from rayseg.errors import UserError

# torch is imported where it is used, not here: `rayseg segment` starts Ray while the driver imports it (segment())

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


class Segmenter:
    """The plan's one stage: decode, predict and encode in the actor that holds the model.

    On CPUs every core runs a model, so a decode or encode task could only take a core from one; done in the
    actor, each image also skips two object-store hops (the decoded image, the mask). On a GPU the actor reserves
    --cpus-per-gpu CPUs and runs that many calls at once on threads (runtime.actor_pool): while one holds the
    device, the others decode and encode, on the GPU's own node, and no decoded batch crosses the object store.
    """

    def __init__(self, bundle, opts: PredictConfig, threads: int, confidence_map: bool, max_pixels: int, encode_kw: dict,
                 report=None, storage_options: dict | None = None, regions: bool = False):
        from rayseg.predict import Predictor

        self.predictor = Predictor(bundle, opts, threads=threads, confidence_map=confidence_map, report=report)
        self.max_pixels, self.encode_kw = max_pixels, encode_kw
        self.storage_options, self.regions = storage_options or {}, regions  # a run with huge images: region rows come too
        self.stamp = getattr(report, "stamp", None)  # a DeviceLog keeps when the first actor and batch were ready
        if self.stamp:
            self.stamp("predictor_ready")

    def __call__(self, batch: dict):
        from rayseg.decode import decode_batch

        if self.regions:
            batch = self.segment_regions(batch)
        out = progress.encode_stage(self.predictor(decode_batch(batch, self.max_pixels)), **self.encode_kw)
        if self.regions:
            out = bigimage.with_region_columns(out)
        if self.stamp:
            self.stamp("first_batch")
            self.stamp = None
        return out

    def segment_regions(self, batch: dict) -> dict:
        """Segments and writes the batch's region rows (they give no row: their image's row comes from its store);
        the rest of the batch goes on."""
        from rayseg.regions import Region

        taken = bigimage.region_rows(batch)
        counter = self.encode_kw.get("counter")
        for i in taken:
            region = Region.from_bytes(batch["data"][i])
            bigimage.segment_region(self.predictor, region, self.storage_options, self.encode_kw["num_classes"])
            if counter is not None:  # written (or its failure recorded): nightly commits an image once all of its are
                counter.region_done.remote(region.url, region.key)
        keep = [i for i in range(len(batch["image_id"])) if i not in set(taken)]
        return {k: v[keep] for k, v in batch.items()} if taken else batch


def build_plan(cfg: SegmentConfig, units: list[dict], bundle, counter=None, devices=None, region_rows: list[dict] = ()):
    """The whole Ray Data plan as one dataset of output rows (pyarrow tables with stats.SCHEMA).

    GPU: read (tasks) -> decode + predict + encode (`Segmenter`, one actor per GPU, --cpus-per-gpu calls at once).
    CPU: read (tasks) -> decode + predict + encode (`Segmenter`, one actor per core, one call at a time).
    With --objects the rows carry an extra `objects` column; `counter` (a progress.Counter) gets what the
    read and encode stages finish; `devices` (a rayseg.devices.DeviceLog) what each predictor actor runs with.
    The predictor runs where the plan put it: on GPU actors CUDA or an EnvError, never a quiet fall back to CPU.
    `region_rows` (rayseg.bigimage.plan) join the read rows before the pool: one pool takes both kinds.
    """
    from rayseg.predict import CPU_BATCH_SIZE, MAX_AUTO_BATCH_SIZE

    # how many batches the job holds, where that is known before reading: image files only
    files = sum(len(u["urls"]) for u in units) if all(u["kind"] == "image" for u in units) else 0
    batches = -(-files // (cfg.batch_size or CPU_BATCH_SIZE)) if files else None
    opts, compute, resources, threads = runtime.predictor_plan(cfg, batches)
    # rows per call of each stage; with an automatic batch size a GPU actor gets the most it may choose and splits it
    rows = cfg.batch_size or (MAX_AUTO_BATCH_SIZE if opts.device == "cuda" else CPU_BATCH_SIZE)
    if region_rows:  # a region is many tiles: small batches, so that even one image's regions reach every actor
        rows = max(1, min(rows, len(region_rows) // (2 * getattr(compute, "max_size", 1))))
    parts = []
    if units:
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        read_kw = {"storage_options": cfg.storage_options, "h5_key": cfg.h5_key, "image_column": cfg.image_column, "counter": counter}
        parts.append(ds.map_batches(progress.read_stage, batch_size=1, fn_kwargs=read_kw, num_cpus=runtime.READ_CPUS))
    if region_rows:
        parts.append(ray.data.from_items(list(region_rows), override_num_blocks=len(region_rows)))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    encode_kw = {"num_classes": bundle.card.num_classes, "mask_format": cfg.mask_format, "objects": cfg.objects,
                 "min_area": cfg.min_area, "counter": counter}
    args = (bundle, opts, threads, cfg.objects, cfg.max_pixels, encode_kw, devices, cfg.storage_options, bool(region_rows))
    return ds.map_batches(Segmenter, batch_size=rows, fn_constructor_args=args, compute=compute, **resources)


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


def start_up(cfg: SegmentConfig, clock: layout.Timeline):
    """(shards, ignored files, model bundle) once the inputs are found, the output is free and Ray is ready.

    Bad inputs and a taken output fail before Ray starts. Then Ray starts while torch loads and the model is
    checked (runtime.ensure_ray_beside): the two biggest fixed costs of a small job, side by side.
    """
    so = cfg.storage_options
    shards, ignored = storage.discover(cfg.inputs, so)
    if storage.is_nonempty(cfg.output, so):
        if not cfg.overwrite:
            raise UserError(f"the output {cfg.output} is not empty; pass --overwrite to replace it")
        storage.remove(cfg.output, so)
    clock.mark("discovered")

    def check_model():
        from rayseg.adapters import load_model

        bundle = load_model(cfg, so)
        clock.mark("model_checked")
        return bundle

    bundle = runtime.ensure_ray_beside(check_model, cfg.address, cfg.quiet, cfg.dashboard)
    runtime.configure_data(cfg.quiet)
    clock.mark("ray_ready")
    return shards, ignored, bundle


def segment(config: SegmentConfig | None = None, **kwargs) -> dict:
    """Run `rayseg segment`; returns the summary that is also written to OUT/_rayseg.json."""
    cfg = config if config is not None else config_from(SegmentConfig, kwargs)
    started, clock = layout.now(), layout.Timeline()
    so = cfg.storage_options
    shards, ignored, bundle = start_up(cfg, clock)
    startup_s = clock.marks["ray_ready"]
    from rayseg.devices import DeviceLog, gathered
    from rayseg.objects import write_objects

    shards, large, region_rows = bigimage.plan(shards, cfg, bundle.card)
    units = work_units(shards)
    images_url = storage.join(cfg.output, layout.IMAGES_DIR)
    pa_fs, images_path = storage.pyarrow_filesystem(images_url, so)
    reporter = progress.Reporter(len(units)) if progress.wants_log_lines(cfg.quiet) else None
    with reporter or contextlib.nullcontext():
        with gathered(DeviceLog()) as device_log:
            if units or region_rows:  # none: every file was a huge image, with all regions skipped or an error
                plan = build_plan(cfg, units, bundle, reporter and reporter.counter, device_log, region_rows)
                plan.write_parquet(images_path, filesystem=pa_fs, ray_remote_args=runtime.WRITE_ARGS)
            if large:  # every region is written: each huge image's row, from its store
                image_kw = {"storage_options": so, "model": bundle.label, "objects": cfg.objects, "min_area": cfg.min_area,
                            "cog": cfg.cog, "ome_tiff": cfg.ome_tiff}
                rows_of_large = ray.data.from_items(large, override_num_blocks=len(large))
                rows_of_large.map_batches(bigimage.image_rows, batch_size=1, fn_kwargs=image_kw, num_cpus=runtime.READ_CPUS) \
                    .write_parquet(images_path, filesystem=pa_fs, ray_remote_args=runtime.WRITE_ARGS)
            devices = device_log.devices()
            clock.at(device_log.stamps())
        clock.mark("written")
        rows, errors, examples = storage.retry(count_output, images_url, so, what="reading the output back")
        if reporter:
            reporter.finish(rows)
    objects_url = storage.join(cfg.output, layout.OBJECTS_DIR) if cfg.objects else None
    if objects_url:  # a second streaming pass, after the images are written: OUT/images -> OUT/objects/
        write_objects(images_path, storage.pyarrow_filesystem(objects_url, so)[1], pa_fs)
    summary = {
        "command": "segment",
        "output": cfg.output,
        "images_table": images_url,
        "objects_table": objects_url,
        "shards": len(shards),
        "images": rows,
        "large_images": len(large),
        "regions": len(region_rows),
        "rows": rows,
        "errors": errors,
        "error_examples": examples,
        "ignored_files": ignored,
        "model": bundle.label,
        "model_digest": bundle.digest,
        "classes": bundle.card.names(),
        "devices": devices,
        "config": public_config(cfg),
        "startup_s": startup_s,
        "timeline_s": {**clock.marks, "dashboard": runtime.dashboard_on, "ray_joined": runtime.joined},
        **layout.summary_tail(started, clock.t0),
    }
    storage.write_json(storage.join(cfg.output, layout.SUMMARY_FILE), summary, so)
    return summary


def register(sub) -> None:
    add_command(sub, "segment", SegmentConfig, lambda cfg: print_summary(segment(cfg), omit=("config", "error_examples")),
                help="segment image shards into a Parquet table of masks and statistics", description=__doc__.split("\n\n")[0])
