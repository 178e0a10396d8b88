"""Waves: workers write the plan's rows into data files; the driver commits those files, about once a minute.

The last stage of the plan (`write_stage`, a Ray Data task after the predictor) conforms a batch of output rows to
the table's schema, writes it as one Parquet file under OUT/images/<run id>/, named by the writer's node and a
uuid, and returns one small metadata row per shard in the file: the file, its size and Delta statistics, the
writer's node, and the shard's rows and errors in it. No row of images or masks reaches the driver.

Files reach the driver in any order, as the tasks finish them. A shard can be spread over several files and a file
can hold rows of several shards. The read stage tells a progress.Counter how many rows each shard gave, so the
driver (`WaveWriter`) knows when it holds all of a shard. A file can be committed only once every shard with rows
in it is whole, and a shard only together with all of its files: the driver commits such closed groups of files
and shards. When a group is ready and --commit-seconds have passed since the last commit (for the first wave:
since the first file arrived), or the wave's files reached --commit-mb megabytes, or it holds --commit-every images
(a cap, off by default), the wave is committed (commit.commit) and the next wave starts. Time, not a count, bounds
what a kill loses whatever the model, cluster or backlog: the wave in flight, the shards still arriving and the
rows a write task is gathering (fewer than WRITE_ROWS per task); their files are never committed, and a later full
vacuum deletes them. Waiting for order instead would hold every commit behind the slowest early shard.

Shards that were committed before (changed shards, a new model or output option) are replaced in the same
commit: the files holding their old rows are removed, and the rows of other shards in those files are copied
into a new file first (by Ray tasks, `keep_task`), so a reader sees each shard's old rows or its new ones, never
both and never neither.

Why a task stage and not a stateful writer actor: a task keeps nothing between batches, so Ray runs it again
where a worker dies and its rows are never lost between files; an actor holding an open file would lose rows it
had taken when it died, and Ray Data gives an actor no call at the end of the stream to close its last file.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayseg import commit, layout, storage, table
from rayseg.storage import Shard

log = logging.getLogger("rayseg")

ROW_GROUP_ROWS = 8192  # rows per row group of a data file: readers want few, large row groups
# Rows per data file (the write stage's batch): a task waits for this many rows before it writes, so it bounds what
# a kill loses beyond the wave in flight and how long rows wait for their file; fewer rows make more, smaller files.
# 256 masks of 512x512 are about 2 MB. --commit-every, when smaller, caps it, so a wave can close at its cap.
WRITE_ROWS = 256
# What the write stage hands the driver: one row per (file, shard), a few hundred bytes, never the images' rows.
FILE_SCHEMA = pa.schema([("file", pa.string()), ("bytes", pa.int64()), ("stats", pa.string()), ("node", pa.string()),
                         ("shard", pa.string()), ("rows", pa.int64()), ("errors", pa.int64())])


def conform(batch: pa.Table) -> pa.Table:
    """A plan batch in the table's schema (the objects column is null without --objects)."""
    if "objects" not in batch.column_names:
        batch = batch.append_column("objects", pa.nulls(batch.num_rows, table.NIGHTLY_SCHEMA.field("objects").type))
    return batch.select(table.NIGHTLY_SCHEMA.names).cast(table.NIGHTLY_SCHEMA)


def node_id() -> str:
    """The Ray node this process runs on ("driver" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "driver"


def write_stage(batch: pa.Table, output: str, storage_options: dict | None, run_id: str) -> pa.Table:
    """The write stage: the batch's rows as one data file; returns its metadata, one row per shard (FILE_SCHEMA)."""
    if not batch.num_rows:
        return FILE_SCHEMA.empty_table()
    rows = conform(batch)
    node = node_id()
    rel = f"{run_id}/{node[:12]}-{uuid.uuid4().hex}.parquet"  # relative to the table; unique per run and batch
    size = table.write_file(rows, storage.join(output, layout.IMAGES_DIR, rel), storage_options)
    stats = table.FileStats().update(rows).json()
    shards = rows["shard"].combine_chunks()
    failed = rows["error"].is_valid()
    meta = []
    for url in pc.unique(shards).to_pylist():
        mine = pc.equal(shards, url)
        meta.append({"file": rel, "bytes": size, "stats": stats, "node": node, "shard": url,
                     "rows": pc.sum(mine.cast(pa.int64())).as_py(), "errors": pc.sum(pc.and_(mine, failed).cast(pa.int64())).as_py()})
    return pa.Table.from_pylist(meta, schema=FILE_SCHEMA)


def keep_rows_file(output: str, storage_options: dict | None, rel: str, keep: list[str], new_rel: str) -> tuple[int, str]:
    """Copy the rows of `keep` shards out of data file `rel` into `new_rel`; returns (size, Delta stats json)."""
    kept = table.keep_rows(output, storage_options, rel, keep)
    size = table.write_file(kept, storage.join(output, layout.IMAGES_DIR, new_rel), storage_options)
    return size, table.FileStats().update(kept).json()


class _File:
    __slots__ = ("rel", "bytes", "stats", "node", "shards")

    def __init__(self, rel: str, size: int, stats: str, node: str):
        self.rel, self.bytes, self.stats, self.node = rel, size, stats, node
        self.shards: dict[str, list[int]] = {}  # url -> [rows, errors] in this file


class WaveWriter:
    """Feed it the write stage's metadata (`add`), then `finish`; it commits a wave whenever one is full.

    `shard_rows()` returns {shard URL: rows it gave} for shards read whole since its last call (progress.Counter).
    """

    def __init__(self, shards: list[Shard], state: table.State, lease, cfg, key: str, run_id: str, shard_rows):
        self.by_url = {s.url: s for s in shards}
        self.state, self.lease, self.cfg, self.key, self.run_id = state, lease, cfg, key, run_id
        self.so, self.shard_rows = cfg.storage_options, shard_rows
        self.expected: dict[str, int] = {}  # rows each shard gave, once it was read whole
        self.received: dict[str, int] = {}  # rows of each shard in the files received so far
        self.files: dict[str, _File] = {}  # files received and not yet committed
        self.files_of: dict[str, set[str]] = {}  # shard -> its files not yet committed
        self.written: set[str] = set()  # shards in a wave (this one or a committed one)
        self.nodes: set[str] = set()  # nodes whose files were committed
        self.waves: list[dict] = []
        self.since: float | None = None  # monotonic time of the last commit, or of the first file
        self._reset()

    def _reset(self) -> None:
        self.wave_files: list[_File] = []
        self.wave: list[Shard] = []
        self.per_shard: dict[str, list[int]] = {}  # url -> [rows, errors] in this wave
        self.rows = self.bytes = 0

    @property
    def committed_images(self) -> int:
        return sum(w["rows"] for w in self.waves)

    def add(self, meta: pa.Table) -> None:
        """Metadata rows of the write stage (FILE_SCHEMA)."""
        if not meta.num_rows:
            return
        if self.since is None:
            self.since = time.monotonic()
        for m in meta.to_pylist():
            if m["shard"] not in self.by_url:
                raise RuntimeError(f"the plan gave a row for {m['shard']}, which is not pending")
            f = self.files.get(m["file"])
            if f is None:
                f = self.files[m["file"]] = _File(m["file"], m["bytes"], m["stats"], m["node"])
            f.shards[m["shard"]] = [m["rows"], m["errors"]]
            self.files_of.setdefault(m["shard"], set()).add(m["file"])
            self.received[m["shard"]] = self.received.get(m["shard"], 0) + m["rows"]
        if any(u not in self.expected for u in self.files_of):
            self.expected.update(self.shard_rows())
        self._take_complete(lambda u: u in self.expected and self.received[u] >= self.expected[u])
        self._progress()

    def _take_complete(self, whole) -> None:
        """Move each closed group of files and shards whose shards are all `whole` into the wave, one at a time."""
        seen: set[str] = set()
        for url in list(self.files_of):
            if url in seen or url not in self.files_of:
                continue
            shards, files = self._group(url)
            seen |= shards
            if all(whole(u) for u in shards):
                self._add_to_wave(shards, files)

    def _group(self, url: str) -> tuple[set[str], set[str]]:
        """The shards and files linked to `url` through files they share: what must commit together."""
        shards, files, todo = {url}, set(), [url]
        while todo:
            for rel in self.files_of[todo.pop()]:
                if rel not in files:
                    files.add(rel)
                    for u in self.files[rel].shards:
                        if u not in shards:
                            shards.add(u)
                            todo.append(u)
        return shards, files

    def _add_to_wave(self, shards: set[str], files: set[str]) -> None:
        for rel in sorted(files):
            f = self.files.pop(rel)
            self.wave_files.append(f)
            self.bytes += f.bytes
            for u, (n, e) in f.shards.items():
                counts = self.per_shard.setdefault(u, [0, 0])
                counts[0] += n
                counts[1] += e
                self.rows += n
        for u in sorted(shards):
            del self.files_of[u]
            self.wave.append(self.by_url[u])
            self.written.add(u)
        if self._full():
            self.close()

    def _full(self) -> bool:
        cap = self.cfg.commit_every
        return (time.monotonic() - (self.since or 0) >= self.cfg.commit_seconds or self.bytes >= self.cfg.commit_mb * 2**20
                or (cap is not None and self.rows >= cap))

    def _progress(self) -> None:
        arriving = sum(self.received[u] for u in self.files_of)
        self.lease.progress = {"committed_images": self.committed_images, "images_in_flight": self.rows + arriving,
                               "shards_in_flight": len(self.per_shard) + len(self.files_of), "waves_committed": len(self.waves)}

    def finish(self) -> None:
        """The plan is done, so every shard is complete; shards that gave no rows are committed with none."""
        self._take_complete(lambda u: True)
        for url in self.by_url:
            if url not in self.written:
                self.wave.append(self.by_url[url])
                self.written.add(url)
        if self.wave:
            self.close()

    def close(self) -> None:
        """Commit the wave: its files, and a manifest row for each of its shards."""
        t0 = time.perf_counter()
        number = len(self.waves) + 1
        adds = [table.add_action(f.rel, f.bytes, f.stats) for f in self.wave_files]
        files_of: dict[str, list[str]] = {}
        for f in self.wave_files:
            for u in f.shards:
                files_of.setdefault(u, []).append(f.rel)
        shards = self.wave
        redone = {s.url for s in shards if s.url in self.state.records}
        extra, removes, moved = self._replace(redone, number)
        now = layout.now().isoformat()
        part = [{"shard_url": s.url, "size": s.size, "version": s.version, "key": self.key, "files": sorted(files_of.get(s.url, [])),
                 "rows": self.per_shard.get(s.url, [0, 0])[0], "errors": self.per_shard.get(s.url, [0, 0])[1],
                 "run_id": self.run_id, "committed_at": now} for s in shards]
        part += moved
        self._progress()
        self.lease.renew(self.lease.progress)  # fails if another run has taken the lease: nothing is committed then
        log.info("wave %d: lease renewed, committing %d shards", number, len(shards))
        version = commit.commit(self.state, self.cfg.output, self.so, adds + extra, removes, part,
                               f"{self.run_id}-w{number:05d}.parquet", self.lease.generation, self.run_id)
        nodes = sorted({f.node for f in self.wave_files})
        self.nodes.update(nodes)
        wave = {"wave": number, "shards": len(shards), "rows": self.rows, "errors": sum(c[1] for c in self.per_shard.values()),
                "replaced_shards": len(redone), "files_removed": len(removes),
                "table_version": version, "commit_s": round(time.perf_counter() - t0, 3)}
        self.waves.append(wave)
        self.since = time.monotonic()
        log.info("wave %d committed: %d shards, %d images in %d files written on %d nodes (table version %d)", wave["wave"],
                 wave["shards"], wave["rows"], len(self.wave_files), len(nodes), version)
        self._reset()

    def _replace(self, redone: set[str], number: int) -> tuple[list, list[str], list[dict]]:
        """Files holding old rows of `redone` shards: (adds of the rows to keep, files to remove, moved manifest rows).

        The rows to keep are copied by Ray tasks, all at once, on the cluster: the driver reads no data file."""
        if not redone:
            return [], [], []
        by_file = self.state.files()
        old = sorted({rel for u in redone for rel in self.state.records[u]["files"]})
        jobs = {}
        for n, rel in enumerate(old):
            keep = sorted(u for u in by_file.get(rel, []) if u not in redone)
            if keep:  # copy the other shards' rows into this run's folder; their manifest rows move with them
                jobs[rel] = (f"{self.run_id}/w{number:05d}-kept{n}-{uuid.uuid4().hex[:8]}.parquet", keep)
        copied = dict(zip(jobs, _copy_kept(self.cfg.output, self.so, jobs))) if jobs else {}
        adds = [table.add_action(jobs[rel][0], size, stats) for rel, (size, stats) in copied.items()]
        renamed = {rel: new for rel, (new, _) in jobs.items()}
        moved_urls = sorted({u for _, keep in jobs.values() for u in keep})
        moved = [{**self.state.records[u], "files": sorted(renamed.get(rel, rel) for rel in self.state.records[u]["files"])}
                 for u in moved_urls]
        return adds, old, moved


def _copy_kept(output: str, storage_options: dict | None, jobs: dict[str, tuple[str, list[str]]]) -> list[tuple[int, str]]:
    """keep_rows_file for each (old file -> (new file, shards to keep)) as Ray tasks; [(size, stats)] in order."""
    import ray

    from rayseg import runtime

    task = ray.remote(**runtime.WRITE_ARGS, max_retries=3)(keep_rows_file)
    return ray.get([task.remote(output, storage_options, rel, keep, new) for rel, (new, keep) in jobs.items()])
