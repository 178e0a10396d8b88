"""The nightly manifest beside the Delta table: reading it while another run folds it, and what a fold deletes.

Real Delta commits (delta-rs) on a local folder; no Ray.
"""

from __future__ import annotations

import os
import time

from rayseg import table


def manifest_row(url: str, run: str = "r1") -> dict:
    return {"shard_url": url, "size": 10, "version": "1", "key": "k", "file": None, "rows": 1, "errors": 0,
            "run_id": run, "committed_at": "2026-12-04T00:00:00Z"}


def commit_shard(out: str, state: table.State, url: str, n: int) -> None:
    table.commit(state, out, None, [], [], [manifest_row(url)], f"part-{n:04d}.parquet", generation=1, run_id="r1")


def new_table(tmp_path, shards: list[str]) -> tuple[str, table.State]:
    out = str(tmp_path / "out")
    state = table.State({}, table=table.open_table(out, None, create=True))
    for n, url in enumerate(shards):
        commit_shard(out, state, url, n)
    return out, state


def parts_dir(out: str) -> str:
    return os.path.join(out, table.MANIFEST_DIR, table.PARTS_DIR)


def test_a_fold_between_reading_the_pointer_and_the_snapshot_is_read_through(tmp_path, monkeypatch):
    out, state = new_table(tmp_path, ["s://a", "s://b"])
    assert table.compact_manifest(out, None, table.read_state(out, None))
    commit_shard(out, state, "s://c", 2)

    real, folds = table._read_rows, []

    def fold_first(url, so):  # another run folds the manifest after this reader took the pointer
        if not folds:
            folds.append("folding")
            folds[0] = table.compact_manifest(out, None, table._read_state_once(out, None, table.open_table(out, None)))
        return real(url, so)

    monkeypatch.setattr(table, "_read_rows", fold_first)
    seen = table.read_state(out, None)
    assert folds == [True]  # the snapshot the reader's pointer named was deleted under it
    assert sorted(seen.records) == ["s://a", "s://b", "s://c"] and seen.version == seen.snapshot_version == 3  # create, a, b, c


def test_a_fold_deletes_what_it_folded_and_keeps_a_part_it_did_not_read(tmp_path):
    out, state = new_table(tmp_path, ["s://a", "s://b"])
    read = table.read_state(out, None)
    assert sorted(read.parts) == ["part-0000.parquet", "part-0001.parquet"]
    commit_shard(out, state, "s://c", 2)  # committed after `read` was taken: its part is not folded by it
    orphan = os.path.join(parts_dir(out), "part-never-committed.parquet")
    open(orphan, "wb").write(b"x")
    assert table.compact_manifest(out, None, read)
    assert sorted(os.listdir(parts_dir(out))) == ["part-0002.parquet", "part-never-committed.parquet"]
    assert sorted(table.read_state(out, None).records) == ["s://a", "s://b", "s://c"]

    old = time.time() - table.ORPHAN_PART_S - 60  # a killed run's wave, a day on
    os.utime(orphan, (old, old))
    assert table.compact_manifest(out, None, table.read_state(out, None))
    assert os.listdir(parts_dir(out)) == []
    snapshots = [f for f in os.listdir(os.path.join(out, table.MANIFEST_DIR)) if f.startswith("snapshot-")]
    assert snapshots == ["snapshot-00000000000000000003.parquet"]  # the older snapshot went with the fold
