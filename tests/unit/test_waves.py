"""Waves close by time (or bytes, or an optional image cap), only at whole shards (no Ray: rows fed by hand)."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from rayseg import table
from rayseg.config import NightlyConfig
from rayseg.lease import Lease
from rayseg.storage import Shard
from rayseg.waves import WaveWriter


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


def writer_for(out: str, lease: Lease, counts: dict, **options) -> WaveWriter:
    shards = [Shard(f"file:///in/s{i}.tar", "tar", 100, "v1") for i in range(4)]
    cfg = NightlyConfig(inputs=("in",), output=out, **options)
    table.open_table(out, None, create=True)
    return WaveWriter(shards, table.read_state(out, None), lease, cfg, "key", "run1", lambda: dict(counts))


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
        big = rows("file:///in/s0.tar", range(2)).set_column(
            table.SCHEMA.get_field_index("mask_png"), "mask_png", pa.array([b"x" * 2**20] * 2, table.SCHEMA.field("mask_png").type))
        w.add(big)
        w.add(rows("file:///in/s1.tar", range(2)))
        w.finish()
    assert [x["rows"] for x in w.waves] == [2, 2]  # s0 alone (2 MB), then s1 and the two shards that gave no rows
