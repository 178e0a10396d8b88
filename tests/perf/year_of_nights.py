"""A simulated year of nightly commits on a local disk, to size the Delta log and the manifest over time.

    python tests/perf/year_of_nights.py OUT [--nights 365] [--waves 27] [--compact-mb 128]

Each night commits `--waves` waves the way `rayseg nightly` does (a one-row data file, a manifest part, one Delta
commit each, with the run's lease generation and wave number), compacts the table's small files as a run ends
(`waves.compact`, in this process: no Ray) unless --compact-mb is 0, marks the night finished, and folds the manifest.
Then it prints the log's size, its checkpoints, and how long a run with nothing new (reading the manifest),
`read_table` (the whole table, and one night) and a full vacuum take. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pyarrow as pa

from rayseg import commit, table, waves


class Held:
    """What waves.compact needs of a lease held for the whole night."""

    def __init__(self, generation: int):
        self.generation, self.progress = generation, {}

    def renew(self, progress) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--nights", type=int, default=365)
    ap.add_argument("--waves", type=int, default=27)
    ap.add_argument("--compact-mb", type=int, default=128)
    a = ap.parse_args()
    out, t0 = os.path.abspath(a.out), time.perf_counter()
    for night in range(a.nights):
        run = f"n{night:04d}"
        state = table.read_state(out, None)
        if state.table is None:
            state = table.State({}, table=table.open_table(out, None, create=True))
        commit.fence(out, None, night + 1, run)
        state = table.read_state(out, None)
        for w in range(a.waves):
            url = f"s://shard-{night:04d}-{w:02d}"
            rows = pa.Table.from_pylist([{"image_id": f"{url}::0", "shard": url}], schema=table.NIGHTLY_SCHEMA)
            rel = f"{run}-w{w:03d}.parquet"
            size = table.write_file(rows, os.path.join(out, "images", rel), None)
            part = [{"shard_url": url, "size": 1, "version": "1", "key": "k", "files": [rel], "rows": 1, "errors": 0,
                     "run_id": run, "committed_at": "2026-12-04T00:00:00Z"}]
            commit.commit(state, out, None, [table.add_action(rel, size, table.FileStats().update(rows))], [], part,
                         f"{run}-w{w:05d}.parquet", night + 1, run)
        waves.compact(state, out, None, Held(night + 1), run, a.compact_mb)
        commit.mark_complete(state, out, night + 1, run, f"night-{night:04d}")
        table.compact_manifest(out, None, state, run)
    build_s = time.perf_counter() - t0
    log_dir = os.path.join(out, "images", "_delta_log")
    files = os.listdir(log_dir)
    figures = {
        "commits": table.open_table(out, None).version() + 1,
        "build_s": round(build_s, 1),
        "log_files": len(files),
        "log_mb": round(sum(os.path.getsize(os.path.join(log_dir, f)) for f in files) / 2**20, 2),
        "checkpoints": sum(".checkpoint." in f for f in files),
        "data_files": len(table.open_table(out, None).file_uris()),
    }
    for name, fn in (("no_op_read_state_s", lambda: table.read_state(out, None)),
                     ("read_table_all_s", lambda: table.read_table(out).to_table(columns=["image_id"])),
                     ("read_table_one_night_s", lambda: table.read_table(out, night=f"night-{a.nights // 2:04d}").to_table(columns=["image_id"])),
                     ("vacuum_s", lambda: table.vacuum(table.read_state(out, None)))):
        t = time.perf_counter()
        fn()
        figures[name] = round(time.perf_counter() - t, 3)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
