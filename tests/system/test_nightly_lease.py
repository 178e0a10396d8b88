"""`rayseg nightly` with others around: two runs on one OUT (one refused, one waiting for the lease), a reader polling
the table during runs, a killed run's lease on another host expiring, and --objects riding with its images across a
kill. Local disk and S3 (moto server) where the flow differs by store. A run that is killed, or whose exit status
and stderr are what the flow checks, is a real `rayseg nightly` process joined to the session's `ray start --head`
(conftest's ray_head); the others (the run that waits, the runs a reader polls, a rerun after a kill) are the same
command run in the test's process on the session's embedded Ray (nightly_flows.run_here), which proves the same of
the table and the lease without a process's start-up."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest

from rayseg.table import read_state, read_table

from nightly_flows import (Site, assert_whole, commit_runs, finish, kill_session, lease_exists, lease_of,
                          nightly_cmd, rewrite_lease, run_here, snapshot, start, waves, write_shards)


# ---- two runs at once --------------------------------------------------------------------------------------


@pytest.mark.flow("lease-two-runs")
@pytest.mark.timeout(900)
def test_two_runs_on_one_output(site, env, ray_local):
    """Run A starts; once it holds the lease, run B (other shards) is refused in one sentence, and run C (B's shards,
    --lease-wait, here in the test's process) waits for A's lease, which A keeps renewing well past its 10 s
    lifetime, then commits its own shards. (10 s, not less: on a busy 2-core machine a run's renewal thread can
    stall for seconds; C waits for A's release, not for an expiry, so the lifetime costs no time.)"""
    first = write_shards(site, "in1", 8, 6, seed=1)
    second = write_shards(site, "in2", 8, 6, seed=2)
    a = start(nightly_cmd(site, "in1", "--commit-every", "12", "--lease-seconds", "10"), env)
    deadline = time.monotonic() + 120
    while not lease_exists(site) and time.monotonic() < deadline:  # A takes the lease once its inputs are listed
        time.sleep(0.2)
    holder = lease_of(site)["run_id"]
    b = subprocess.run(nightly_cmd(site, "in2", "--lease-seconds", "10"), env=env, capture_output=True, text=True, timeout=120)
    finished = []

    def finish_a():  # drains A's pipes while C runs here
        try:
            finished.append(finish(a))
        except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
            finished.append(e)

    reader = threading.Thread(target=finish_a, daemon=True)
    reader.start()
    summary_c, _ = run_here(nightly_cmd(site, "in2", "--commit-every", "12", "--lease-seconds", "10", "--lease-wait", "600"))
    reader.join(timeout=300)
    if isinstance(finished[0], BaseException):
        raise finished[0]
    summary_a = finished[0]
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
def test_reader_polling_during_runs_sees_whole_shards_once(site, ray_local):
    """Poll the table the documented way while a run commits waves, then while a second run replaces every row
    (--mask-format rle): never an image twice, never part of a shard, and during the second run every image. The
    runs are in this process (run_here); the reader polls from a thread of its own."""
    expected = write_shards(site, "in", 16, 6)
    every_id = set().union(*expected.values())

    def poll_during(cmd, check) -> tuple[dict, int]:
        stop, failed, polls = threading.Event(), [], [0]

        def poll():
            while not stop.is_set():
                t = time.monotonic()
                try:
                    df = snapshot(site)
                    assert_whole(df, expected)
                    check(df)
                except BaseException as e:  # noqa: BLE001 - raised again in the test's thread
                    failed.append(e)
                    return
                polls[0] += 1
                stop.wait(max(0.05, time.monotonic() - t))  # a reader busy at most half the time: the run keeps its cores

        reader = threading.Thread(target=poll, daemon=True)
        reader.start()
        try:
            summary, _ = run_here(cmd)
        finally:
            stop.set()
            reader.join(timeout=60)
        if failed:
            raise failed[0]
        return summary, polls[0]

    seen = []
    s1, polls = poll_during(nightly_cmd(site, "in", "--commit-every", "12"), lambda df: seen.append(len(df)))
    assert s1["rows"] == 96
    assert seen == sorted(seen) and len(set(seen)) >= 3  # commits became visible one wave at a time
    s2, more = poll_during(nightly_cmd(site, "in", "--commit-every", "12", "--mask-format", "rle"),
                           lambda df: (set(df.image_id) == every_id) or pytest.fail(f"{len(df)} of {len(every_id)} images visible"))
    polls += more
    assert s2["shards_changed"] == 16 and len(s2["waves"]) >= 4
    df = snapshot(site)
    assert df.mask_png.isna().all() and set(df.image_id) == every_id
    print(f"{polls} polls ({len(set(seen))} table states seen during the first run), none saw a duplicate or a partial shard")


# ---- a lease left by a killed run --------------------------------------------------------------------------


@pytest.mark.flow("lease-takeover")
@pytest.mark.timeout(600)
def test_killed_runs_lease_on_another_host_expires_and_is_taken_over(tmp_path, env, ray_local):
    """A run on another host cannot see whether the holder's process lives, so the lease's expiry decides: a run
    started at once is refused with the expiry time, and one with --lease-wait (here in the test's process) takes
    the lease over once it expires. (One machine here: the killed run's lease is rewritten to name another host, as
    a driver elsewhere would. Its lifetime is the shortest allowed, 5 s: the waiting run waits that long.)"""
    site = Site(tmp_path / "data")
    expected = write_shards(site, "in", 12, 8)
    cmd = nightly_cmd(site, "in", "--commit-every", "16", "--lease-seconds", "5")
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
    t0 = time.monotonic()
    taken, err = run_here([*cmd, "--lease-wait", "90"])
    assert taken["redone_after_kill"]["run_id"] == killed
    assert f"took over the expired lease of run {killed}" in err  # once expired, within its --lease-wait
    assert time.monotonic() - t0 >= 5  # not before: its holder's process is not on this host
    assert taken["rows"] > 0
    df = snapshot(site)
    assert_whole(df, expected)
    assert len(df) == 96
    assert len(read_state(site.url("out"), None).records) == 12


# ---- objects -----------------------------------------------------------------------------------------------


@pytest.mark.flow("nightly-objects")
@pytest.mark.timeout(600)
def test_objects_are_committed_with_their_images_across_a_kill(tmp_path, env, ray_local):
    """A `rayseg nightly --objects` process killed after two waves, then the same command again (in the test's
    process): every image once, each with its objects, and the objects table holds each image's objects once."""
    site = Site(tmp_path / "data")
    expected = write_shards(site, "in", 10, 6)
    cmd = nightly_cmd(site, "in", "--commit-every", "12", "--objects", "--lease-seconds", "5", "--lease-wait", "60")
    proc = start(cmd, env)
    deadline = time.monotonic() + 120
    while waves(site) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    kill_session(proc)
    run_here(cmd)
    out = site.url("out")
    images = read_table(out).to_table(columns=["image_id", "shard", "objects"]).to_pandas()
    assert_whole(images, expected)
    assert len(images) == 60 and images.objects.notna().all()
    objects = read_table(out, table="objects").to_table().to_pandas()
    per_image = objects.groupby("image_id").size()
    want = images.set_index("image_id").objects.map(len)
    assert per_image.reindex(want.index, fill_value=0).equals(want)  # every image's objects, once each
