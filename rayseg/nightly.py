"""`rayseg nightly`: segment only the shards not yet committed under the current model and output options, and
commit them in waves, each exactly once.

    rayseg nightly 's3://archive/shards/*.tar' --output s3://masks/nightly --checkpoint s3://models/prod/best
    rayseg nightly 's3://archive/shards/*.tar' --output s3://masks/nightly --checkpoint s3://models/prod/best --status

Layout of OUT (read it with `rayseg.read_table(OUT)`; see rayseg/table.py, and rayseg/commit.py for how waves commit):

    images/              a Delta table: one row per image, objects (with --objects) inside their image's row
    masks/<run id>/      huge images' mask stores (OME-Zarr), named by their rows' mask_url (rayseg.bigimage)
    _manifest/           the committed shards: URL, size, version, key, files (a snapshot + the parts of recent waves)
    _lease.json          the lease of the run writing OUT (rayseg/lease.py)
    _runs/<run id>.json  the summary of each run (also printed)

A shard is done when the manifest holds it with the same size, version (ETag or mtime) and key. The key is a hash
of the model digest and every option that changes a row (output_key), so a changed shard, a new model or a new
output option reprocesses it, and its new rows replace the old in the commit that adds them.

"failed" in the summary: shards committed this run whose rows are all errors (unreadable shard, no decodable
image). They are committed like any other and not retried until the shard, the model or an output option changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid

from rayseg import commit, layout, storage, table
from rayseg.cliutil import add_command, config_from, print_summary
from rayseg.config import KEYED, OPTIONS, NightlyConfig, public_config
from rayseg.errors import UserError

log = logging.getLogger("rayseg")

RUNS_DIR = "_runs"
# The options the key held when it was first written, always in it, so that keys of existing manifests stay valid.
# Frozen: an option marked keyed later enters the key only when it differs from its default (see output_key).
FIRST_KEY = ("input_size", "tile", "overlap", "tta", "mask_format", "objects", "min_area", "precision", "device",
             "max_pixels", "h5_key", "image_column")


def keyed_options(cfg_cls=NightlyConfig) -> tuple[str, ...]:
    """The options whose value changes a row (marked `rows=KEYED` in config.OPTIONS), in field order."""
    return tuple(f.name for f in dataclasses.fields(cfg_cls) if OPTIONS[f.name].rows == KEYED)


def output_key(cfg: NightlyConfig, bundle) -> str:
    """A hash of the model's identity and every keyed option: the manifest's key for rows made this way."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    keyed = {k: getattr(cfg, k) for k in keyed_options(type(cfg)) if k in FIRST_KEY or getattr(cfg, k) != defaults[k]}
    # a checkpoint's digest covers its card (architecture, classes); a fresh model's digest names only its weights
    model = bundle.digest if cfg.checkpoint else f"{bundle.card.architecture}:{bundle.card.num_classes}:{bundle.digest}"
    return hashlib.sha256(json.dumps({"model_digest": model, **keyed}, sort_keys=True).encode()).hexdigest()[:16]


def backlog(shards: list[storage.Shard], records: dict[str, dict], key: str) -> dict[str, list[storage.Shard]]:
    """Shards split into new (never committed), changed (committed for another version or key) and done."""
    out: dict[str, list[storage.Shard]] = {"new": [], "changed": [], "done": []}
    for s in shards:
        r = records.get(s.url)
        if r is None:
            out["new"].append(s)
        elif (r["size"], r["version"], r["key"]) == (s.size, s.version, key):
            out["done"].append(s)
        else:
            out["changed"].append(s)
    return out


def _check_layout(cfg: NightlyConfig) -> None:
    if storage.is_nonempty(storage.join(cfg.output, "_ledger"), cfg.storage_options) and not table.is_table(cfg.output, cfg.storage_options):
        raise UserError(f"{cfg.output} holds the per-shard ledger of an older rayseg nightly; give a new --output folder")


def status(cfg: NightlyConfig, shards, key: str) -> dict:
    """--status: the backlog, from the manifest alone (no lease taken, no Ray started)."""
    from rayseg.lease import holder

    state = table.read_state(cfg.output, cfg.storage_options)
    b = backlog(shards, state.records, key)
    lease = holder(cfg.output, cfg.storage_options)
    return {"command": "nightly", "status": True, "output": cfg.output, "output_key": key, "shards": len(shards),
            "shards_new": len(b["new"]), "shards_changed": len(b["changed"]), "shards_done": len(b["done"]),
            "images_done": sum(state.records[s.url]["rows"] for s in b["done"]), "table_version": state.version,
            "running": {k: lease[k] for k in ("run_id", "host", "pid", "acquired_at", "progress")} if lease else None}


def segment_waves(cfg: NightlyConfig, pending, bundle, state, lease, key: str, run_id: str) -> tuple[list[dict], dict, dict]:
    """The pending shards segmented and committed wave by wave; returns (waves, cluster, huge images and regions).

    A huge image (a tiled or pyramidal TIFF over --region-pixels, or any pyramid: rayseg.bigimage) is a shard of its
    own: once the ordinary shards are done, the regions go over a pool of their own and write the mask stores;
    each image's one row is made from its store as soon as its last region is written (commit_huge_images) and is
    committed with the next wave, so its shard, like any other, commits whole or not at all."""
    import ray

    from rayseg import bigimage, progress, runtime, waves
    from rayseg.devices import DeviceLog, gathered
    from rayseg.segment import build_plan, work_units
    from rayseg.waves import WaveWriter

    runtime.ensure_ray(cfg.address, cfg.quiet, cfg.dashboard)
    runtime.configure_data(cfg.quiet)
    # huge images (a loose file each, so a shard each) go by region; their stores are this run's (OUT/masks/RUN_ID/)
    ordinary, large, region_rows = bigimage.plan(pending, cfg, bundle.card, run_id)
    units = work_units(ordinary)
    reporter = progress.Reporter(len(units)) if progress.wants_log_lines(cfg.quiet) else None
    # the counter also keeps the rows of each shard read whole, so waves close on whole shards in any arrival order
    counter = reporter.counter if reporter else progress.Counter.remote()
    cursor = [0]

    def shard_rows() -> dict[str, int]:  # the shards read whole since the last call
        new, cursor[0] = ray.get(counter.shard_rows.remote(cursor[0]), timeout=60)
        return new

    try:
        with reporter or contextlib.nullcontext(), gathered(DeviceLog()) as device_log:
            writer = WaveWriter(pending, state, lease, cfg, key, run_id, shard_rows)
            if reporter:
                reporter.committed = lambda: writer.committed_images
            # workers write the rows (waves.write_stage); only each file's metadata, a row per shard, comes here
            rows = min(waves.WRITE_ROWS, cfg.commit_every or waves.WRITE_ROWS)
            write_kw = {"batch_format": "pyarrow", "zero_copy_batch": True, **runtime.COMMIT_TASK_ARGS,
                        "fn_kwargs": {"output": cfg.output, "storage_options": cfg.storage_options, "run_id": run_id}}
            # the ordinary shards first, then the regions: build_plan gives a pool that takes regions small
            # batches (so that one image's regions reach every actor), which would shrink every ordinary batch too
            if units:
                plan = build_plan(cfg, units, bundle, counter, device_log).map_batches(waves.write_stage, batch_size=rows, **write_kw)
                # no prefetch: the blocks are a few metadata rows, and a prefetch of 2 held each back until 2 more
                # were done, at the end of the run when the run is short (80 shards on 2 cores: one wave, at the end)
                for meta in plan.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                    writer.add(meta)
            if large:
                plan = build_plan(cfg, [], bundle, counter, device_log, region_rows).map_batches(
                    waves.write_stage, batch_size=rows, **write_kw) if region_rows else None
                image_kw = {"storage_options": cfg.storage_options, "model": bundle.label, "objects": cfg.objects,
                            "min_area": cfg.min_area, "cog": cfg.cog, "ome_tiff": cfg.ome_tiff}
                commit_huge_images(writer, large, region_rows, plan, counter, image_kw, cfg, run_id)
            writer.finish()
            devices = device_log.devices()
            if reporter:
                reporter.finish(writer.committed_images)
    finally:
        if reporter is None:
            ray.kill(counter)
    return writer.waves, {**runtime.cluster_summary(), "devices": devices}, {"large_images": len(large), "regions": len(region_rows)}


POLL_S = 1.0  # how often the driver asks which huge images have all their regions written


def commit_huge_images(writer, large: list[dict], region_rows: list[dict], plan, counter, image_kw: dict, cfg, run_id: str) -> None:
    """Runs the regions' `plan` (None: no region to segment) in a thread while this one asks the counter, every
    POLL_S, which huge images have all their regions written; each such image's row is made and written by a Ray
    task (image_row_file) and committed through `writer`, so a kill loses only the images still in progress, not
    every region done so far. An image with no region to segment (all skipped, or an error from planning) goes at
    once. The writer is used from this thread only."""
    import collections
    import queue
    import threading

    import ray

    from rayseg import runtime

    planned = collections.Counter(r["image_id"] for r in region_rows)
    metas: queue.Queue = queue.Queue()  # a region plan gives no rows; anything it does give is committed as usual
    failure: list[BaseException] = []

    def drain() -> None:
        try:
            for meta in plan.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                if meta.num_rows:
                    metas.put(meta)
        except BaseException as e:  # noqa: BLE001 - re-raised in the driver's thread
            failure.append(e)

    thread = threading.Thread(target=drain, name="rayseg-regions", daemon=True)
    if plan is not None:
        thread.start()
    task = ray.remote(num_cpus=runtime.READ_CPUS, max_retries=3)(image_row_file)
    waiting, inflight = list(large), {}
    while waiting or inflight or thread.is_alive():
        if failure:
            raise failure[0]
        while not metas.empty():
            writer.add(metas.get())
        if waiting:
            if thread.is_alive():
                written = ray.get(counter.regions_written.remote([x["image_id"] for x in waiting]), timeout=60)
                ready = [x for x in waiting if written[x["image_id"]] >= planned[x["image_id"]]]
            else:  # the plan is done: every region is written
                ready = waiting
            for x in ready:
                inflight[task.remote(x["store"], x["image_id"], image_kw, cfg.output, cfg.storage_options, run_id)] = x["image_id"]
            waiting = [x for x in waiting if x not in ready]
        if inflight:
            done, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=POLL_S)
            for ref in done:
                writer.expect({inflight.pop(ref): 1})
                writer.add(ray.get(ref))
        else:
            thread.join(POLL_S)
    while not metas.empty():
        writer.add(metas.get())
    if failure:
        raise failure[0]


def image_row_file(store: str, image_id: str, image_kw: dict, output: str, storage_options: dict | None, run_id: str):
    """A Ray task: a huge image's row from its store (rayseg.bigimage.image_rows), written as a data file of the
    run (waves.write_stage); returns the file's metadata for the wave writer."""
    from rayseg import bigimage, waves

    rows = bigimage.image_rows({"store": [store], "image_id": [image_id]}, **image_kw)
    return waves.write_stage(rows, output, storage_options, run_id)


def nightly(config: NightlyConfig | None = None, **kwargs) -> dict:
    """Run `rayseg nightly`; returns the summary also written to OUT/_runs/<run id>.json."""
    cfg = config if config is not None else config_from(NightlyConfig, kwargs)
    started, t0 = layout.now(), time.perf_counter()
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    so = cfg.storage_options
    _check_layout(cfg)
    if not cfg.status:  # before any work: a store that cannot keep two runs apart is refused in one sentence
        from rayseg.lease import check_store

        check_store(cfg.output, so, cfg.unsafe_single_writer)
    shards, ignored = storage.discover(cfg.inputs, so)

    from rayseg.adapters import load_model

    bundle = load_model(cfg, so)
    key = output_key(cfg, bundle)
    if cfg.status:
        return status(cfg, shards, key)
    state = table.read_state(cfg.output, so)
    b = backlog(shards, state.records, key)
    waves, cluster, previous, vacuumed, compaction, large = [], None, None, 0, None, {"large_images": 0, "regions": 0}
    if b["new"] or b["changed"]:
        from rayseg.lease import Lease

        with Lease(cfg.output, so, run_id, cfg.lease_seconds, cfg.lease_wait) as lease:
            previous = lease.previous
            dt = table.open_table(cfg.output, so, create=True)
            lease.at_least(commit.generation_of(dt.transaction_version(table.APP_ID)) + 1)
            full_vacuum = cfg.full_vacuum or previous is not None or not table.last_run_ended_whole(cfg.output, so, dt)
            commit.fence(cfg.output, so, lease.generation, run_id)  # a run that lost this lease can commit nothing after this
            state = table.read_state(cfg.output, so)  # again, under the lease: another run may have committed meanwhile
            b = backlog(shards, state.records, key)
            table.compact_manifest(cfg.output, so, state, run_id)  # parts a killed run left
            if b["new"] or b["changed"]:
                todo = sorted(b["new"] + b["changed"], key=lambda s: s.url)
                waves, cluster, large = segment_waves(cfg, todo, bundle, state, lease, key, run_id)
                compaction = compact_or_warn(state, cfg, lease, run_id)
                if all(state.records.get(s.url, {}).get("run_id") == run_id for s in todo):  # the night is whole
                    commit.mark_complete(state, cfg.output, lease.generation, run_id, started.date().isoformat())
                table.compact_manifest(cfg.output, so, state, run_id)
                vacuumed = table.vacuum(state, cfg.keep_hours, full_vacuum, cfg.output, so)
    summary = make_summary(cfg, run_id, shards, b, waves, state, previous, bundle, key, ignored, cluster, vacuumed, compaction)
    summary.update(large)  # huge images segmented by region this run, and their regions
    summary.update(layout.summary_tail(started, t0))
    storage.write_json(storage.join(cfg.output, RUNS_DIR, f"{run_id}.json"), summary, so)
    return summary


def compact_or_warn(state, cfg: NightlyConfig, lease, run_id: str) -> dict:
    """The run's waves are committed: a compaction that fails (a storage error in a merge task or its commit)
    leaves the small files as they were, for the next run to merge, and does not fail the run. A lost lease does."""
    from rayseg.lease import LeaseLost
    from rayseg.waves import compact

    try:
        return compact(state, cfg.output, cfg.storage_options, lease, run_id, cfg.compact_mb)
    except LeaseLost:
        raise
    except Exception as e:  # noqa: BLE001 - the rows are committed; merging them can wait a night
        cause = getattr(e, "cause", None) or e  # a merge task's error reaches here wrapped in Ray's RayTaskError
        why = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        log.warning("compacting the table's small files failed (%s); they stay as they are and the next run merges them", why)
        return {"files_merged": 0, "files_written": 0, "error": why}


def make_summary(cfg, run_id, shards, b, waves, state, previous, bundle, key, ignored, cluster, vacuumed, compaction) -> dict:
    committed = {r["shard_url"]: r for r in state.records.values() if r["run_id"] == run_id}
    pending = [s.url for s in b["new"] + b["changed"] if s.url not in committed]
    failed = [u for u, r in committed.items() if r["rows"] and r["errors"] == r["rows"]]
    lost = (previous or {}).get("progress") or {}
    rows = sum(w["rows"] for w in waves)
    return {
        "command": "nightly",
        "run_id": run_id,
        "date": layout.now().date().isoformat(),
        "output": cfg.output,
        "images_table": storage.join(cfg.output, layout.IMAGES_DIR),
        "nothing_new": not waves,
        "message": (f"committed {len(committed)} new or changed shard(s) in {len(waves)} wave(s)" if waves
                    else "nothing new: every shard is committed for this model and these output options"),
        "shards": len(shards),
        "shards_new": len(committed),
        "shards_changed": len(b["changed"]),
        "shards_skipped": len(b["done"]),
        "shards_pending": len(pending),
        "shards_failed": len(failed),
        "failed_shards": failed[:20],
        "failed_means": "committed this run with every row an error (nothing segmented); not retried until the shard, model or options change",
        "rows": rows,
        "errors": sum(w["errors"] for w in waves),
        "waves": waves,
        "table_version": state.version,
        "redone_after_kill": {"run_id": previous["run_id"], "images_in_flight": lost.get("images_in_flight", 0),
                              "shards_in_flight": lost.get("shards_in_flight", 0)} if previous else None,
        "compaction": compaction,  # small data files merged at the end of the run (--compact-mb)
        "files_vacuumed": vacuumed,
        "ignored_files": ignored,
        "model": bundle.label,
        "model_digest": bundle.digest,
        "output_key": key,
        "cluster": cluster,
        "config": {k: v for k, v in public_config(cfg).items() if k != "overwrite"},  # nightly has no overwrite
    }


def register(sub) -> None:
    add_command(sub, "nightly", NightlyConfig, lambda cfg: print_summary(nightly(cfg)),
                help="segment only new or changed shards and commit them in waves, each exactly once",
                description=__doc__.split("\n\n")[0])
