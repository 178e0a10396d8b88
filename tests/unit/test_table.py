"""The nightly manifest beside the Delta table: reading it while another run folds it, and what a fold deletes.

Real Delta commits (delta-rs) on a local folder (and a reader on S3, moto on loopback); no Ray.
"""

from __future__ import annotations

import os
import time

import pytest

from rayseg import commit, layout, table


def manifest_row(url: str, run: str = "r1") -> dict:
    return {"shard_url": url, "size": 10, "version": "1", "key": "k", "files": [], "rows": 1, "errors": 0,
            "run_id": run, "committed_at": "2026-12-04T00:00:00Z"}


def commit_shard(out: str, state: table.State, url: str, n: int, opts: dict | None = None) -> None:
    commit.commit(state, out, opts, [], [], [manifest_row(url)], f"r1-w{n:04d}.parquet", generation=1, run_id="r1")


def new_table(tmp_path, shards: list[str], at: tuple[str, dict | None] | None = None) -> tuple[str, table.State]:
    """A table at `at` (OUT, storage options; default a local folder) with one committed wave per shard."""
    out, opts = at or (str(tmp_path / "out"), None)
    state = table.State({}, table=table.open_table(out, opts, create=True))
    for n, url in enumerate(shards):
        commit_shard(out, state, url, n, opts)
    return out, state


@pytest.fixture(params=["local", "s3"])
def site(request, tmp_path) -> tuple[str, dict | None]:
    """Where OUT lives: a local folder, or a bucket on the S3 endpoint (moto on loopback, s3fs as the client)."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    bucket, opts = request.getfixturevalue("s3")
    return f"{bucket}/out", opts


def parts_dir(out: str) -> str:
    return os.path.join(out, table.MANIFEST_DIR, table.PARTS_DIR)


def test_a_fold_between_reading_the_pointer_and_the_snapshot_is_read_through(tmp_path, monkeypatch, site):
    out, state = new_table(tmp_path, ["s://a", "s://b"], site)
    so = site[1]
    assert table.compact_manifest(out, so, table.read_state(out, so))
    commit_shard(out, state, "s://c", 2, so)

    real, folds = table._read_rows, []

    def fold_first(url, so):  # another run folds the manifest after this reader took the pointer
        if not folds:
            folds.append("folding")
            folds[0] = table.compact_manifest(out, site[1], table._read_state_once(out, site[1], table.open_table(out, site[1])))
        return real(url, so)

    monkeypatch.setattr(table, "_read_rows", fold_first)
    seen = table.read_state(out, so)
    assert folds == [True]  # the snapshot the reader's pointer named was deleted under it
    assert sorted(seen.records) == ["s://a", "s://b", "s://c"] and seen.version == seen.snapshot_version == 3  # create, a, b, c


def test_a_fold_deletes_what_it_folded_and_keeps_a_part_it_did_not_read(tmp_path):
    out, state = new_table(tmp_path, ["s://a", "s://b"])
    read = table.read_state(out, None)
    assert sorted(read.parts) == ["r1-w0000.parquet", "r1-w0001.parquet"]
    commit_shard(out, state, "s://c", 2)  # committed after `read` was taken: its part is not folded by it
    orphan = os.path.join(parts_dir(out), "r1-w0009.parquet")  # this run's, never committed
    fenced = os.path.join(parts_dir(out), "dead-run-w0001.parquet")  # a run fenced out or killed before its commit
    for path in (orphan, fenced):
        open(path, "wb").write(b"x")
    assert table.compact_manifest(out, None, read)  # no run id: nothing but what it folded
    assert sorted(os.listdir(parts_dir(out))) == ["dead-run-w0001.parquet", "r1-w0002.parquet", "r1-w0009.parquet"]
    assert sorted(table.read_state(out, None).records) == ["s://a", "s://b", "s://c"]

    assert table.compact_manifest(out, None, table.read_state(out, None), run_id="r1")  # the fenced holder's fold
    assert os.listdir(parts_dir(out)) == ["r1-w0009.parquet"]
    old = time.time() - table.ORPHAN_PART_S - 60  # a day on
    os.utime(orphan, (old, old))
    commit_shard(out, state, "s://d", 3)
    assert table.compact_manifest(out, None, table.read_state(out, None), run_id="r1")
    assert os.listdir(parts_dir(out)) == []
    snapshots = [f for f in os.listdir(os.path.join(out, table.MANIFEST_DIR)) if f.startswith("snapshot-")]
    assert snapshots == ["snapshot-00000000000000000004.parquet"]  # older snapshots went with each fold
    assert sorted(table.read_state(out, None).records) == ["s://a", "s://b", "s://c", "s://d"]


def wave_commits(out: str, opts: dict | None = None) -> list[dict]:
    """The commitInfo of every commit that named a manifest part, oldest first."""
    import json

    from rayseg import storage

    fs, log_dir = storage.filesystem(storage.join(out, "images", "_delta_log"), opts)
    fs.invalidate_cache(log_dir)
    infos = [json.loads(line)["commitInfo"] for f in sorted(fs.ls(log_dir, detail=False)) if f.endswith(".json")
             for line in fs.cat_file(f).decode().splitlines() if '"commitInfo"' in line]
    return [i for i in infos if table.PART_KEY in i]


def test_a_run_that_lost_its_lease_commits_nothing_after_the_new_holders_fence(tmp_path, site):
    """Run A (generation 1) read the table, stalled past its lease, and resumes after run B took over (generation 2)
    and fenced: A's commit is refused with LeaseLost, and B, committing the same shard, leaves it there once."""
    from rayseg.lease import LeaseLost

    out, a = new_table(tmp_path, ["s://a"], site)
    so = site[1]
    commit.fence(out, so, 2, "run-b")
    with pytest.raises(LeaseLost, match="lost its lease: another run \\(lease generation 2\\) took the output over"):
        commit.commit(a, out, so, [], [], [manifest_row("s://b", "run-a")], "part-a.parquet", generation=1, run_id="run-a")
    b = table.read_state(out, so)
    commit.commit(b, out, so, [], [], [manifest_row("s://b", "run-b")], "part-b.parquet", generation=2, run_id="run-b")
    assert [c[table.PART_KEY] for c in wave_commits(out, so)] == ["r1-w0000.parquet", "part-b.parquet"]
    records = table.read_state(out, so).records
    assert sorted(records) == ["s://a", "s://b"] and records["s://b"]["run_id"] == "run-b"
    assert commit.generation_of(b.table.transaction_version(table.APP_ID)) == 2


def flaky(dt, failures: int, after: bool):
    """dt.create_write_transaction failing `failures` times with a storage error: before the commit, or after it
    landed (the reply lost)."""
    real, calls = dt.create_write_transaction, []

    def commit(*args, **kwargs):
        calls.append(1)
        if len(calls) <= failures and not after:
            raise OSError("connection reset by peer")
        result = real(*args, **kwargs)
        if len(calls) <= failures:
            raise OSError("connection reset by peer, after the commit landed")
        return result

    dt.create_write_transaction = commit
    return calls


@pytest.mark.parametrize("failures,after", [(1, True), (2, False)], ids=["reply lost", "failed twice"])
def test_a_commit_whose_reply_is_lost_or_that_fails_twice_lands_once(tmp_path, monkeypatch, site, failures, after):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    out, state = new_table(tmp_path, ["s://a"], site)
    calls = flaky(state.table, failures=failures, after=after)
    commit_shard(out, state, "s://b", 1, site[1])
    assert len(calls) == (1 if after else 3)  # a landed commit is not sent again: the table showed its own transaction
    assert [c[table.PART_KEY] for c in wave_commits(out, site[1])] == ["r1-w0000.parquet", "r1-w0001.parquet"]
    assert sorted(table.read_state(out, site[1]).records) == ["s://a", "s://b"]


def data_commit(out: str, state: table.State, url: str, ids: list[str], n: int, opts: dict | None = None) -> None:
    """A wave of real rows: a data file of `ids` for shard `url`, committed with its manifest part."""
    import pyarrow as pa

    from rayseg import storage

    rows = pa.Table.from_pylist([{"image_id": i, "shard": url} for i in ids], schema=table.NIGHTLY_SCHEMA)
    rel = f"w{n:04d}.parquet"
    size = table.write_file(rows, storage.join(out, "images", rel), opts)
    commit.commit(state, out, opts, [table.add_action(rel, size, table.FileStats().update(rows))], [], [manifest_row(url)],
                 f"r1-w{n:04d}.parquet", generation=1, run_id="r1")


def image_ids(out: str, **kw) -> list[str]:
    return sorted(table.read_table(out, **kw).to_table(columns=["image_id"]).column("image_id").to_pylist())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_reader_asks_for_the_last_finished_night_not_a_run_still_writing(tmp_path, request, where):
    """On S3 too (moto on loopback): the nights are found from the commit files, read newest first in batches, so
    nights further back than one batch (`_commits_newest_first`) are found as well."""
    out, opts = (str(tmp_path / "out"), None) if where == "local" else request.getfixturevalue("s3")
    if where == "s3":
        out += "/out"
    state = table.State({}, table=table.open_table(out, opts, create=True))
    data_commit(out, state, "s://a", ["a0", "a1"], 0, opts)
    commit.mark_complete(state, out, 1, "r1", "2026-12-01")
    data_commit(out, state, "s://b", ["b0"], 1, opts)
    commit.mark_complete(state, out, 1, "r1", "2026-12-02")
    for n in range(2, 36):  # the third night's run, still writing (or killed): more commits than one batch reads
        data_commit(out, state, f"s://c{n}", [f"c{n}"], n, opts)

    assert len(image_ids(out, storage_options=opts)) == 3 + 34  # the table as it is now
    assert image_ids(out, storage_options=opts, night="last") == ["a0", "a1", "b0"]
    assert image_ids(out, storage_options=opts, night="2026-12-01") == ["a0", "a1"]
    assert image_ids(out, storage_options=opts, night="2026-12-05") == ["a0", "a1", "b0"]  # a night without a run: as the last one left it
    with pytest.raises(ValueError, match="no nightly run had finished by 2026-11-30"):
        table.read_table(out, opts, night="2026-11-30")
    config = table.open_table(out, opts).metadata().configuration
    assert config["delta.checkpointInterval"] == "100" and config["delta.logRetentionDuration"] == "interval 30 days"


# ---- upkeep: time travel and vacuum --------------------------------------------------------------------------


def commit_rows(out: str, state: table.State, shard: str, rel: str, n: int, removes: list[str] = ()) -> None:
    import pyarrow as pa

    rows = pa.Table.from_pylist([{"image_id": f"{shard}::{i}", "shard": shard, "height": 8, "width": 8} for i in range(n)],
                                schema=table.NIGHTLY_SCHEMA)
    size = table.write_file(rows, os.path.join(out, layout.IMAGES_DIR, rel), None)  # rel: under the table
    commit.commit(state, out, None, [table.add_action(rel, size, table.FileStats().update(rows))], list(removes),
                  [manifest_row(shard)], f"r1-{rel}", generation=1, run_id="r1")


def test_replaced_files_stay_for_keep_hours_and_unnamed_files_go_only_with_a_full_vacuum(tmp_path):
    out, state = new_table(tmp_path, [])
    commit_rows(out, state, "s://a", "a-1.parquet", 3)
    night = commit.mark_complete(state, out, 1, "r1", "2026-12-03")
    commit_rows(out, state, "s://a", "a-2.parquet", 4, removes=["a-1.parquet"])  # the shard redone
    commit.mark_complete(state, out, 1, "r1", "2026-12-04")
    stray = os.path.join(out, layout.IMAGES_DIR, "dead-run-w0001.parquet")  # a wave written, never committed
    with open(stray, "wb") as f:
        f.write(b"PAR1")
    assert table.last_run_ended_whole(out, None, table.open_table(out, None))

    assert table.vacuum(table.read_state(out, None), keep_hours=168) == 0  # inside the window: the night stays readable
    assert table.read_table(out, night="2026-12-03").count_rows() == 3 and table.read_table(out).count_rows() == 4
    assert table.vacuum(table.read_state(out, None), keep_hours=0) == 1  # the window is 0 h: the replaced file goes
    assert not os.path.exists(os.path.join(out, layout.IMAGES_DIR, "a-1.parquet")) and os.path.exists(stray)  # the log alone was read
    full = table.vacuum(table.read_state(out, None), keep_hours=0, full=True)
    assert full >= 1 and sorted(os.listdir(os.path.join(out, layout.IMAGES_DIR))) == ["_delta_log", "a-2.parquet"]
    assert table.read_table(out).count_rows() == 4 and night > 0


def test_a_run_that_did_not_end_whole_is_seen_by_the_next(tmp_path):
    out, state = new_table(tmp_path, [])
    assert table.last_run_ended_whole(out, None, table.open_table(out, None))  # a new table
    commit.fence(out, None, 1, "r1")
    commit_rows(out, table.read_state(out, None), "s://a", "a-1.parquet", 2)  # killed after this wave
    assert not table.last_run_ended_whole(out, None, table.open_table(out, None))


def test_a_manifest_written_with_one_file_per_shard_reads_as_a_list_of_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, state = new_table(tmp_path, ["s://a"])
    old_schema = pa.schema([("file", pa.string()) if f.name == "files" else f for f in table.MANIFEST_SCHEMA])
    old = [{**manifest_row("s://b"), "file": "r0/w00001.parquet"}, {**manifest_row("s://c"), "file": ""}]
    commit.commit(state, out, None, [], [], [manifest_row("s://d")], "r1-w0002.parquet", generation=1, run_id="r1")
    # the commit's part rewritten as an older rayseg wrote parts (one `file` string per shard), then read back
    pq.write_table(pa.Table.from_pylist(old, schema=old_schema), os.path.join(parts_dir(out), "r1-w0002.parquet"))
    records = table.read_state(out, None).records
    assert records["s://b"]["files"] == ["r0/w00001.parquet"] and records["s://c"]["files"] == []
    assert table.read_state(out, None).files() == {"r0/w00001.parquet": ["s://b"]}



def test_a_table_created_between_the_readers_two_looks_is_read_through_its_log(tmp_path, monkeypatch):
    """A reader that first finds no table (a nightly run creating it at that moment) and then lists OUT/images
    reads the table through its log: not an empty folder without columns, and not a file no commit names."""
    import pyarrow as pa

    out, state = new_table(tmp_path, [])
    data_commit(out, state, "s://a", ["a0", "a1"], 0)
    stray = pa.Table.from_pylist([{"image_id": "x0", "shard": "s://x"}], schema=table.NIGHTLY_SCHEMA)
    table.write_file(stray, os.path.join(out, "images", "run2", "w-uncommitted.parquet"), None)
    real, looks = table.is_table, []

    def first_look_before_the_table(*args):
        looks.append(1)
        return len(looks) > 1 and real(*args)

    monkeypatch.setattr(table, "is_table", first_look_before_the_table)
    assert image_ids(out) == ["a0", "a1"]
    assert len(looks) >= 2


def test_a_table_made_before_the_region_columns_gains_them_and_its_old_rows_read_null(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    out = str(tmp_path / "out")
    old = pa.schema([f for f in table.NIGHTLY_SCHEMA if f.name not in ("mask_url", "regions_skipped")])
    DeltaTable.create(os.path.join(out, layout.IMAGES_DIR), old)  # as an older rayseg made it
    state = table.State({}, table=table.open_table(out, None))
    rows = pa.Table.from_pylist([{"image_id": "a.png", "shard": "s://a", "height": 4, "width": 4}], schema=old)
    pq.write_table(rows, os.path.join(out, layout.IMAGES_DIR, "a-1.parquet"))
    size = os.path.getsize(os.path.join(out, layout.IMAGES_DIR, "a-1.parquet"))
    commit.commit(state, out, None, [table.add_action("a-1.parquet", size, table.FileStats().update(rows).json())], [],
                  [manifest_row("s://a")], "r1-w0001.parquet", generation=1, run_id="r1")
    assert "mask_url" not in table.read_table(out).schema.names

    table.open_table(out, None, create=True)  # what the next run does under its lease
    got = table.read_table(out).to_table()
    assert got.schema.field("mask_url").type == pa.string() and got.schema.field("regions_skipped").type == pa.int32()
    assert got.to_pylist()[0]["mask_url"] is None and got.num_rows == 1
    table.open_table(out, None, create=True)  # nothing left to add: no commit
    assert DeltaTable(os.path.join(out, layout.IMAGES_DIR)).version() == 2


def test_the_vacuum_deletes_a_mask_store_with_the_last_file_naming_it(tmp_path, site):
    """Huge images' stores (OUT/masks/RUN/NAME.zarr) go with the last data file that names them: a replaced row's
    after --keep-hours, a store no file names (a killed run's) with a full vacuum; a current row's stays."""
    import pyarrow as pa

    from rayseg import storage

    out, opts = site
    _, state = new_table(tmp_path, [], (out, opts))
    fs, _ = storage.filesystem(out, opts)

    def store(run: str) -> str:  # a store's files, as the actors leave them
        url = storage.join(out, "masks", run, "slide-0123456789ab.zarr")
        storage.write_json(storage.join(url, "zarr.json"), {"zarr_format": 3}, opts)
        return url

    def commit_row(rel: str, url: str, removes=()) -> None:
        rows = pa.Table.from_pylist([{"image_id": "s://slide.tif", "shard": "s://slide.tif", "mask_url": url}], schema=table.NIGHTLY_SCHEMA)
        size = table.write_file(rows, storage.join(out, layout.IMAGES_DIR, rel), opts)
        commit.commit(state, out, opts, [table.add_action(rel, size, table.FileStats().update(rows))], list(removes),
                      [manifest_row("s://slide.tif")], f"r1-{rel}", generation=1, run_id="r1")

    old, new, dead = store("run1"), store("run2"), store("run3")
    commit_row("a-1.parquet", old)
    commit_row("a-2.parquet", new, removes=["a-1.parquet"])  # a new model: the row replaced, pointing at a new store
    assert table.vacuum(table.read_state(out, opts), 0, False, out, opts) == 1
    exists = [fs.exists(fs._strip_protocol(u)) for u in (old, new, dead)]
    assert exists == [False, True, True]  # the replaced row's store went with its file; the killed run's waits
    table.vacuum(table.read_state(out, opts), 0, True, out, opts)
    assert [fs.exists(fs._strip_protocol(u)) for u in (old, new, dead)] == [False, True, False]
    assert table.read_table(out, opts).to_table().column("mask_url").to_pylist() == [new]
