"""`rayseg nightly`: segment only the shards no earlier run has committed, and commit each one exactly once.

    rayseg nightly 's3://archive/shards/*.tar' --output s3://masks/nightly --checkpoint s3://models/prod/best

Layout of OUT (readers of OUT/images ignore names starting with _ or .):

    images/<shard hash>-<model hash>.parquet   one file per shard, all its rows; appears whole (temp file + rename)
    _ledger/<shard hash>.json                  one record per committed shard, written after its file
    _staging/<run id>/shard_key=<shard hash>/  this run's Ray Data output; removed once published
    _runs/<run id>.json                        the summary of each run (also printed)

A shard is done when its ledger record matches its URL, size, version (ETag or mtime) and the model digest, so
a changed shard or a new model reprocesses it, and its new file replaces the old one. A run killed at any point
leaves either no record (the shard is redone and its file overwritten: same name) or a record whose file is
already in place. Runs over one OUT must not overlap: each run removes the staging and temp files it finds.

"failed" in the summary: shards committed this run whose rows are all errors (unreadable shard, no decodable
image). They are committed like any other (their error rows are the record of the failure) and are not retried
until the shard or the model changes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import posixpath
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rayseg import storage
from rayseg.cliutil import add_command, config_from, print_summary
from rayseg.config import SegmentConfig, _f, public_config
from rayseg.errors import UserError

log = logging.getLogger("rayseg")

IMAGES_DIR, LEDGER_DIR, STAGING_DIR, RUNS_DIR = "images", "_ledger", "_staging", "_runs"
KEY_COLUMN = "shard_key"
PUBLISH_THREADS = 8  # publishing is storage round trips (read staging, put, rename, put record): threads hide latency


@dataclass(frozen=True)
class NightlyConfig(SegmentConfig):
    """All of segment's options; OUT is never cleared, so --overwrite does not exist here."""

    overwrite: bool = _f(False, "not used by nightly", cli=False)

    def __post_init__(self):
        super().__post_init__()
        if self.overwrite:
            raise UserError("nightly never clears its output; remove the overwrite option")
        if self.objects:
            raise UserError("nightly does not write --objects yet; run segment for object tables")


def shard_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:24]


def model_key(digest: str) -> str:
    """File-name part for a model: the checkpoint digest's prefix, or a hash of names like 'random-seed0'."""
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest[:16]
    return hashlib.sha256(digest.encode()).hexdigest()[:16]


def published_name(url: str, digest: str) -> str:
    return f"{shard_key(url)}-{model_key(digest)}.parquet"


def read_ledger(output: str, storage_options: dict) -> dict[str, dict]:
    """shard URL -> its ledger record."""
    fs, path = storage.filesystem(storage.join(output, LEDGER_DIR), storage_options)
    fs.invalidate_cache(path)  # object-store filesystems cache listings per process; another run may have written since
    try:
        names = [p for p in fs.ls(path, detail=False) if p.endswith(".json") and not posixpath.basename(p).startswith(".")]
    except FileNotFoundError:
        return {}
    records = {}
    for name, data in (fs.cat(names) if names else {}).items():
        try:
            rec = json.loads(data)
            records[rec["shard_url"]] = rec
        except (ValueError, KeyError, TypeError):  # a hand-edited or foreign file: its shard is redone, not trusted
            log.warning("ignoring unreadable ledger record %s", name)
    return records


def is_done(record: dict | None, shard: storage.Shard, digest: str) -> bool:
    return bool(record) and (record["size"], record["version"], record["model_digest"]) == (shard.size, shard.version, digest)


def clean_leftovers(output: str, storage_options: dict, keep_run: str | None = None) -> int:
    """Remove staging folders and publish temp files that killed runs left behind; returns how many."""
    fs, root = storage.filesystem(output, storage_options)
    removed = 0
    for sub, stale in ((STAGING_DIR, lambda n: n != keep_run), (IMAGES_DIR, lambda n: n.startswith(".") and n.endswith(".tmp"))):
        fs.invalidate_cache(posixpath.join(root, sub))
        try:
            entries = fs.ls(posixpath.join(root, sub), detail=False)
        except FileNotFoundError:
            continue
        for p in entries:
            if stale(posixpath.basename(p.rstrip("/"))):
                fs.rm(p, recursive=True)
                removed += 1
    return removed


def _with_shard_key(table):
    import pyarrow as pa

    keys = pa.array([shard_key(u) for u in table.column("shard").to_pylist()], pa.string())
    return table.append_column(KEY_COLUMN, keys)


def publish(shard: storage.Shard, digest: str, cfg: NightlyConfig, run_id: str, existing: list[str]) -> dict:
    """Commit one shard: its staged rows become one file in OUT/images, older files of the shard go, then the record."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    from rayseg.stats import SCHEMA

    so = cfg.storage_options
    key = shard_key(shard.url)
    staged_url = storage.join(cfg.output, STAGING_DIR, run_id, f"{KEY_COLUMN}={key}")
    pa_fs, staged = storage.pyarrow_filesystem(staged_url, so)
    try:
        table = pads.dataset(staged, filesystem=pa_fs, format="parquet", schema=SCHEMA).to_table()
    except FileNotFoundError:  # a shard that yields no rows (an empty HDF5 dataset or Parquet file)
        table = SCHEMA.empty_table()
    table = table.sort_by("image_id")

    fs, images = storage.filesystem(storage.join(cfg.output, IMAGES_DIR), so)
    name = published_name(shard.url, digest)
    files = []
    if table.num_rows:
        tmp = posixpath.join(images, f".{name}.{run_id}.tmp")
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, posixpath.join(images, name))  # a rename on local disks; on object stores the key appears whole
        files = [name]
    for old in existing:  # the same shard under an older model (a changed shard keeps its name: overwritten above)
        if old.startswith(f"{key}-") and old != name:
            try:
                fs.rm(posixpath.join(images, old))
            except FileNotFoundError:  # gone already: this publish is a retry
                pass
    errors = table.num_rows - table.column("error").null_count
    record = {"shard_url": shard.url, "size": shard.size, "version": shard.version, "model_digest": digest,
              "files": files, "rows": table.num_rows, "errors": errors, "run_id": run_id,
              "committed_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    storage.write_json(storage.join(cfg.output, LEDGER_DIR, f"{key}.json"), record, so)
    return record


def nightly(config: NightlyConfig | None = None, **kwargs) -> dict:
    """Run `rayseg nightly`; returns the summary also written to OUT/_runs/<run id>.json."""
    cfg = config if config is not None else config_from(NightlyConfig, kwargs)
    started, t0 = dt.datetime.now(dt.timezone.utc), time.perf_counter()
    run_id = f"{started:%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    so = cfg.storage_options
    shards, ignored = storage.discover(cfg.inputs, so)

    from rayseg.models import load_bundle

    bundle = load_bundle(cfg.checkpoint, cfg.model, cfg.num_classes, cfg.weights, cfg.input_size, so)
    ledger = read_ledger(cfg.output, so)
    pending = [s for s in shards if not is_done(ledger.get(s.url), s, bundle.digest)]
    changed = sum(1 for s in pending if s.url in ledger)
    cleaned = clean_leftovers(cfg.output, so)
    log.info("nightly %s: %d shards, %d already committed, %d to segment", run_id, len(shards), len(shards) - len(pending), len(pending))

    records: list[dict] = []
    cluster = None  # Ray is only started (or joined) when there is work
    if pending:
        import ray

        from rayseg.pipeline import ENCODE_CPUS, WRITE_ARGS, build_plan, ensure_ray

        ensure_ray(cfg.address, cfg.quiet)
        ray.data.DataContext.get_current().enable_progress_bars = not cfg.quiet and sys.stderr.isatty()
        res = ray.cluster_resources()
        cluster = {"nodes": sum(n["Alive"] for n in ray.nodes()), "CPU": res.get("CPU", 0), "GPU": res.get("GPU", 0)}
        pa_fs, staging = storage.pyarrow_filesystem(storage.join(cfg.output, STAGING_DIR, run_id), so)
        # One plan for all pending shards; rows land in one folder per shard, so each shard commits on its own.
        ds = build_plan(cfg, pending, bundle).map_batches(_with_shard_key, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                                                          num_cpus=ENCODE_CPUS)  # fuses with encode and the write
        ds.write_parquet(staging, filesystem=pa_fs, partition_cols=[KEY_COLUMN], ray_remote_args=WRITE_ARGS)

        fs, images = storage.filesystem(storage.join(cfg.output, IMAGES_DIR), so)
        fs.makedirs(images, exist_ok=True)
        fs.invalidate_cache(images)
        try:
            existing = [posixpath.basename(p) for p in fs.ls(images, detail=False)]
        except FileNotFoundError:  # object stores have no empty folders
            existing = []
        with ThreadPoolExecutor(PUBLISH_THREADS) as pool:
            # publish is idempotent (same file name, same record), so a transient storage error just redoes it
            records = list(pool.map(lambda s: storage.retry(publish, s, bundle.digest, cfg, run_id, existing,
                                                            what=f"publishing {s.url}"), pending))
        storage.remove(storage.join(cfg.output, STAGING_DIR, run_id), so)

    failed = [r["shard_url"] for r in records if r["rows"] and r["errors"] == r["rows"]]
    summary = {
        "command": "nightly",
        "run_id": run_id,
        "date": started.date().isoformat(),
        "output": cfg.output,
        "images_table": storage.join(cfg.output, IMAGES_DIR),
        "nothing_new": not pending,
        "message": f"committed {len(records)} new or changed shard(s)" if pending else "nothing new: every shard is committed for this model",
        "shards": len(shards),
        "shards_new": len(records),
        "shards_changed": changed,
        "shards_skipped": len(shards) - len(pending),
        "shards_failed": len(failed),
        "failed_shards": failed[:20],
        "failed_means": "committed this run with every row an error (nothing segmented); not retried until the shard or model changes",
        "rows": sum(r["rows"] for r in records),
        "errors": sum(r["errors"] for r in records),
        "leftovers_removed": cleaned,
        "ignored_files": ignored,
        "model": bundle.label,
        "model_digest": bundle.digest,
        "cluster": cluster,
        "config": {k: v for k, v in public_config(cfg).items() if k != "overwrite"},  # nightly has no overwrite
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "elapsed_s": round(time.perf_counter() - t0, 3),
        "rayseg_version": __import__("rayseg").__version__,
    }
    storage.write_json(storage.join(cfg.output, RUNS_DIR, f"{run_id}.json"), summary, so)
    return summary


def register(sub) -> None:
    add_command(sub, "nightly", NightlyConfig, lambda cfg: print_summary(nightly(cfg)),
                help="segment only new or changed shards and commit each exactly once", description=__doc__.split("\n\n")[0])
