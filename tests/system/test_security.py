"""Security of `segment`: checkpoints cannot run code, credentials never reach an artefact, and every cluster
definition keeps the dashboard (8265), Ray Client (10001) and GCS (6379) off public addresses.

    pytest tests/system/test_security.py

(Tar member paths never becoming files is shown in tests/system/test_bad_inputs.py::test_tar_member_paths_never_become_files;
token auth and ClusterIP-only Services in tests/unit/test_cluster_kuberay.py. This file adds what those leave out.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import png_bytes, random_image
from rayseg import cli
from rayseg.models import ModelCard, UNet, save_checkpoint

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this creates `path`: what a malicious checkpoint would do (with rm -rf or a reverse shell)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _malicious_checkpoint(folder: Path, marker: Path) -> None:
    folder.mkdir()
    state = {k: v for k, v in UNet(2).state_dict().items()}
    state["head.bias"] = _Payload(str(marker))  # one tensor swapped for the payload
    torch.save(state, folder / "model.pt")
    (folder / "model.json").write_text(json.dumps(ModelCard("unet", 2, input_size=32).to_json()))


def test_malicious_checkpoint_is_refused_without_running_it(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    _malicious_checkpoint(ckpt, marker)
    img = tmp_path / "a.png"
    img.write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    out = tmp_path / "out"
    rc = cli.main(["segment", str(img), "--output", str(out), "--checkpoint", str(ckpt), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "cannot load the weights" in err[0] and str(ckpt) in err[0], err
    assert not marker.exists(), "unpickling ran the payload"
    assert not out.exists()
    # the payload is real: a plain (unsafe) load in another process does run it
    code = f"import torch; torch.load({str(ckpt / 'model.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, timeout=120)
    assert marker.exists(), "the test's payload did not work, so the refusal above proves nothing"


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.pt", "model.json"):
        h.update(hashlib.sha256((folder / name).read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def secret_run(s3_server, tmp_path_factory):
    """`rayseg segment` in a child process, its own embedded Ray under a private temp dir, on S3 with secret-looking
    credentials in --storage-options and in the environment. Returns what a leak could show up in."""
    import fsspec

    tmp_path = tmp_path_factory.mktemp("secret")
    opts = {"endpoint_url": s3_server, "key": "testing-key", "secret": "testing-secret-value", "client_kwargs": {"region_name": "us-east-1"}}
    bucket = f"s3://rayseg-sec-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", endpoint_url=s3_server, key=opts["key"], secret=opts["secret"], skip_instance_cache=True).mkdir(bucket)
    opt_secret, env_secret = f"optsecret{uuid.uuid4().hex}", f"envsecret{uuid.uuid4().hex}"
    secret_opts = {**opts, "secret": opt_secret, "key": f"AKIA{opt_secret[-12:].upper()}"}  # moto takes any pair
    fs = fsspec.filesystem("s3", **opts)
    rng = np.random.default_rng(2)
    for i in range(3):
        fs.pipe_file(f"{bucket}/in/img{i}.png", png_bytes(random_image(rng, 9, 11)))
    fs.pipe_file(f"{bucket}/in/broken.png", b"not a png")  # an error row, whose message passes through the logs
    ckpt = tmp_path / "ckpt"
    save_checkpoint(UNet(2), ModelCard("unet", 2, input_size=32), str(ckpt))
    fs.put(str(ckpt), f"{bucket}/ckpt", recursive=True)

    ray_tmp = tempfile.mkdtemp(prefix="rsec", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "AWS_SECRET_ACCESS_KEY": env_secret, "AWS_ACCESS_KEY_ID": "AKIAENVKEY",
           "PYTHONPATH": str(REPO / "tests")}
    env.pop("RAY_ADDRESS", None)
    argv = [sys.executable, "-m", "rayseg.cli", "segment", f"{bucket}/in/*.png", "--output", f"{bucket}/out",
            "--checkpoint", f"{bucket}/ckpt", "--storage-options", json.dumps(secret_opts), "--batch-size", "2"]
    try:
        proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
        logs = {p: p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file() and "logs" in p.parts}
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = {name: fs.cat_file(name) for name in fs.find(f"{bucket}/out")}
    return {"secrets": (opt_secret, env_secret), "proc": proc, "logs": logs, "objects": objects, "fs": fs,
            "bucket": bucket, "digest": _digest(ckpt)}


@pytest.mark.flow("secrets")
def test_credentials_never_reach_logs_summary_or_output(secret_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    r = secret_run
    assert r["logs"], "Ray wrote no session logs under RAY_TMPDIR: nothing was checked"
    assert any(n.endswith(".parquet") for n in r["objects"]) and any(n.endswith("_rayseg.json") for n in r["objects"])
    for secret in r["secrets"]:
        for where, text in (("stdout", r["proc"].stdout), ("stderr", r["proc"].stderr)):
            assert secret not in text, f"credential in the driver's {where}"
        for path, data in r["logs"].items():
            assert secret.encode() not in data, f"credential in Ray log {path}"
        for name, data in r["objects"].items():
            assert secret.encode() not in data, f"credential in output object {name}"
            if name.endswith(".parquet"):  # column data may be compressed: look at the decoded values and metadata too
                pf = pq.ParquetFile(pa.BufferReader(data))
                assert secret not in json.dumps(pf.read().to_pylist(), default=str)
                assert secret.encode() not in b"".join(k + v for k, v in (pf.schema_arrow.metadata or {}).items())
    summary = json.loads(r["objects"][next(n for n in r["objects"] if n.endswith("_rayseg.json"))])
    assert summary["config"]["storage_options"]["secret"] == "***" and summary["config"]["storage_options"]["key"] == "***"
    assert summary["config"]["storage_options"]["endpoint_url"].startswith("http://127.0.0.1")  # not over-redacted


def test_checkpoint_digest_in_every_row_and_the_summary(secret_run):
    import pyarrow as pa
    import pyarrow.parquet as pq

    r = secret_run
    summary = json.loads(r["objects"][next(n for n in r["objects"] if n.endswith("_rayseg.json"))])
    assert summary["model_digest"] == r["digest"]
    tables = [pq.read_table(pa.BufferReader(d)) for n, d in r["objects"].items() if n.endswith(".parquet")]
    models = pa.concat_tables(tables).column("model").to_pylist()
    assert len(models) == 4 and set(models) == {f"unet@{r['digest'][:16]}"}, set(models)  # error rows too


# -- cluster definitions ---------------------------------------------------------------------------------------


def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for p in sorted((REPO / "cluster").rglob("*.y*ml")):
        for d in yaml.safe_load_all(p.read_text()):
            if isinstance(d, dict) and "kind" in d:
                docs.append((p.relative_to(REPO).as_posix(), d))
    return docs


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    yield path, node


def test_no_pod_shares_the_node_network_or_maps_host_ports():
    """hostNetwork or a hostPort would put 8265/10001/6379 on the node's own (often public) address,
    around the ClusterIP Service that tests/unit/test_cluster_kuberay.py checks."""
    docs = _k8s_docs()
    assert docs
    for label, doc in docs:
        for path, value in _walk(doc):
            if path.endswith(".hostNetwork"):
                assert value is not True, f"{label}{path}"
            if path.endswith(".hostPort"):
                pytest.fail(f"{label}{path}: hostPort {value}")
            if path.endswith(".externalIPs") or path.endswith(".loadBalancerSourceRanges"):
                pytest.fail(f"{label}{path}: exposes a Service outside the cluster")


def test_no_command_binds_ray_ports_to_all_interfaces():
    """Launcher commands, job entrypoints and docs: `ray start --dashboard-host=0.0.0.0` or a Ray Client server on a
    public address would open the Jobs API to the network. In-pod binds (KubeRay rayStartParams) sit behind a
    ClusterIP Service and token auth, and are checked in tests/unit/test_cluster_kuberay.py."""
    import re

    bad = re.compile(r"(dashboard-host|dashboard_host|ray-client-server-host|node-ip-address)[= ]+[\"']?0\.0\.0\.0")
    files = [p for p in (REPO / "cluster").rglob("*") if p.is_file()] + [p for p in (REPO / "jobs").rglob("*") if p.is_file()]
    files += [REPO / "README.md"] if (REPO / "README.md").exists() else []
    for p in files:
        hit = bad.search(p.read_text(errors="replace"))  # YAML's `dashboard-host: "0.0.0.0"` (a colon) is not a command
        assert not hit, f"{p.relative_to(REPO)}: {hit.group(0)}"
