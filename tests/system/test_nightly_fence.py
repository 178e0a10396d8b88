"""A nightly run that stalls between renewing its lease and committing, while another run takes the lease over.

Run A is paused with SIGSTOP at the line it logs between the two (`wave N: lease renewed, committing`), as a GC
pause, a VM pause or a storage brown-out would pause it. Run B waits for A's lease to expire, takes it over,
fences the table and finishes. A is resumed and commits from what it read before B: Delta refuses the commit
and A ends with one sentence saying it lost its lease. Every image is in the table once and the manifest reads.
Each run is a real `rayseg nightly` process: A with an embedded Ray of its own (paused, it holds its actors), B and
the last run joined to the session's `ray start` head. The inputs and OUT are on local disk, then on S3 (a moto
server), whose conditional writes hold the lease and Delta's log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from nightly_flows import Site, write_shards
from ray_cluster import session_pids
from rayseg.table import read_state, read_table

RAYSEG = str(Path(sys.executable).parent / "rayseg")
SHARDS, PER_SHARD = 8, 4


def stop_at(proc: subprocess.Popen, pattern: str, timeout: float) -> list[str]:
    """Read proc's stderr until a line matches, then SIGSTOP proc; the lines read."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"run A ended before {pattern!r}:\n{''.join(lines)[-3000:]}")
        lines.append(line)
        if re.search(pattern, line):
            os.kill(proc.pid, signal.SIGSTOP)
            return lines
    pytest.fail(f"run A never logged {pattern!r} in {timeout} s:\n{''.join(lines)[-3000:]}")


@pytest.mark.flow("lease-takeover-fenced")
@pytest.mark.timeout(480)
def test_a_run_stalled_between_renewal_and_commit_is_fenced_out_by_the_run_that_took_over(site: Site, tmp_path, env):
    expected = set().union(*write_shards(site, "in", SHARDS, PER_SHARD).values())
    out = site.url("out")
    ray_tmp = tempfile.mkdtemp(prefix="rsf", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    own = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    own.update(HOME=str(tmp_path), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    cmd = [RAYSEG, "nightly", site.url("in"), "--output", out, "--model", "unet", "--input-size", "32", "--batch-size", "4",
           "--commit-every", str(PER_SHARD), "--lease-seconds", "5", *site.args()]
    a = subprocess.Popen(cmd, env=own, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stop_at(a, r"wave 2: lease renewed, committing", timeout=300)
        b = subprocess.run([*cmd, "--lease-wait", "120"], env=env, start_new_session=True, capture_output=True, text=True, timeout=300)
        assert b.returncode == 0, b.stderr[-3000:]
        took_over = json.loads(b.stdout.strip().splitlines()[-1])
        assert took_over["shards_pending"] == 0 and took_over["rows"] >= PER_SHARD  # B did A's unfinished work

        os.kill(a.pid, signal.SIGCONT)
        a_out, a_err = a.communicate(timeout=180)
        assert a.returncode == 1, a_err[-3000:]
        assert "Traceback" not in a_err, a_err[-3000:]
        errors = [line for line in a_err.splitlines() if line.startswith("rayseg nightly: error:")]
        assert len(errors) == 1 and re.search(r"lost its lease", errors[0]), a_err[-3000:]  # one sentence says why

        ids = read_table(out, site.opts).to_table(columns=["image_id"]).column("image_id").to_pylist()
        assert len(ids) == len(set(ids)) and set(ids) == expected  # every image once: A's stalled wave is not in it
        assert len(read_state(out, site.opts).records) == SHARDS  # the manifest reads, naming every shard
        again = subprocess.run(cmd, env=env, start_new_session=True, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and json.loads(again.stdout.strip().splitlines()[-1])["nothing_new"], again.stderr[-3000:]
    finally:
        for sig in (signal.SIGCONT, signal.SIGKILL):  # whatever is left of A's session: it and its embedded Ray
            for pid in session_pids(a.pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        a.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)

