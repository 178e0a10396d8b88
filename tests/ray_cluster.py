"""A real Ray cluster on this machine for the tests: `ray start` under its own temp dir, HOME and token.

Stopped by killing exactly the processes it started (found by session id and temp dir), never by `ray stop`
or by name, which would stop every Ray here.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def node_ports() -> list[str]:
    names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")
    return [f"{n}={p}" for n, p in zip(names, free_ports(len(names)))]


def started_pids(tmp: str, sids: set[int]) -> list[int]:
    """Processes of this cluster: in a session of one of its `ray start`s, or naming its temp dir."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{name}/cmdline").read_bytes()
            if os.getsid(int(name)) in sids or tmp.encode() in cmdline:
                pids.append(int(name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return pids


class Cluster:
    def __init__(self, tmp: str):
        self.tmp, self.sids = tmp, set()
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dash_port, self.client_port = free_ports(3)
        home = Path(tmp, "home")
        home.mkdir()
        # The cluster's own HOME and token: nothing is read from or written to the user's ~/.ray.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        # RAY_num_workers_soft_limit as README's `ray start --head` and cluster/ set it: Ray otherwise kills an idle
        # worker process after 1 s once a node has more workers than CPUs (its actors count), so each light task
        # of a run on a 2-CPU node waited for a new process (a nightly write task 2 s late, in a traced run)
        self.env.update(HOME=str(home), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_num_workers_soft_limit="256",
                        PATH=f"{BIN}:{os.environ['PATH']}", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", PYTHONUNBUFFERED="1")

    def ray_start(self, node: str, *args: str) -> None:
        # Each node its own temp dir, as on separate machines: nodes sharing one would also share (and replace
        # under each other) the unpacked working dirs of jobs.
        proc = subprocess.Popen([str(BIN / "ray"), "start", "--disable-usage-stats", f"--temp-dir={self.tmp}/{node}", *node_ports(), *args],
                                env=self.env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.sids.add(proc.pid)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out[-3000:]

    def start(self, workers: int = 1, head_cpus: int = 1, dashboard: bool = True, *head_args: str) -> None:
        """The head (its temp dir `TMP/ray`, so a client with RAY_TMPDIR=TMP finds it as `ray start`'s cluster on
        this machine) and `workers` joined nodes of one CPU each."""
        self.ray_start("ray", "--head", f"--port={self.gcs_port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={self.client_port}",
                       f"--include-dashboard={str(dashboard).lower()}", f"--num-cpus={head_cpus}", *head_args)
        for i in range(workers):
            self.ray_start(f"worker{i}", f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1", "--num-cpus=1")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def client_env(self, **extra: str) -> dict:
        """The environment of a command run beside this cluster: its token, and its temp dir as RAY_TMPDIR (where
        `ray start` announced it), no RAY_ADDRESS."""
        return {**self.env, "RAY_TMPDIR": self.tmp, **extra}

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in started_pids(self.tmp, self.sids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + (5 if sig == signal.SIGTERM else 15)
            while started_pids(self.tmp, self.sids) and time.monotonic() < deadline:
                time.sleep(0.5)

    def nodes(self) -> list[dict]:
        """The cluster's nodes as its dashboard lists them (node_id, state, ...)."""
        import urllib.request

        req = urllib.request.Request(f"{self.url}/api/v0/nodes?limit=10", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)["data"]["result"]["result"]

    def alive_nodes(self) -> int:
        return sum(n["state"] == "ALIVE" for n in self.nodes())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dash_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        headers = {"Authorization": f"Bearer {self.token}"}
        deadline = time.monotonic() + 60
        while True:
            try:
                client = JobSubmissionClient(self.url, headers=headers)
                client.list_jobs()
                return client
            except Exception:  # noqa: BLE001 - the dashboard takes a few seconds to come up
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)


def session_pids(sid: int) -> list[int]:
    """Processes in session `sid` (a command started with start_new_session, and the Ray it started)."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    pids.append(int(name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids
