"""`rayseg nightly` with others around: two runs on one OUT (one refused, one waiting for the lease), a reader polling
the table during runs, a killed run's lease on another host expiring, and --objects riding with its images across a
kill. Local disk and S3 (moto server) where the flow differs by store. Each run is a real `rayseg nightly` process
joined to the session's `ray start --head` (conftest's ray_head)."""

from __future__ import annotations

import subprocess
import time

import pytest

from rayseg.table import read_state, read_table

from nightly_flows import (Site, assert_whole, commit_runs, finish, kill_session, lease_exists, lease_of,
                          nightly_cmd, rewrite_lease, snapshot, start, waves, write_shards)


# ---- two runs at once --------------------------------------------------------------------------------------


@pytest.mark.flow("lease-two-runs")
@pytest.mark.timeout(900)
def test_two_runs_on_one_output(site, env):
    """Run A starts; 3 s later run B (other shards) is refused in one sentence, and run C (B's shards, --lease-wait)
    waits for A's lease, which A keeps renewing well past its 10 s lifetime, then commits its own shards. (10 s, not
    less: on a busy 2-core machine a run's renewal thread can stall for seconds while Ray starts.)"""
    first = write_shards(site, "in1", 8, 6, seed=1)
    second = write_shards(site, "in2", 8, 6, seed=2)
    a = start(nightly_cmd(site, "in1", "--commit-every", "12", "--lease-seconds", "10"), env)
    time.sleep(3)
    deadline = time.monotonic() + 120
    while not lease_exists(site) and time.monotonic() < deadline:  # A takes the lease once its inputs are listed
        time.sleep(0.2)
    holder = lease_of(site)["run_id"]
    b = subprocess.run(nightly_cmd(site, "in2", "--lease-seconds", "10"), env=env, capture_output=True, text=True, timeout=120)
    c = start(nightly_cmd(site, "in2", "--commit-every", "12", "--lease-seconds", "10", "--lease-wait", "600"), env)
    summary_a, summary_c = finish(a), finish(c, timeout=600)
    assert b.returncode == 2
    lines = [ln for ln in b.stderr.splitlines() if "rayseg nightly" in ln]
    assert lines == [f"rayseg nightly: error: another nightly run is writing {site.url('out')}: {lines[0].split(': ', 3)[3]}"]
    assert f"run {holder} " in lines[0] and "Traceback" not in b.stderr
    assert (summary_a["rows"], summary_c["rows"]) == (48, 48)
    assert summary_c["redone_after_kill"] is None  # A's lease was released, not taken over
    df = snapshot(site)
    assert_whole(df, {**first, **second})
    assert len(df) == 96
    runs = [c for c in commit_runs(site) if c]
    assert runs == sorted(runs, key=lambda r: r != summary_a["run_id"])  # every commit of A before any of C








# ---- a reader during a run ---------------------------------------------------------------------------------


@pytest.mark.flow("nightly-reader-polling")
@pytest.mark.timeout(900)
def test_reader_polling_during_runs_sees_whole_shards_once(site, env):
    """Poll the table the documented way while a run commits waves, then while a second run replaces every row
    (--mask-format rle): never an image twice, never part of a shard, and during the second run every image."""
    expected = write_shards(site, "in", 16, 6)
    every_id = set().union(*expected.values())

    def poll(proc, check) -> int:
        polls = 0
        while proc.poll() is None:
            t = time.monotonic()
            df = snapshot(site)
            assert_whole(df, expected)
            check(df)
            polls += 1
            time.sleep(max(0.1, time.monotonic() - t))  # a reader busy at most half the time: the run keeps its cores
        return polls

    p1 = start(nightly_cmd(site, "in", "--commit-every", "12"), env)
    seen = []
    polls = poll(p1, lambda df: seen.append(len(df)))
    assert finish(p1)["rows"] == 96
    assert seen == sorted(seen) and len(set(seen)) >= 3  # commits became visible one wave at a time
    p2 = start(nightly_cmd(site, "in", "--commit-every", "12", "--mask-format", "rle"), env)
    polls += poll(p2, lambda df: (set(df.image_id) == every_id) or pytest.fail(f"{len(df)} of {len(every_id)} images visible"))
    s2 = finish(p2)
    assert s2["shards_changed"] == 16 and len(s2["waves"]) >= 4
    df = snapshot(site)
    assert df.mask_png.isna().all() and set(df.image_id) == every_id
    print(f"{polls} polls, none saw a duplicate or a partial shard")


# ---- a lease left by a killed run --------------------------------------------------------------------------


@pytest.mark.flow("lease-takeover")
@pytest.mark.timeout(600)
def test_killed_runs_lease_on_another_host_expires_and_is_taken_over(tmp_path, env):
    """A run on another host cannot see whether the holder's process lives, so the lease's expiry decides: a run
    started at once is refused with the expiry time, and one with --lease-wait takes the lease over once it expires.
    (One machine here: the killed run's lease is rewritten to name another host, as a driver elsewhere would.)"""
    site = Site(tmp_path / "data")
    expected = write_shards(site, "in", 12, 8)
    cmd = nightly_cmd(site, "in", "--commit-every", "16", "--lease-seconds", "6")
    proc = start(cmd, env)
    deadline = time.monotonic() + 120
    while waves(site) < 1 and proc.poll() is None and time.monotonic() < deadline:  # after its first wave
        time.sleep(0.05)
    killed = lease_of(site)["run_id"]
    kill_session(proc)
    rewrite_lease(site, host="another-host", expires_at=time.time() + 600)  # live for the run refused next
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and f"run {killed} (host another-host, " in refused.stderr  # not expired yet
    assert "its lease expires at " in refused.stderr and "--lease-wait SECONDS waits for it" in refused.stderr
    rewrite_lease(site, expires_at=time.time() + 5)  # as if its last renewal was a few seconds ago
    waiting = start([*cmd, "--lease-wait", "90"], env)
    taken = finish(waiting)
    assert taken["redone_after_kill"]["run_id"] == killed
    assert f"took over the expired lease of run {killed}" in waiting.err  # once expired, within its --lease-wait
    assert taken["rows"] > 0
    df = snapshot(site)
    assert_whole(df, expected)
    assert len(df) == 96
    assert len(read_state(site.url("out"), None).records) == 12




# ---- objects -----------------------------------------------------------------------------------------------


@pytest.mark.flow("nightly-objects")
@pytest.mark.timeout(600)
def test_objects_are_committed_with_their_images_across_a_kill(tmp_path, env):
    site = Site(tmp_path / "data")
    expected = write_shards(site, "in", 10, 6)
    cmd = nightly_cmd(site, "in", "--commit-every", "12", "--objects", "--lease-seconds", "5", "--lease-wait", "60")
    proc = start(cmd, env)
    deadline = time.monotonic() + 120
    while waves(site) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_session(proc)
    finish(start(cmd, env))
    out = site.url("out")
    images = read_table(out).to_table(columns=["image_id", "shard", "objects"]).to_pandas()
    assert_whole(images, expected)
    assert len(images) == 60 and images.objects.notna().all()
    objects = read_table(out, table="objects").to_table().to_pandas()
    per_image = objects.groupby("image_id").size()
    want = images.set_index("image_id").objects.map(len)
    assert per_image.reindex(want.index, fill_value=0).equals(want)  # every image's objects, once each


