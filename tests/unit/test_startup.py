"""Ray-free parts of start-up: the address probe and the start-up timeline (runtime.probe, layout.Timeline)."""

from __future__ import annotations

import socket
import time

import pytest

from conftest import free_port
from rayseg.layout import Timeline
from rayseg.runtime import start_failure


def test_the_address_probe_answers_in_seconds():
    """A listening port passes at once; a closed one is a ConnectionError after the probe's own wait, which
    start_failure turns into the sentence; Ray's own names ("local", "auto") are left to Ray."""
    from rayseg.runtime import probe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        probe(f"127.0.0.1:{s.getsockname()[1]}", within=2)
        probe(f"ray://127.0.0.1:{s.getsockname()[1]}", within=2)
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as e:
        probe(address, within=1.5)
    assert 1.5 <= time.monotonic() - t0 < 10
    assert start_failure(e.value, address).startswith(f"no Ray cluster answered at {address}")
    probe("local", within=0.1), probe("auto", within=0.1)


def test_the_timeline_puts_marks_and_actor_stamps_on_one_clock():
    clock = Timeline()
    time.sleep(0.05)
    assert clock.mark("discovered") >= 0.05
    clock.at({"first_batch": clock.wall0 + 1.5, "predictor_ready": clock.wall0 + 1.25})  # wall-clock stamps of actors
    assert clock.marks["first_batch"] == 1.5 and clock.marks["predictor_ready"] == 1.25
    assert list(clock.marks) == ["discovered", "first_batch", "predictor_ready"]


def test_a_command_joins_only_a_ray_that_ray_start_announced_and_whose_gcs_is_up(tmp_path, monkeypatch):
    """Without --address and RAY_ADDRESS a command starts embedded, unless `ray start` announced a Ray on this machine
    whose GCS process is up (tests/system/test_console.py joins a real one); --address and RAY_ADDRESS win."""
    from rayseg.runtime import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    assert ray_address(None) == "local"  # nothing announced
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # announced, then stopped
    assert ray_address(None) == "local"
    assert ray_address("local") == "local" and ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    assert ray_address(None) == "10.0.0.6:6379" and ray_address("local") == "local"


def test_the_command_exits_at_once_with_its_status_and_all_it_printed(tmp_path):
    """`rayseg` skips Python's module teardown (cli.exit_now): what the command printed still reaches a pipe whole,
    and the exit status is the command's (0 done, 2 a bad command in one line)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "rayseg.cli", "synth", str(tmp_path / "a"), "--count", "3", "--layout", "files"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)  # the whole JSON document, not a cut one
    assert summary["count"] == 3 and len(list((tmp_path / "a").rglob("*.png"))) == 3
    bad = subprocess.run([sys.executable, "-m", "rayseg.cli", "synth", str(tmp_path / "b"), "--count", "0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["rayseg synth: error: --count must be at least 1"], bad.stderr
