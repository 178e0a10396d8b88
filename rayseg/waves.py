"""Waves: the rows of one Ray Data plan over all pending shards, committed a few thousand images at a time.

The plan runs with `preserve_order`, so rows reach the driver in the order of the work units: once a row of
shard j arrives, every shard before j is complete. Rows stream into the current wave's Parquet file; when the
wave holds --commit-every images or --commit-mb megabytes and a shard ends, the file is closed and committed
(table.commit), and the next wave starts. A kill loses at most the wave in flight; its file is never committed.

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

from rayseg import layout, storage, table
from rayseg.storage import Shard

log = logging.getLogger("rayseg")

ROW_GROUP_ROWS = 8192  # rows buffered before a row group is written: readers want few, large row groups


def conform(batch: pa.Table) -> pa.Table:
    """A plan batch in the table's schema (the objects column is null without --objects)."""
    if "objects" not in batch.column_names:
        batch = batch.append_column("objects", pa.nulls(batch.num_rows, table.NIGHTLY_SCHEMA.field("objects").type))
    return batch.select(table.NIGHTLY_SCHEMA.names).cast(table.NIGHTLY_SCHEMA)


class WaveWriter:
    """Feed it the plan's batches in order (`add`), then `finish`; it commits a wave whenever one is full."""

    def __init__(self, order: list[Shard], state: table.State, lease, cfg, key: str, run_id: str):
        self.order, self.index = order, {s.url: i for i, s in enumerate(order)}
        self.state, self.lease, self.cfg, self.key, self.run_id = state, lease, cfg, key, run_id
        self.so = cfg.storage_options
        self.start = self.current = 0  # the wave holds shards order[start:current + 1]
        self.waves: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.writer, self.buffer, self.rows, self.bytes, self.stats = None, [], 0, 0, table.FileStats()
        self.per_shard: dict[str, list[int]] = {}  # url -> [rows, errors]

    @property
    def committed_images(self) -> int:
        return sum(w["rows"] for w in self.waves)

    def _wave_file(self, suffix: str = "") -> str:
        return f"{self.run_id}/w{len(self.waves) + 1:05d}{suffix}.parquet"  # relative to the table

    def add(self, batch: pa.Table) -> None:
        if not batch.num_rows:
            return
        idx = pa.array([self.index.get(u, -1) for u in batch["shard"].to_pylist()], pa.int64())
        if pc.min(idx).as_py() < 0:
            raise RuntimeError("the plan gave a row for a shard that is not pending")
        # split where the shard index changes: each piece holds one shard's rows
        bounds = [0, *(pc.indices_nonzero(pc.not_equal(idx[1:], idx[:-1])).to_numpy() + 1).tolist(), batch.num_rows]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            j = idx[lo].as_py()
            if j < self.current:
                raise RuntimeError(f"rows of shard {self.order[j].url} arrived after a later shard's")
            if j > self.current and self._full():
                self.close(upto=j)
            self.current = j
            self._write(batch.slice(lo, hi - lo), self.order[j].url)

    def _full(self) -> bool:
        return self.rows >= self.cfg.commit_every or self.bytes >= self.cfg.commit_mb * 2**20

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
        self.lease.progress = {"committed_images": self.committed_images, "images_in_flight": self.rows,
                               "shards_in_flight": len(self.per_shard), "waves_committed": len(self.waves)}

    def _flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None:
            fs, path = table.sink(storage.join(self.cfg.output, layout.IMAGES_DIR, self._wave_file()), self.so)
            self.writer = pq.ParquetWriter(path, table.NIGHTLY_SCHEMA, filesystem=fs)
        self.writer.write_table(pa.concat_tables(self.buffer), row_group_size=ROW_GROUP_ROWS)
        self.buffer = []

    def finish(self) -> None:
        if self.start < len(self.order):
            self.close(upto=len(self.order))

    def close(self, upto: int) -> None:
        """Commit the wave: shards order[start:upto] (those without rows are committed with none)."""
        t0 = time.perf_counter()
        self._flush()
        rel, adds, number = "", [], len(self.waves) + 1
        if self.writer is not None:
            rel = self._wave_file()
            self.writer.close()
            adds.append(table.add_action(rel, table.file_size(self.cfg.output, rel, self.so), self.stats))
        shards = self.order[self.start:upto]
        redone = {s.url for s in shards if s.url in self.state.records}
        extra, removes, moved = self._replace(redone)
        now = layout.now().isoformat()
        part = [{"shard_url": s.url, "size": s.size, "version": s.version, "key": self.key,
                 "file": rel if self.per_shard.get(s.url, [0])[0] else "", "rows": self.per_shard.get(s.url, [0, 0])[0],
                 "errors": self.per_shard.get(s.url, [0, 0])[1], "run_id": self.run_id, "committed_at": now} for s in shards]
        part += moved
        self.lease.renew(self.lease.progress)  # fails if another run has taken the lease: nothing is committed then
        version = table.commit(self.state, self.cfg.output, self.so, adds + extra, removes, part,
                               f"{self.run_id}-w{number:05d}.parquet", self.lease.generation, self.run_id)
        wave = {"wave": number, "shards": len(shards), "rows": self.rows, "errors": sum(c[1] for c in self.per_shard.values()),
                "replaced_shards": len(redone), "files_removed": len(removes), "table_version": version,
                "commit_s": round(time.perf_counter() - t0, 3)}
        self.waves.append(wave)
        log.info("wave %d committed: %d shards, %d images (table version %d)", wave["wave"], wave["shards"], wave["rows"], version)
        self.start = self.current = upto
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
