"""The rayseg console: what a person at a terminal sees of a run, and what a failing Ray start looks like.

Each test runs the `rayseg` command in a pseudo-terminal (python's pty), as a person would type it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from conftest import free_port
from rayseg.runtime import start_failure

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def run_in_terminal(args: list[str], env: dict, timeout: float) -> tuple[int, str]:
    """(exit status, what the terminal showed) of `rayseg ARGS...` with stdin, stdout and stderr on a pty."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "rayseg.cli", *args], stdin=slave, stdout=slave, stderr=slave,
                            env=env, start_new_session=True)
    os.close(slave)
    out, deadline, quiet_since = bytearray(), time.monotonic() + timeout, None
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"rayseg {args[0]} ran over {timeout} s; the terminal showed:\n{out.decode(errors='replace')[-3000:]}")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: nothing holds the terminal any more
                    break
                if not data:
                    break
                out += data
                quiet_since = None
            elif proc.poll() is not None:  # Ray's processes may keep the terminal open a moment after the command
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 2:
                    break
    finally:
        os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


def screen_lines(text: str) -> list[str]:
    """The lines as a terminal leaves them: a carriage return redraws the line, escape codes are not text."""
    lines = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        shown = ANSI.sub("", raw).split("\r")[-1].strip()
        if shown:
            lines.append(shown)
    return lines


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    e["RAYSEG_LOG_DIR"] = str(tmp_path / "logs")
    return e


@pytest.mark.flow("terminal", "embedded-start")
def test_a_run_in_a_terminal_shows_rayseg_progress_and_puts_rays_lines_in_a_file(tmp_path, env):
    from rayseg.synth import write_archive

    write_archive(str(tmp_path / "in"), "files", 8, labelled=False, seed=1, generator="shapes", num_classes=3, min_size=32, max_size=40)
    out = tmp_path / "out"
    rc, text = run_in_terminal(["segment", str(tmp_path / "in"), "--output", str(out), "--model", "unet", "--num-classes", "3",
                                "--input-size", "32"], env, timeout=600)
    lines = screen_lines(text)
    assert rc == 0, text[-3000:]
    # Ray's own lines are not on the screen: no execution plans, no core worker warnings, no dataset sink lines
    for noise in ("INFO streaming_executor", "core_worker.cc", "Data sink Parquet", "Token authentication", "tqdm"):
        assert noise not in text, f"{noise!r} reached the terminal:\n{text[-3000:]}"
    # rayseg's progress is: a redrawn line while it runs, then the final one
    assert re.search(r"progress: \d+ images done \(\d+ errors\), [\d.]+ images/s, shards \d+/1 read", text), text[-3000:]
    assert any(re.search(r"progress: finished, 8 images \(0 errors\) in \S+, [\d.]+ images/s$", line) for line in lines), lines
    # the summary, then where Ray's lines went
    summary = json.loads(lines[-2])
    assert summary["command"] == "segment" and summary["images"] == 8
    m = re.fullmatch(r"Ray's own log lines: (\S+)", lines[-1])
    assert m, lines[-3:]
    path = m.group(1)
    assert path.startswith(env["RAYSEG_LOG_DIR"]) and os.path.isfile(path)
    logged = open(path, encoding="utf-8").read()
    assert "streaming_executor" in logged and "Execution plan of Dataset" in logged
    assert "core_worker.cc" in logged and "has constructor arguments in the object store" in logged
    assert "Ray's session logs: " in logged


def test_ray_that_cannot_be_reached_is_one_sentence_and_exit_1(tmp_path, env):
    # Ray's own connect budget is untouched (one failed attempt takes ~40 s and it makes 20): rayseg asks first
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"")  # an input to discover; the run fails before reading it
    args = ["segment", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", "unet", "--num-classes", "2", "--address", address]

    t0 = time.monotonic()
    rc, text = run_in_terminal(args, env, timeout=180)
    lines = screen_lines(text)
    assert rc == 1, text
    assert "Traceback" not in text and "rpc_client" not in text and "gcs_client" not in text, text
    assert lines == [f"rayseg segment: error: no Ray cluster answered at {address}: check the address and that the cluster is up "
                     "(`ray status` on its head node), or leave out --address and RAY_ADDRESS to start Ray here"], lines
    assert time.monotonic() - t0 < 60  # the probe's 10 s and the start-up around it, not Ray's many minutes

    # with no terminal (a job's log) it is the same sentence as the last line, exit 1, no traceback
    proc = subprocess.run([sys.executable, "-m", "rayseg.cli", *args], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0]


@pytest.mark.parametrize("error,starts", [
    (ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379"), "no Ray cluster answered at 10.0.0.1:6379"),
    (Exception("The current node timed out during startup. This could happen because some of the raylet failed to startup "
               "or the GCS has become overloaded."), "Ray timed out while starting on this machine"),
    (ValueError("Failed to bind to 127.0.0.1:8265 because it's already occupied. You can use `ray start --dashboard-port ...`"),
     "a port Ray needs on this machine is already taken"),
    (OSError(98, "Address already in use"), "a port Ray needs on this machine is already taken"),
    (ValueError("The requested object store memory size is greater than the total available memory."), "there is no room for Ray's object store"),
    (OSError(28, "No space left on device"), "there is no room for Ray's object store"),
])
def test_each_known_start_failure_is_one_sentence_with_what_to_try(error, starts):
    address = "10.0.0.1:6379" if isinstance(error, ConnectionError) else "local"
    sentence = start_failure(error, address)
    assert sentence.startswith(starts) and ": " in sentence and "\n" not in sentence


def test_an_unknown_start_failure_keeps_its_traceback():
    assert start_failure(ValueError("something nobody has seen"), "local") is None



@pytest.mark.flow("ray-start-joined")
def test_a_command_joins_the_ray_that_ray_start_runs_here_and_says_so(tmp_path, env, ray_head):
    """With a `ray start --head` up on this machine (the session's, tests/conftest.py: token auth, as every `ray start`
    head here has, stopped by its processes' ids), `rayseg segment` without --address joins it (one line says so)
    instead of starting a Ray of its own (tests/unit/test_startup.py: `--address local`, a stale announcement)."""
    from rayseg.synth import write_archive

    write_archive(str(tmp_path / "in"), "files", 3, labelled=False, seed=1, generator="shapes", num_classes=2, min_size=32, max_size=40)
    client = ray_head.client_env(RAYSEG_LOG_DIR=env["RAYSEG_LOG_DIR"])
    args = [sys.executable, "-m", "rayseg.cli", "segment", str(tmp_path / "in"), "--model", "unet", "--num-classes", "2",
            "--input-size", "32", "--output", str(tmp_path / "a")]
    joined = subprocess.run(args, env=client, capture_output=True, text=True, timeout=300)
    assert joined.returncode == 0, joined.stderr[-3000:]
    summary = json.loads(joined.stdout.strip().splitlines()[-1])
    address = summary["timeline_s"]["ray_joined"]  # as `ray start` announced it: this machine's IP and the head's port
    assert summary["images"] == 3 and address and address.endswith(f":{ray_head.gcs_port}")
    assert f"joining the Ray already running on this machine at {address}" in joined.stderr
