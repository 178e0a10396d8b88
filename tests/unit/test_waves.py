"""Waves close by time (or bytes, or an optional image cap), only at whole shards; a file commits only with every
shard in it, a shard only with all its files (no Ray: the write stage run by hand, its metadata fed to the writer)."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from rayseg import table, waves
from rayseg.config import NightlyConfig
from rayseg.lease import Lease
from rayseg.storage import Shard
from rayseg.waves import FILE_SCHEMA, WaveWriter, write_stage


def rows(shard: str, ids: range) -> pa.Table:
    """Plan rows of `shard` in the table's schema: only image_id and shard set (no error)."""
    n = len(ids)
    cols = {f.name: pa.nulls(n, f.type) for f in table.SCHEMA}
    cols["image_id"] = pa.array([f"{shard}::img{i}" for i in ids], table.SCHEMA.field("image_id").type)
    cols["shard"] = pa.array([shard] * n, table.SCHEMA.field("shard").type)
    return pa.table(cols)


@pytest.fixture
def out(tmp_path):
    return str(tmp_path / "out")


class Writer(WaveWriter):
    """The driver's writer, fed as the plan feeds it: `add(rows)` runs the write stage on the rows (as a worker
    would) and hands the writer only the metadata it returns."""

    def add(self, *pieces: pa.Table) -> None:
        meta = write_stage(pa.concat_tables(pieces), self.cfg.output, None, self.run_id)
        assert meta.schema == FILE_SCHEMA and "mask_png" not in meta.column_names  # no row bytes reach the driver
        self.seen.append(meta)
        super().add(meta)


def writer_for(out: str, lease: Lease, counts: dict, **options) -> Writer:
    shards = [Shard(f"file:///in/s{i}.tar", "tar", 100, "v1") for i in range(4)]
    cfg = NightlyConfig(inputs=("in",), output=out, **options)
    table.open_table(out, None, create=True)
    given = set()

    def shard_rows():  # as progress.Counter.shard_rows: what was read whole since the last call
        new = {u: n for u, n in counts.items() if u not in given}
        given.update(new)
        return new

    w = Writer(shards, table.read_state(out, None), lease, cfg, "key", "run1", shard_rows)
    w.seen = []
    return w


def committed(out: str) -> list[str]:
    return sorted(table.read_table(out, None).to_table(columns=["image_id"]).column("image_id").to_pylist())


def test_a_wave_closes_once_its_time_is_up_at_the_next_whole_shard(out):
    counts = {}
    with Lease(out, {}, "run1", 30) as lease:
        w = writer_for(out, lease, counts, commit_seconds=1.0)
        w.add(rows("file:///in/s0.tar", range(2)))  # 2 rows of s0, whose count is not known yet
        time.sleep(1.2)
        assert w.waves == []  # time is up, but no shard is whole
        counts["file:///in/s1.tar"] = 2
        w.add(rows("file:///in/s1.tar", range(2)))
        assert [(x["shards"], x["rows"]) for x in w.waves] == [(1, 2)]  # s1 alone: s0 is still arriving
        assert committed(out) == ["file:///in/s1.tar::img0", "file:///in/s1.tar::img1"]
        counts["file:///in/s0.tar"] = 3
        w.add(rows("file:///in/s0.tar", range(2, 3)))
        assert len(w.waves) == 1  # s0 is whole now, but less than a second has passed since the last commit
        w.finish()
    assert [(x["shards"], x["rows"]) for x in w.waves] == [(1, 2), (3, 3)]  # s0, and s2 and s3 (no rows)
    assert committed(out) == sorted([f"file:///in/s0.tar::img{i}" for i in range(3)] + ["file:///in/s1.tar::img0", "file:///in/s1.tar::img1"])
    assert len(table.read_state(out, None).records) == 4


def test_an_image_cap_or_a_size_closes_a_wave_before_its_time(out):
    counts = {f"file:///in/s{i}.tar": 2 for i in range(4)}
    with Lease(out, {}, "run1", 30) as lease:
        w = writer_for(out, lease, counts, commit_seconds=3600, commit_every=4)
        for i in range(4):
            w.add(rows(f"file:///in/s{i}.tar", range(2)))
        w.finish()
    assert [x["rows"] for x in w.waves] == [4, 4]
    out2 = out + "-mb"
    with Lease(out2, {}, "run1", 30) as lease:
        w = writer_for(out2, lease, counts, commit_seconds=3600, commit_mb=1)
        big = rows("file:///in/s0.tar", range(2)).set_column(  # incompressible: the file is 2 MB too
            table.SCHEMA.get_field_index("mask_png"), "mask_png", pa.array([os.urandom(2**20)] * 2, table.SCHEMA.field("mask_png").type))
        w.add(big)
        w.add(rows("file:///in/s1.tar", range(2)))
        w.finish()
    assert [x["rows"] for x in w.waves] == [2, 2]  # s0 alone (2 MB), then s1 and the two shards that gave no rows


def table_files(out: str) -> list[str]:
    return [os.path.relpath(u.removeprefix("file://"), os.path.join(out, "images")) for u in table.open_table(out, None).file_uris()]


def shards_in(out: str, rel: str) -> set[str]:
    import pyarrow.parquet as pq

    return set(pq.read_table(os.path.join(out, "images", rel), columns=["shard"]).column("shard").to_pylist())


def test_a_shard_over_several_files_commits_with_all_of_them_and_no_file_holds_a_shard_still_arriving(out):
    s0, s1, s2 = (f"file:///in/s{i}.tar" for i in range(3))
    counts = {s0: 2, s1: 3, s2: 2}
    with Lease(out, {}, "run1", 30) as lease:
        w = writer_for(out, lease, counts, commit_seconds=3600, commit_every=1)  # any whole shard commits at once
        w.add(rows(s1, range(1)))  # file A: s1 1 of 3
        w.add(rows(s1, range(1, 2)))  # file B: s1 2 of 3
        assert w.waves == [] and committed(out) == []
        w.add(rows(s0, range(2)), rows(s1, range(2, 3)), rows(s2, range(1)))  # file C: s0 whole, s1 whole now, s2 1 of 2
        # s0 and s1 commit, s1 with A, B and its part of C: C also holds s2, which is still arriving, so C is split
        # (s2's row waits in a file of its own) and no committed file holds a row of s2
        assert [(x["shards"], x["rows"]) for x in w.waves] == [(2, 5)]
        assert committed(out) == sorted([f"{s0}::img{i}" for i in range(2)] + [f"{s1}::img{i}" for i in range(3)])
        files = table_files(out)
        assert len(files) == 3 and all(s2 not in shards_in(out, rel) for rel in files)
        records = table.read_state(out, None).records
        assert len(records[s1]["files"]) == 3 and len(records[s0]["files"]) == 1 and set(records[s0]["files"]) < set(records[s1]["files"])
        assert w.lease.progress["images_in_flight"] == 1  # s2's first row, in its own file, uncommitted
        w.add(rows(s2, range(1, 2)))  # file D
        w.finish()
    ids = committed(out)
    assert ids == sorted({f"{s}::img{i}" for s, n in counts.items() for i in range(n)})  # every image once
    assert len(table.read_state(out, None).records[s2]["files"]) == 2
    on_disk = {os.path.relpath(os.path.join(d, f), os.path.join(out, "images")) for d, _, fs in os.walk(os.path.join(out, "images"))
               for f in fs if f.endswith(".parquet")}
    assert on_disk == set(table_files(out))  # the split file is gone: nothing is left for a vacuum
    node = waves.node_id()[:12]  # "driver" outside Ray; the node of an embedded Ray an earlier test left running
    assert all(rel.startswith(f"run1/{node}-") for rel in on_disk)  # the writer's node names each file
    assert sum(m.nbytes for m in w.seen) < 4096  # what the driver received: a few hundred bytes a file


def test_a_file_waits_while_its_shard_is_arriving(out):
    s0, s1 = "file:///in/s0.tar", "file:///in/s1.tar"
    counts = {s0: 1}
    with Lease(out, {}, "run1", 30) as lease:
        w = writer_for(out, lease, counts, commit_seconds=3600, commit_every=1)
        w.add(rows(s0, range(1)))  # a file of its own: whole, committed at once
        w.add(rows(s1, range(1)))  # s1's count is not known yet
        assert [x["shards"] for x in w.waves] == [1] and committed(out) == [f"{s0}::img0"]
        assert w.lease.progress["images_in_flight"] == 1
        counts[s1] = 2
        w.add(rows(s1, range(1, 2)))
        assert committed(out) == [f"{s0}::img0", f"{s1}::img0", f"{s1}::img1"]
        w.finish()
    assert [x["rows"] for x in w.waves] == [1, 2, 0]  # the last: the two shards that gave no rows


# ---- compaction ------------------------------------------------------------------------------------------------


def test_compaction_merges_a_nights_small_files_without_changing_a_row(out):
    counts = {f"file:///in/s{i}.tar": n for i, n in enumerate([3, 3, 2, 2])}
    with Lease(out, {}, "run1", 30) as lease:
        w = writer_for(out, lease, counts, commit_seconds=3600, commit_every=3)
        for i in range(3):  # one file per row, the shards' rows interleaved as actors interleave them
            for url, n in counts.items():
                if i < n:
                    w.add(rows(url, range(i, i + 1)))
        w.finish()
        before, files_before = committed(out), table_files(out)
        assert len(files_before) == 10 and len(before) == 10
        state = table.read_state(out, None)
        result = waves.compact(state, out, None, lease, "run1", target_mb=1)
        assert result["files_merged"] == 10 and result["files_written"] == 1
        assert waves.compact(table.read_state(out, None), out, None, lease, "run1", target_mb=1)["files_merged"] == 0  # nothing small left

    after = table_files(out)
    assert committed(out) == before and len(after) == 1 and after[0].startswith(f"run1/{waves.node_id()[:12]}-compacted-")
    manifest = table.read_state(out, None)
    assert {f: sorted(s) for f, s in manifest.files().items()} == {after[0]: sorted(counts)}  # the manifest names the merged file for every shard, nothing else
    assert all(r["rows"] == counts[u] for u, r in manifest.records.items())
    # the commit only rewrote rows (dataChange false), and the version before it still reads: the small files stay for time travel
    dt = table.open_table(out, None)
    actions = dt.get_add_actions()
    assert pa.table(actions)["path"].to_pylist() == after
    dt.load_as_version(result["table_version"] - 1)
    assert sorted(dt.to_pyarrow_table(columns=["image_id"]).column("image_id").to_pylist()) == before
    log = os.path.join(out, "images", "_delta_log", f"{result['table_version']:020d}.json")
    text = open(log).read()
    assert '"remove"' in text and '"dataChange":true' not in text.replace(" ", "")


def test_compaction_bins_hold_small_named_files_and_leave_a_few_alone():
    mb = 2**20
    sizes = {f"r/{i:02d}.parquet": mb for i in range(10)} | {"r/big.parquet": 70 * mb, "r/stray.parquet": mb}
    named = set(sizes) - {"r/stray.parquet"}  # a file no manifest row names (a killed run's) is never merged
    bins = waves.compaction_bins(sizes, named, 4 * mb)
    assert bins == [[f"r/{i:02d}.parquet" for i in range(j, j + 4)] for j in (0, 4)] + [["r/08.parquet", "r/09.parquet"]]
    assert waves.compaction_bins(sizes, named, 128 * mb) == [[f"r/{i:02d}.parquet" for i in range(10)]]  # the big file stays
    few = {f"r/{i}.parquet": mb for i in range(waves.COMPACT_MIN_FILES - 1)}
    assert waves.compaction_bins(few, set(few), 128 * mb) == []  # too few to be worth a commit


def test_a_compaction_that_fails_leaves_the_committed_files_and_does_not_fail_the_run(out, monkeypatch, caplog):
    from rayseg.nightly import compact_or_warn

    counts = {f"file:///in/s{i}.tar": 3 for i in range(4)}
    with Lease(out, {}, "run1", 30) as lease:
        w = writer_for(out, lease, counts, commit_seconds=3600, commit_every=3)
        for url in counts:
            for i in range(3):
                w.add(rows(url, range(i, i + 1)))
        w.finish()
        before = table_files(out)

        def broken(*args):
            raise OSError("connection reset by peer")

        monkeypatch.setattr(waves, "merge_files", broken)
        result = compact_or_warn(table.read_state(out, None), w.cfg, lease, "run1")
    assert result["files_merged"] == 0 and "connection reset" in result["error"]
    assert "compacting the table's small files failed (connection reset by peer)" in caplog.text
    assert table_files(out) == before and len(committed(out)) == 12  # the night's rows stay committed, in their files
