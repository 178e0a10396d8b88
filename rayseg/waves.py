"""Waves: workers write the plan's rows into data files; the driver commits those files, about once a minute.

The last stage of the plan (`write_stage`, a Ray Data task after the predictor) conforms a batch of output rows to
the table's schema, writes it as one Parquet file under OUT/images/<run id>/, named by the writer's node and a
uuid, and returns one small metadata row per shard in the file: the file, its size and Delta statistics, the
writer's node, and the shard's rows and errors in it. No row of images or masks reaches the driver.

Files reach the driver in any order, as the tasks finish them. A shard can be spread over several files and a file
can hold rows of several shards. The read stage tells a progress.Counter how many rows each shard gave, so the
driver (`WaveWriter`) knows when it holds all of a shard. A wave commits whole shards only, each with all of its
files, and no committed file holds a row of a shard still arriving: a file that also holds such rows is split
first by a Ray task (`split_file`), the whole shards' rows into a file committed now, the rest into one that
waits. When a shard is whole and --commit-seconds have passed since the last commit (for the first wave: since
the writer started), or the whole shards' files reached --commit-mb megabytes, or they hold --commit-every images
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
    """A plan batch in the table's schema (the objects column is null without --objects, the region columns on
    ordinary rows of a run without huge images)."""
    for field in table.NIGHTLY_SCHEMA:
        if field.name not in batch.column_names:
            batch = batch.append_column(field, pa.nulls(batch.num_rows, field.type))
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
    rel, size, stats = write_data_file(rows, output, storage_options, run_id)  # unique per run and batch
    shards = rows["shard"].combine_chunks()
    failed = rows["error"].is_valid()
    meta = []
    for url in pc.unique(shards).to_pylist():
        mine = pc.equal(shards, url)
        meta.append({"file": rel, "bytes": size, "stats": stats, "node": node, "shard": url,
                     "rows": pc.sum(mine.cast(pa.int64())).as_py(), "errors": pc.sum(pc.and_(mine, failed).cast(pa.int64())).as_py()})
    return pa.Table.from_pylist(meta, schema=FILE_SCHEMA)


def write_data_file(rows: pa.Table, output: str, storage_options: dict | None, folder: str, kind: str = "") -> tuple[str, int, str]:
    """`rows` as a new data file in `folder` (relative to the table), named by this node, `kind` and a uuid; returns
    (its path relative to the table, its size, its Delta stats json)."""
    rel = f"{folder}/{node_id()[:12]}-{kind + '-' if kind else ''}{uuid.uuid4().hex}.parquet"
    size = table.write_file(rows, storage.join(output, layout.IMAGES_DIR, rel), storage_options)
    return rel, size, table.FileStats().update(rows).json()


def keep_rows_file(output: str, storage_options: dict | None, rel: str, keep: list[str], folder: str) -> tuple[str, int, str]:
    """Copy the rows of `keep` shards out of data file `rel` into a new file in `folder` (relative to the table);
    returns (its path relative to the table, its size, its Delta stats json)."""
    return write_data_file(table.keep_rows(output, storage_options, rel, keep), output, storage_options, folder, "kept")


def split_file(output: str, storage_options: dict | None, rel: str, keep: list[str], folder: str):
    """Split uncommitted data file `rel` in two: the rows of `keep` shards, and the others. Returns ((path, size,
    stats json) of each part, the node that wrote them); paths relative to the table. `rel` is left for the driver
    to delete once the parts are committed or waiting (a task run again still finds it)."""
    import pyarrow.compute as pc

    fs, path = storage.pyarrow_filesystem(storage.join(output, layout.IMAGES_DIR, rel), storage_options)
    rows = pq.read_table(path, filesystem=fs, schema=table.NIGHTLY_SCHEMA)
    mine = pc.is_in(rows["shard"], pa.array(keep, pa.string()))
    now, rest = (write_data_file(part, output, storage_options, folder) for part in (rows.filter(mine), rows.filter(pc.invert(mine))))
    return now, rest, node_id()


def run_tasks(fn, calls: list[tuple]) -> list:
    """fn(*args) for each args in `calls`, as Ray tasks run at once on the cluster; in this process without Ray."""
    if not calls:
        return []
    import ray

    if not ray.is_initialized():
        return [fn(*args) for args in calls]
    from rayseg import runtime

    task = ray.remote(**runtime.COMMIT_TASK_ARGS, max_retries=3)(fn)
    return ray.get([task.remote(*args) for args in calls])


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
        self.received: dict[str, list[int]] = {}  # [rows, errors] of each pending shard in the files received so far
        self.files: dict[str, _File] = {}  # files received and not yet committed
        self.files_of: dict[str, set[str]] = {}  # pending shard -> its files
        self.written: set[str] = set()  # shards committed (or in the wave being committed)
        self.waves: list[dict] = []
        # monotonic time of the last commit, or of the start (files come in steps of WRITE_ROWS rows: timed from the
        # first file, a short run on a small cluster made its first commit near its end)
        self.since = time.monotonic()

    @property
    def committed_images(self) -> int:
        return sum(w["rows"] for w in self.waves)

    def add(self, meta: pa.Table) -> None:
        """Metadata rows of the write stage (FILE_SCHEMA)."""
        if not meta.num_rows:
            return
        for m in meta.to_pylist():
            url = m["shard"]
            if url not in self.by_url or url in self.written:
                raise RuntimeError(f"the plan gave a row for {url}, which is not pending")
            f = self.files.get(m["file"])
            if f is None:
                f = self.files[m["file"]] = _File(m["file"], m["bytes"], m["stats"], m["node"])
            f.shards[url] = [m["rows"], m["errors"]]
            self.files_of.setdefault(url, set()).add(m["file"])
            counts = self.received.setdefault(url, [0, 0])
            counts[0] += m["rows"]
            counts[1] += m["errors"]
        if any(u not in self.expected for u in self.files_of):
            self.expected.update(self.shard_rows())
        whole = [u for u in self.files_of if u in self.expected and self.received[u][0] >= self.expected[u]]
        if whole and self._full(whole):
            self.close(whole)
        self._progress()

    def _full(self, whole: list[str]) -> bool:
        cap = self.cfg.commit_every
        rows = sum(self.received[u][0] for u in whole)
        if time.monotonic() - self.since >= self.cfg.commit_seconds or (cap is not None and rows >= cap):
            return True
        share = {rel: 0 for u in whole for rel in self.files_of[u]}  # each file's bytes, by its rows of whole shards
        for u in whole:
            for rel in self.files_of[u]:
                share[rel] += self.files[rel].shards[u][0]
        return sum(self.files[rel].bytes * n / sum(c[0] for c in self.files[rel].shards.values())
                   for rel, n in share.items()) >= self.cfg.commit_mb * 2**20

    def _progress(self) -> None:
        self.lease.progress = {"committed_images": self.committed_images,
                               "images_in_flight": sum(self.received[u][0] for u in self.files_of),
                               "shards_in_flight": len(self.files_of), "waves_committed": len(self.waves)}

    def expect(self, rows: dict[str, int]) -> None:
        """Shards whose row counts are known without the read stage's counter (a huge image: one row)."""
        self.expected.update(rows)

    def finish(self) -> None:
        """The plan is done, so every shard is complete; shards that gave no rows are committed with none."""
        self.close(list(self.files_of), empty=[u for u in self.by_url if u not in self.written and u not in self.files_of])

    def close(self, whole: list[str], empty: list[str] = ()) -> None:
        """Commit a wave: the `whole` shards, with all of their files, and a manifest row for each (and for `empty`).

        A file that also holds rows of shards still arriving is split first, by a Ray task: the whole shards' rows
        into a file committed now, the others' into a file that waits for them. Without the split a file would wait
        for the shards it shares with the next file, that file for the one after it, and so on to the end of the
        run, since the actors' rows interleave (`split_file`)."""
        if not whole and not empty:
            return
        t0 = time.perf_counter()
        number = len(self.waves) + 1
        taken = set(whole)
        mixed = sorted({rel for u in whole for rel in self.files_of[u] if set(self.files[rel].shards) - taken})
        jobs = {rel: sorted(taken & set(self.files[rel].shards)) for rel in mixed}
        parts = dict(zip(jobs, run_tasks(split_file, [(self.cfg.output, self.so, rel, keep, self.run_id) for rel, keep in jobs.items()])))
        adds, files_of = [], {u: [] for u in whole}
        for rel in sorted({rel for u in whole for rel in self.files_of[u]}):
            f = self.files.pop(rel)
            if rel in parts:  # the whole shards' part is committed; the rest waits, as a file of its own
                (now, size, stats), (rest, rest_size, rest_stats), node = parts[rel]
                adds.append(table.add_action(now, size, stats))
                left = self.files[rest] = _File(rest, rest_size, rest_stats, node)
                for u, counts in f.shards.items():
                    if u in taken:
                        files_of[u].append(now)
                    else:
                        left.shards[u] = counts
                        self.files_of[u].discard(rel)
                        self.files_of[u].add(rest)
            else:
                adds.append(table.add_action(rel, f.bytes, f.stats))
                for u in f.shards:
                    files_of[u].append(rel)
        shards = [self.by_url[u] for u in sorted(taken)] + [self.by_url[u] for u in empty]
        counts = {u: self.received.pop(u) for u in whole}
        for u in whole:
            del self.files_of[u]
        self.written.update(s.url for s in shards)
        redone = {s.url for s in shards if s.url in self.state.records}
        extra, removes, moved = self._replace(redone)
        now_iso = layout.now().isoformat()
        part = [{"shard_url": s.url, "size": s.size, "version": s.version, "key": self.key, "files": sorted(files_of.get(s.url, [])),
                 "rows": counts.get(s.url, [0, 0])[0], "errors": counts.get(s.url, [0, 0])[1],
                 "run_id": self.run_id, "committed_at": now_iso} for s in shards]
        part += moved
        rows = sum(c[0] for c in counts.values())
        self._progress()
        self.lease.progress["images_in_flight"] += rows  # the wave's rows are not committed until the commit below
        self.lease.renew(self.lease.progress)  # fails if another run has taken the lease: nothing is committed then
        log.info("wave %d: lease renewed, committing %d shards", number, len(shards))
        version = commit.commit(self.state, self.cfg.output, self.so, adds + extra, removes, part,
                               f"{self.run_id}-w{number:05d}.parquet", self.lease.generation, self.run_id)
        wave = {"wave": number, "shards": len(shards), "rows": rows, "errors": sum(c[1] for c in counts.values()),
                "replaced_shards": len(redone), "files_removed": len(removes), "table_version": version,
                "commit_s": round(time.perf_counter() - t0, 3)}
        self.waves.append(wave)
        self.since = time.monotonic()
        if parts:  # no commit names the files that were split: their rows are in the parts now
            fs, _ = storage.pyarrow_filesystem(storage.join(self.cfg.output, layout.IMAGES_DIR), self.so)
            for rel in parts:
                fs.delete_file(storage.pyarrow_filesystem(storage.join(self.cfg.output, layout.IMAGES_DIR, rel), self.so)[1])
        log.info("wave %d committed: %d shards, %d images in %d files, %d of them split (table version %d)", wave["wave"],
                 wave["shards"], rows, len(adds), len(parts), version)
        self._progress()

    def _replace(self, redone: set[str]) -> tuple[list, list[str], list[dict]]:
        """Files holding old rows of `redone` shards: (adds of the rows to keep, files to remove, moved manifest rows).

        The rows to keep are copied by Ray tasks, all at once, on the cluster: the driver reads no data file."""
        if not redone:
            return [], [], []
        by_file = self.state.files()
        old = sorted({rel for u in redone for rel in self.state.records[u]["files"]})
        # copy the other shards' rows of each old file into this run's folder; their manifest rows move with them
        jobs = {rel: keep for rel in old if (keep := sorted(u for u in by_file.get(rel, []) if u not in redone))}
        copied = dict(zip(jobs, run_tasks(keep_rows_file, [(self.cfg.output, self.so, rel, keep, self.run_id) for rel, keep in jobs.items()])))
        adds = [table.add_action(new, size, stats) for new, size, stats in copied.values()]
        moved_urls = sorted({u for keep in jobs.values() for u in keep})
        moved = [{**self.state.records[u], "files": sorted(copied[rel][0] if rel in copied else rel for rel in self.state.records[u]["files"])}
                 for u in moved_urls]
        return adds, old, moved



# ---- compaction ------------------------------------------------------------------------------------------------

COMPACT_MIN_FILES = 8  # fewer small files than this are left as they are: not worth a commit of their own


def merge_files(output: str, storage_options: dict | None, rels: list[str], folder: str) -> tuple[str, int, str]:
    """The rows of data files `rels`, in their order, as one new file in `folder` (relative to the table); returns
    (its path relative to the table, its size, its Delta stats json)."""
    parts = []
    for rel in rels:
        fs, path = storage.pyarrow_filesystem(storage.join(output, layout.IMAGES_DIR, rel), storage_options)
        parts.append(pq.read_table(path, filesystem=fs, schema=table.NIGHTLY_SCHEMA))
    return write_data_file(pa.concat_tables(parts), output, storage_options, folder, "compacted")


def compaction_bins(sizes: dict[str, int], named: set[str], target: int) -> list[list[str]]:
    """Groups of small files to merge, each group's bytes at most `target`: the files under half of it that the
    manifest names (`named`), in path order (a run's files sit together), and only groups of two or more."""
    bins: list[list[str]] = []
    current, total = [], 0
    for rel in sorted(r for r, n in sizes.items() if n < target // 2 and r in named):
        if current and total + sizes[rel] > target:
            bins.append(current)
            current, total = [], 0
        current.append(rel)
        total += sizes[rel]
    bins.append(current)
    bins = [b for b in bins if len(b) > 1]
    return bins if sum(map(len, bins)) >= COMPACT_MIN_FILES else []


def compact(state: table.State, output: str, storage_options: dict | None, lease, run_id: str, target_mb: int) -> dict:
    """Merge the table's small data files into files of up to `target_mb` MB: one commit, fenced like a wave.

    Workers write a file per write-stage batch (WRITE_ROWS rows), so a night leaves many small files; readers pay
    per file. The files are merged by Ray tasks (the driver reads no data file); the commit removes the small files
    and adds the merged ones without changing any row (dataChange off), and its manifest part names each affected
    shard's new list of files, so the manifest never names a file the table no longer holds. The small files stay
    on storage for --keep-hours (time travel), like any file a commit replaced.
    """
    t0 = time.perf_counter()
    by_file = state.files()
    bins = compaction_bins(table.file_sizes(state), set(by_file), target_mb * 2**20) if target_mb else []
    if not bins:
        return {"files_merged": 0, "files_written": 0}
    merged = run_tasks(merge_files, [(output, storage_options, rels, run_id) for rels in bins])
    adds = [table.add_action(new, size, stats, data_change=False) for new, size, stats in merged]
    renamed = {rel: new for rels, (new, _, _) in zip(bins, merged) for rel in rels}
    moved = [{**state.records[u], "files": sorted({renamed.get(rel, rel) for rel in state.records[u]["files"]})}
             for u in sorted({u for rel in renamed for u in by_file[rel]})]
    lease.renew(lease.progress)  # fails if another run has taken the lease: nothing is committed then
    version = commit.commit(state, output, storage_options, adds, sorted(renamed), moved, f"{run_id}-compact.parquet",
                            lease.generation, run_id, data_change=False)
    result = {"files_merged": len(renamed), "files_written": len(adds), "bytes": sum(size for _, size, _ in merged),
              "table_version": version, "seconds": round(time.perf_counter() - t0, 3)}
    log.info("compacted %d small data files into %d (table version %d)", len(renamed), len(adds), version)
    return result
