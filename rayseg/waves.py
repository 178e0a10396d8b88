"""Waves: the rows of one Ray Data plan over all pending shards, committed about once a minute.

Rows reach the driver in any order, as the actors finish them. The read stage tells a progress.Counter how many
rows each shard gave, so the writer knows when it holds all of a shard: until then the shard's rows wait in
memory; then they go into the current wave's Parquet file. When a shard completes and --commit-seconds have
passed since the last commit (for the first wave: since the first rows arrived), or the wave's file reached
--commit-mb megabytes, or it holds --commit-every images (a cap, off by default), the file is closed and
committed (commit.commit), and the next wave starts. Time, not a count, bounds what a kill loses whatever the
model, cluster or backlog: the wave in flight and the shards still arriving, about --commit-seconds of work;
their rows are never committed. Waiting for order instead would hold every commit behind the slowest early shard.

Shards that were committed before (changed shards, a new model or output option) are replaced in the same
commit: the files holding their old rows are removed, and the rows of other shards in those files are copied
into a new file first, so a reader sees each shard's old rows or its new ones, never both and never neither.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayseg import commit, layout, storage, table
from rayseg.storage import Shard

log = logging.getLogger("rayseg")

ROW_GROUP_ROWS = 8192  # rows buffered before a row group is written: readers want few, large row groups


def conform(batch: pa.Table) -> pa.Table:
    """A plan batch in the table's schema (the objects column is null without --objects)."""
    if "objects" not in batch.column_names:
        batch = batch.append_column("objects", pa.nulls(batch.num_rows, table.NIGHTLY_SCHEMA.field("objects").type))
    return batch.select(table.NIGHTLY_SCHEMA.names).cast(table.NIGHTLY_SCHEMA)


class WaveWriter:
    """Feed it the plan's batches (`add`), then `finish`; it commits a wave whenever one is full.

    `shard_rows()` returns {shard URL: rows it gave} for the shards read whole so far (progress.Counter).
    """

    def __init__(self, shards: list[Shard], state: table.State, lease, cfg, key: str, run_id: str, shard_rows):
        self.by_url = {s.url: s for s in shards}
        self.state, self.lease, self.cfg, self.key, self.run_id = state, lease, cfg, key, run_id
        self.so, self.shard_rows = cfg.storage_options, shard_rows
        self.arriving: dict[str, list[pa.Table]] = {}  # rows of shards not yet complete
        self.received: dict[str, int] = {}
        self.written: set[str] = set()  # shards whose rows went into a wave (this one or a committed one)
        self.waves: list[dict] = []
        self.since: float | None = None  # monotonic time of the last commit, or of the first rows
        self._reset()

    def _reset(self) -> None:
        self.writer, self.buffer, self.rows, self.bytes, self.stats = None, [], 0, 0, table.FileStats()
        self.per_shard: dict[str, list[int]] = {}  # url -> [rows, errors]
        self.wave: list[Shard] = []

    @property
    def committed_images(self) -> int:
        return sum(w["rows"] for w in self.waves)

    def _wave_file(self, suffix: str = "") -> str:
        return f"{self.run_id}/w{len(self.waves) + 1:05d}{suffix}.parquet"  # relative to the table

    def add(self, batch: pa.Table) -> None:
        if not batch.num_rows:
            return
        if self.since is None:
            self.since = time.monotonic()
        for url in pc.unique(batch["shard"]).to_pylist():
            if url not in self.by_url:
                raise RuntimeError(f"the plan gave a row for {url}, which is not pending")
            piece = batch.filter(pc.equal(batch["shard"], url))
            self.arriving.setdefault(url, []).append(piece)
            self.received[url] = self.received.get(url, 0) + piece.num_rows
        self._take_complete(self.shard_rows() if self.arriving else {})

    def _take_complete(self, expected: dict[str, int] | None) -> None:
        """Move the shards whose rows have all arrived into the wave (all of them when `expected` is None)."""
        for url in list(self.arriving):
            if expected is None or (url in expected and self.received[url] >= expected[url]):
                for piece in self.arriving.pop(url):
                    self._write(piece, url)
                self._add_to_wave(url)

    def _add_to_wave(self, url: str) -> None:
        self.wave.append(self.by_url[url])
        self.written.add(url)
        if self._full():
            self.close()

    def _full(self) -> bool:
        cap = self.cfg.commit_every
        return (time.monotonic() - (self.since or 0) >= self.cfg.commit_seconds or self.bytes >= self.cfg.commit_mb * 2**20
                or (cap is not None and self.rows >= cap))

    def _write(self, piece: pa.Table, url: str) -> None:
        piece = conform(piece)
        counts = self.per_shard.setdefault(url, [0, 0])
        counts[0] += piece.num_rows
        counts[1] += piece.num_rows - piece["error"].null_count
        self.rows += piece.num_rows
        self.bytes += piece.nbytes
        self.buffer.append(piece)
        self.stats.update(piece)
        if sum(b.num_rows for b in self.buffer) >= ROW_GROUP_ROWS:
            self._flush()
        arriving = sum(self.received[u] for u in self.arriving)
        self.lease.progress = {"committed_images": self.committed_images, "images_in_flight": self.rows + arriving,
                               "shards_in_flight": len(self.per_shard) + len(self.arriving), "waves_committed": len(self.waves)}

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            fs, path = table.sink(storage.join(self.cfg.output, layout.IMAGES_DIR, self._wave_file()), self.so)
            self.writer = pq.ParquetWriter(path, table.NIGHTLY_SCHEMA, filesystem=fs)
        self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=ROW_GROUP_ROWS)
        self.buffer = []

    def finish(self) -> None:
        """The plan is done, so every shard is complete; shards that gave no rows are committed with none."""
        self._take_complete(None)
        for url in self.by_url:
            if url not in self.written:
                self.wave.append(self.by_url[url])
                self.written.add(url)
        if self.wave:
            self.close()

    def close(self) -> None:
        """Commit the wave: its file, and a manifest row for each of its shards."""
        t0 = time.perf_counter()
        self._flush()
        rel, adds, number = "", [], len(self.waves) + 1
        if self.writer is not None:
            rel = self._wave_file()
            self.writer.close()
            adds.append(table.add_action(rel, table.file_size(self.cfg.output, rel, self.so), self.stats))
        shards = self.wave
        redone = {s.url for s in shards if s.url in self.state.records}
        extra, removes, moved = self._replace(redone)
        now = layout.now().isoformat()
        part = [{"shard_url": s.url, "size": s.size, "version": s.version, "key": self.key,
                 "file": rel if self.per_shard.get(s.url, [0])[0] else "", "rows": self.per_shard.get(s.url, [0, 0])[0],
                 "errors": self.per_shard.get(s.url, [0, 0])[1], "run_id": self.run_id, "committed_at": now} for s in shards]
        part += moved
        self.lease.renew(self.lease.progress)  # fails if another run has taken the lease: nothing is committed then
        log.info("wave %d: lease renewed, committing %d shards", number, len(shards))
        version = commit.commit(self.state, self.cfg.output, self.so, adds + extra, removes, part,
                               f"{self.run_id}-w{number:05d}.parquet", self.lease.generation, self.run_id)
        wave = {"wave": number, "shards": len(shards), "rows": self.rows, "errors": sum(c[1] for c in self.per_shard.values()),
                "replaced_shards": len(redone), "files_removed": len(removes), "table_version": version,
                "commit_s": round(time.perf_counter() - t0, 3)}
        self.waves.append(wave)
        self.since = time.monotonic()
        log.info("wave %d committed: %d shards, %d images (table version %d)", wave["wave"], wave["shards"], wave["rows"], version)
        self._reset()

    def _replace(self, redone: set[str]) -> tuple[list, list[str], list[dict]]:
        """Files holding old rows of `redone` shards: (adds of the rows to keep, files to remove, moved manifest rows)."""
        if not redone:
            return [], [], []
        by_file = self.state.files()
        old = sorted({self.state.records[u]["file"] for u in redone} - {""})
        adds, moved = [], []
        for n, rel in enumerate(old):
            keep = [u for u in by_file.get(rel, []) if u not in redone]
            if keep:  # copy the other shards' rows into this wave's folder; their manifest rows move with them
                kept = table.keep_rows(self.cfg.output, self.so, rel, keep)
                new_rel = self._wave_file(f"-kept{n}")
                size = table.write_file(kept, storage.join(self.cfg.output, layout.IMAGES_DIR, new_rel), self.so)
                adds.append(table.add_action(new_rel, size, table.FileStats().update(kept)))
                moved += [{**self.state.records[u], "file": new_rel} for u in keep]
        return adds, old, moved
