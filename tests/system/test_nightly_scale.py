"""`rayseg nightly` at production scale: commits in waves survive a SIGKILL late in a run, loose files make few
output files, two runs on one OUT never lose rows, a reader polling the table never sees a shard twice or in
part, a killed run's lease expires, --objects rides with its images. Kill, concurrency and reader tests run on
a local disk and on S3 (moto server). Each `rayseg nightly` here is a real subprocess that joins the session's
`ray start --head` (conftest's ray_head), as a user's commands join the Ray running on their machine; a kill
kills the command's whole process session. The rerun after a kill kills nothing: it is the same command run in the
test's process on the session's embedded Ray (nightly_flows.run_here), which proves the same without a process's
start-up. test_nightly.py's first random kill and test_nightly_fence.py keep an embedded Ray each, which their kill
or pause takes down with the driver (the fence's paused run holds its actors' CPUs: on the shared head the run that
takes over would find none left for its own).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import png_bytes, random_image, tar_bytes
from rayseg.table import MANIFEST_DIR, open_table, read_state, read_table
from rayseg.waves import WRITE_ROWS

from nightly_flows import (RAYSEG, Site, assert_whole, finish, kill_and_rerun_at_once, kill_session, kill_when_done,
                          nightly_cmd, run_here, snapshot, start, write_shards)


# ---- a kill late in a run ----------------------------------------------------------------------------------


@pytest.mark.flow("nightly-killed")
@pytest.mark.timeout(900)
def test_kill_at_85_percent_redoes_at_most_one_wave(site, env, ray_local):
    """20 shards x 10 images, waves of 15% (30 images): SIGKILL once 85% of the images are done and a wave is
    committed (by the run's own progress lines), then run again. A model input of 224 makes segmentation, not Ray's
    start-up, most of a run's time, so the kill lands while waves are committing and one is in flight. (The kill
    waits for a wave rather than assuming one: while the write stage reserved 0.05 CPU, Ray Data held it back behind
    the reads, and a loaded 2-core machine killed a run at 170 of 200 done with none committed.)"""
    expected = write_shards(site, "in", 20, 10)
    total, every = 200, 30
    cmd = nightly_cmd(site, "in", "--commit-every", str(every), "--input-size", "224", "--lease-seconds", "6", "--lease-wait", "60")
    done, said = kill_when_done(cmd, env, int(0.85 * total), committed=every)
    assert done < total, "the run ended before its kill"
    at_kill = snapshot(site)
    assert_whole(at_kill, expected)
    assert len(at_kill) >= said  # what a progress line said was committed is in the table
    t0 = time.monotonic()
    rerun, _ = run_here(cmd)  # the rerun kills nothing: in this process, on the session's embedded Ray
    t_rerun = time.monotonic() - t0
    df = snapshot(site)
    assert_whole(df, expected)
    assert set(df.image_id) == set().union(*expected.values())
    redone = rerun["redone_after_kill"]
    print(f"killed with {done} images done and {len(at_kill)} of {total} committed; "
          f"rerun {t_rerun:.1f}s, {rerun['rows']} images, of which in flight at the kill: {redone}")
    assert rerun["rows"] == total - len(at_kill)  # the rerun segments only what was not committed
    assert len(at_kill) >= every  # the kill came after waves had committed
    assert redone is not None and redone["images_in_flight"] <= every + 10  # at most one wave (plus the shard that closes it) was lost


# ---- waves by time: what a kill keeps, and a rerun that does not wait for a dead run ---------------------






@pytest.mark.flow("nightly-waves-by-time")
@pytest.mark.timeout(600)
def test_waves_by_time_keep_most_of_a_killed_runs_work(site, env, ray_local):
    """Options as a user leaves them but --commit-seconds 1 (and a model input of 64, so that segmentation, not Ray's
    start-up, is most of the run): SIGKILL once 70% of the images are done and a wave is committed.
    At least 40% of what was done is committed (whole shards), and a rerun at once takes over the dead run's lease."""
    expected = write_shards(site, "in", 80, 10)
    cmd = nightly_cmd(site, "in", "--commit-seconds", "1", "--input-size", "64")
    done, said = kill_when_done(cmd, env, 560, committed=1)
    kept = kill_and_rerun_at_once(site, None, cmd, expected, done)  # the rerun in this process (run_here)
    # the bar, half of what was done, is for its default options and archive (the 8,000-image test below:
    # 59% locally, 68% on S3). Here the workers' files of up to waves.WRITE_ROWS (256) rows make the commits come in
    # steps of about a third of the archive: a kill just after the first one has kept 260 of 580 done (45%), after
    # the second 520 of 568 (92%)
    assert 560 <= done < 800 and kept["committed"] >= max(said, 0.4 * done)


def write_small_images(site: Site, shards: int, per_shard: int, side: int) -> dict[str, set[str]]:
    """Tar shards of small PNGs with some structure (discs on a gradient), a few KB each."""
    import cv2

    rng = np.random.default_rng(0)
    out = {}
    for s in range(shards):
        members = {}
        for i in range(per_shard):
            img = np.repeat(np.linspace(0, 200, side, dtype=np.uint8)[None, :, None], side, 0).repeat(3, 2).copy()
            for _ in range(3):
                cv2.circle(img, tuple(int(v) for v in rng.integers(0, side, 2)), int(rng.integers(4, side // 4)), (255, 80, 40), -1)
            members[f"img{i}.png"] = png_bytes(img)
        url = site.put(f"in/s{s:03d}.tar", tar_bytes(members))
        out[url] = {f"{url}::img{i}" for i in range(per_shard)}
    return out


@pytest.mark.skipif(not os.environ.get("RAYSEG_SLOW_TESTS"), reason="several minutes on 2 cores; set RAYSEG_SLOW_TESTS=1")
@pytest.mark.timeout(3600)
def test_8000_images_default_options_killed_at_70_percent(site, env):
    """Issue figure: 80 tar shards x 100 images of 128x128, every option at its default, SIGKILL at 70% of a fresh
    run's time: at least half of the images done by then are committed; a rerun leaves every image once."""
    expected = write_small_images(site, 80, 100, 128)
    base = [RAYSEG, "nightly", site.url("in"), *site.args(), "--quiet"]
    t0 = time.monotonic()
    fresh = finish(start([*base, "--output", site.url("fresh-out")], env), timeout=3000)
    t_fresh = time.monotonic() - t0
    assert fresh["rows"] == 8000
    cmd = [*base, "--output", site.url("out")]
    proc = subprocess.Popen([a for a in cmd if a != "--quiet"], env={**env, "RAYSEG_PROGRESS_INTERVAL": "0.5"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done, lines = [0], []

    def follow():
        for line in proc.stderr:
            lines.append(line)
            if m := re.search(r"progress: ([\d,]+) images done", line):
                done[0] = int(m.group(1).replace(",", ""))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.7 * t_fresh and proc.poll() is None:
        time.sleep(0.05)
    killed_at, done_at_kill = time.monotonic() - t0, done[0]
    kill_session(proc)
    print(f"fresh run {t_fresh:.1f} s, {len(fresh['waves'])} waves; killed at {killed_at:.1f} s")
    kept = kill_and_rerun_at_once(site, env, cmd, expected, done_at_kill)
    assert kept["committed"] >= done_at_kill / 2


# ---- many loose files --------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
def test_loose_files_make_few_files_and_a_rerun_is_instant(ray_local, tmp_path):
    """3,000 loose PNGs, waves of 1,000: data files of up to waves.WRITE_ROWS rows each (workers write them),
    merged into one at the end of the run (--compact-mb); one manifest snapshot; nothing new answers without Ray."""
    from rayseg.config import NightlyConfig
    from rayseg.nightly import nightly

    inp, out = tmp_path / "in", tmp_path / "out"
    rng = np.random.default_rng(0)
    for d in range(10):
        (inp / f"d{d}").mkdir(parents=True)
        for i in range(300):
            (inp / f"d{d}" / f"{i:04d}.png").write_bytes(png_bytes(random_image(rng, 16, 16)))
    cfg = NightlyConfig(inputs=(str(inp),), output=str(out), model="unet", input_size=32, batch_size=16, quiet=True, commit_every=1000)
    first = nightly(cfg)
    assert (first["shards_new"], first["rows"], len(first["waves"])) == (3000, 3000, 3)
    files = open_table(str(out), None).file_uris()
    manifest = sorted(p.name for p in (out / MANIFEST_DIR).rglob("*") if p.is_file())
    print(f"3000 loose files: {len(files)} data files, manifest files {manifest}, run {first['elapsed_s']} s")
    # the workers wrote a file per write task batch of WRITE_ROWS rows (and at most one short remainder per task);
    # compaction merged them (Ray tasks) into one file of a few MB, the manifest naming it for every image
    merged = first["compaction"]["files_merged"]
    assert -(-3000 // WRITE_ROWS) <= merged <= 2 * -(-3000 // WRITE_ROWS) and first["compaction"]["files_written"] == 1
    assert len(files) == 1 and {f for r in read_state(str(out), None).records.values() for f in r["files"]} == {
        files[0].rsplit("/images/", 1)[1]}
    assert len(manifest) == 2 and manifest[0] == "_snapshot.json"  # one snapshot + its pointer, whatever the file count
    assert read_table(str(out)).count_rows() == 3000
    again = nightly(cfg)
    print(f"nothing new over 3000 committed files: {again['elapsed_s']} s")
    assert again["nothing_new"] and again["cluster"] is None and again["elapsed_s"] < 10


# ---- the cost of reading the state -------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_state_of_100000_shards_reads_in_seconds(site):
    """A nothing-new run reads one manifest snapshot, whatever the history: 100,000 committed shards."""
    from rayseg import storage, table
    from rayseg.nightly import backlog

    out = site.url("out")
    dt = table.open_table(out, site.opts, create=True)
    rows = [{"shard_url": f"s3://archive/shards/s{i:07d}.tar", "size": 1000, "version": "etag", "key": "k" * 16,
             "files": [f"run/w{i // 100:05d}.parquet"], "rows": 100, "errors": 0, "run_id": "run", "committed_at": "t"} for i in range(100_000)]
    assert table.compact_manifest(out, site.opts, table.State({r["shard_url"]: r for r in rows}, dt.version(), -1, dt))
    shards = [storage.Shard(r["shard_url"], "tar", 1000, "etag") for r in rows]
    t0 = time.perf_counter()
    state = table.read_state(out, site.opts)
    b = backlog(shards, state.records, "k" * 16)
    elapsed = time.perf_counter() - t0
    print(f"state of 100,000 shards ({'S3' if site.opts else 'local disk'}): read and compared in {elapsed:.2f} s")
    assert (len(b["done"]), len(b["new"]), len(b["changed"])) == (100_000, 0, 0)
    assert elapsed < 10
