"""What the nightly flows share (test_nightly_scale.py, test_nightly_lease.py): where inputs and OUT live (a local
folder or S3 on a moto server), a run as a real `rayseg nightly` process joined to the session's `ray start --head`,
killing its whole process session, the same command run in this process (`run_here`, on the session's embedded
Ray: for the runs a flow never kills, pauses or reads the exit status of), and reading the table and the lease
the documented way."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import png_bytes, random_image, tar_bytes
from rayseg.table import open_table, read_table

RAYSEG = str(Path(sys.executable).with_name("rayseg"))
OPTS = ["--model", "unet", "--input-size", "32", "--batch-size", "8", "--quiet"]


class Site:
    """Where the inputs and OUT live: a local folder or an S3 bucket; `url` and `put` hide which."""

    def __init__(self, root: Path, s3=None):
        self.root, self.opts = root, (s3[1] if s3 else None)
        self.base = s3[0] if s3 else str(root)
        if s3:
            import s3fs

            self.fs = s3fs.S3FileSystem(**self.opts)

    def url(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def put(self, rel: str, data: bytes) -> str:
        if self.opts is None:
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            return f"file://{path}"
        self.fs.pipe(self.url(rel), data)
        return self.url(rel)

    def args(self) -> list[str]:
        return ["--storage-options", json.dumps(self.opts)] if self.opts else []


def write_shards(site: Site, folder: str, shards: int, per_shard: int, seed: int = 0) -> dict[str, set[str]]:
    """Tar shards of tiny PNGs; returns shard URL -> the image_ids nightly must produce for it."""
    rng = np.random.default_rng(seed)
    out = {}
    for s in range(shards):
        data = tar_bytes({f"img{i}.png": png_bytes(random_image(rng, 24, 32)) for i in range(per_shard)})
        url = site.put(f"{folder}/s{s:03d}.tar", data)
        out[url] = {f"{url}::img{i}" for i in range(per_shard)}
    return out


def nightly_cmd(site: Site, folder: str, *extra: str, out: str = "out") -> list[str]:
    return [RAYSEG, "nightly", site.url(folder), "--output", site.url(out), *OPTS, *site.args(), *extra]


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    proc.err = err  # for a caller that checks the log lines
    return json.loads(out.strip().splitlines()[-1])


def run_here(cmd: list[str]) -> tuple[dict, str]:
    """`cmd` (a `rayseg nightly` command line) as `nightly(cfg)` in this process, on the session's embedded Ray (the
    caller asks for fixture ray_local): its flags parsed by the CLI's own parser. Returns (summary, the lines rayseg
    logged). A run that kills nothing needs no process of its own, and this one pays no torch import, no Ray join and
    no new task workers."""
    from rayseg.cli import build_parser
    from rayseg.cliutil import config_from_args
    from rayseg.config import NightlyConfig
    from rayseg.nightly import nightly

    args = build_parser("nightly").parse_args(cmd[1:])
    cfg = config_from_args(NightlyConfig, args, args.config)
    logger, text = logging.getLogger("rayseg"), io.StringIO()
    handler, level = logging.StreamHandler(text), logger.level
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        return nightly(cfg), text.getvalue()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def kill_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL the driver and every process of its session (the Ray it started), and wait until none is left."""
    with _quiet(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=timeout)
    deadline = time.monotonic() + timeout
    while left := [int(p) for p in os.listdir("/proc") if p.isdigit() and _sid(int(p)) == proc.pid]:
        assert time.monotonic() < deadline, f"processes of the killed run still alive: {left}"
        for pid in left:
            with _quiet(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class _quiet:
    def __init__(self, *exc):
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, tp, value, tb):
        return tp is not None and issubclass(tp, self.exc)


def snapshot(site: Site):
    """What a reader sees now, read the documented way; an empty frame before the first commit."""
    import pandas as pd

    try:
        return read_table(site.url("out"), site.opts).to_table(columns=["image_id", "shard", "mask_png", "mask_rle"]).to_pandas()
    except Exception as e:  # noqa: BLE001 - only "no table yet" is expected
        if "not a Delta table" in str(e) or "No files in log segment" in str(e) or isinstance(e, FileNotFoundError):
            return pd.DataFrame(columns=["image_id", "shard"])
        raise


def assert_whole(df, expected: dict[str, set[str]]) -> None:
    """No image twice, and every shard present is present whole."""
    dupes = df.image_id[df.image_id.duplicated()].tolist()
    assert not dupes, f"rows seen twice: {dupes[:5]}"
    for shard, ids in df.groupby("shard").image_id:
        assert set(ids) == expected[shard], f"shard {shard} seen in part: {len(ids)} of {len(expected[shard])} rows"


def waves(site: Site) -> int:
    """Waves the first run on a new output has committed so far: its table versions less the create (0) and the
    fence the run commits when it takes the lease (1). One listing of the log per call, as cheap as a reader's poll."""
    dt = open_table(site.url("out"), site.opts) if _exists(site) else None
    return max(0, dt.version() - 1) if dt is not None else 0


def _exists(site: Site) -> bool:
    from rayseg.table import is_table

    return is_table(site.url("out"), site.opts)


def kill_when_done(cmd: list[str], env: dict, images: int, committed: int = 0) -> tuple[int, int]:
    """Start `cmd` with progress lines every 0.2 s; SIGKILL its session once a line says `images` are done and at
    least `committed` of them committed by its waves (or let it end); returns (done, committed) of the last line
    before the kill."""
    proc = subprocess.Popen([a for a in cmd if a != "--quiet"], env={**env, "RAYSEG_PROGRESS_INTERVAL": "0.2"},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = said = 0
    for line in proc.stderr:
        if m := re.search(r"progress: ([\d,]+) images done \(\d+ errors\), ([\d,]+) committed", line):
            done, said = (int(g.replace(",", "")) for g in m.groups())
            if done >= images and said >= committed:
                break
    kill_session(proc)
    return done, said


def kill_and_rerun_at_once(site: Site, env: dict | None, cmd: list[str], expected: dict[str, set[str]], done: int) -> dict:
    """After a kill: whole shards committed; a rerun started at once (default 300 s lease, no --lease-wait) takes
    the dead run's lease over and leaves every image once. The rerun is `cmd` run in this process (run_here, on
    ray_local) with env None, else a `rayseg nightly` process. Returns what the kill kept, for the caller's checks."""
    at_kill, held = snapshot(site), lease_of(site)
    assert_whole(at_kill, expected)
    if env is None:
        summary, err = run_here(cmd)  # a live lease (300 s left) would have refused it: LeaseHeld
    else:
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]  # a live lease (300 s left) would have refused it: exit 2
        summary, err = json.loads(rerun.stdout.strip().splitlines()[-1]), rerun.stderr
    assert summary["redone_after_kill"]["run_id"] == held["run_id"]
    assert f"took over the lease of run {held['run_id']} at once: its process (pid {held['pid']} on this host) no longer exists" in err
    df = snapshot(site)
    assert_whole(df, expected)
    total = len(set().union(*expected.values()))
    assert len(df) == total and summary["rows"] == total - len(at_kill)
    print(f"done by the kill {done}, committed {len(at_kill)} of {total}; rerun {summary['elapsed_s']} s for {summary['rows']} images, "
          f"in flight at the kill: {summary['redone_after_kill']}")
    return {"committed": len(at_kill), "lease": held}


def lease_of(site: Site) -> dict:
    from rayseg.lease import _Store

    return _Store(site.url("out"), site.opts).read()[0]


def lease_exists(site: Site) -> bool:
    return lease_of(site) is not None


def commit_runs(site: Site) -> list[str | None]:
    from rayseg import storage

    fs, log_dir = storage.filesystem(site.url("out", "images", "_delta_log"), site.opts)
    fs.invalidate_cache()
    runs = []
    for path in sorted(p for p in fs.ls(log_dir, detail=False) if p.endswith(".json")):
        info = [json.loads(ln)["commitInfo"] for ln in fs.cat_file(path).decode().splitlines() if '"commitInfo"' in ln]
        runs.append(info[0].get("rayseg.run_id") if info else None)
    return runs


def rewrite_lease(site: Site, **changes) -> None:
    from rayseg.lease import _Store

    store = _Store(site.url("out"), site.opts)
    record, etag = store.read()
    store.write({**record, **changes}, etag)
