"""The Ray cluster launcher configs (cluster/aws.yaml, cluster/gcp.yaml), checked offline.

    pytest tests/unit/test_cluster_launcher.py

No cloud credentials and no network: each file is validated against the JSON schema shipped in the installed
ray wheel and by Ray's own `prepare_config` + `validate_config`, then against rules of this project.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import jsonschema
import pytest

from cluster_helpers import CLUSTER, files_of, launcher, rel

LAUNCHERS = ("aws.yaml", "gcp.yaml")
WORLD = {"0.0.0.0/0", "::/0"}
# GPUs per machine type used in the launcher files; a type listed here must declare exactly this many GPUs
# (and a GPU count on an unlisted type fails, so the table grows with the configs).
MACHINE_GPUS = {
    "m6i.2xlarge": 0, "c6i.8xlarge": 0, "g5.xlarge": 1, "g5.12xlarge": 4,
    "n2-standard-8": 0, "n2-highcpu-32": 0, "g2-standard-8": 1, "g2-standard-48": 4,
}

each_launcher = pytest.mark.parametrize("path", [CLUSTER / name for name in LAUNCHERS], ids=LAUNCHERS)


@functools.lru_cache(maxsize=None)
def ray_launcher_schema() -> dict:
    ray_dir = Path(list(importlib.util.find_spec("ray").submodule_search_locations)[0])
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def test_every_launcher_config_is_checked():
    assert sorted(rel(p) for p in files_of("launcher")) == sorted(LAUNCHERS)


@each_launcher
def test_launcher_matches_ray_schema(path):
    jsonschema.validate(launcher(path), ray_launcher_schema())


@each_launcher
def test_launcher_passes_rays_own_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher(path)))


@each_launcher
def test_launcher_cross_field_rules(path):
    cfg = launcher(path)
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types, f"head_node_type {head!r} is not in available_node_types"
    for name, t in types.items():
        assert "max_workers" in t, f"{name}: max_workers left to the default"
        assert t.get("min_workers", 0) <= t["max_workers"], name
    assert types[head]["max_workers"] == 0, "the head type must not scale"
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cfg["max_workers"]
    assert sum(t["max_workers"] for n, t in types.items() if n != head) <= cfg["max_workers"], (
        "global max_workers would silently cap a node type"
    )


@each_launcher
def test_launcher_node_resources(path):
    cfg = launcher(path)
    for name, t in cfg["available_node_types"].items():
        res = t["resources"]
        assert "CPU" in res, f"{name}: declare CPU explicitly"
        node = t["node_config"]
        machine = node.get("InstanceType") or node.get("machineType")
        assert machine in MACHINE_GPUS, f"{name}: add {machine!r} to MACHINE_GPUS"
        assert res.get("GPU", 0) == MACHINE_GPUS[machine], (
            f"{name}: {machine} has {MACHINE_GPUS[machine]} GPU(s), resources say {res.get('GPU', 0)}"
        )
        if "gpu" in name.lower():
            assert res.get("GPU", 0) > 0, f"{name} is meant for GPUs but declares none"
    gpu_types = [n for n, t in cfg["available_node_types"].items() if t["resources"].get("GPU")]
    cpu_types = [n for n, t in cfg["available_node_types"].items()
                 if not t["resources"].get("GPU") and n != cfg["head_node_type"]]
    assert gpu_types and cpu_types, "need GPU workers (segment/train) and CPU workers (decode)"


@each_launcher
def test_launcher_security(path):
    cfg = launcher(path)
    head_cmds = " ; ".join(cfg["head_start_ray_commands"])
    worker_cmds = " ; ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "0.0.0.0" not in head_cmds + worker_cmds
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all("export RAY_AUTH_MODE=token" in c for c in starts), cmds
    # The token must reach every node at Ray's default path.
    remote_paths = {k.rstrip("/") for k in cfg.get("file_mounts", {})}
    assert "~/.ray/auth_token" in remote_paths, "propagate the auth token via file_mounts"

    provider = cfg["provider"]
    for rule in provider.get("security_group", {}).get("IpPermissions", []):
        cidrs = {r.get("CidrIp") for r in rule.get("IpRanges", [])}
        cidrs |= {r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])}
        assert not cidrs & WORLD, f"security group rule open to the world: {rule}"
    for name, t in cfg["available_node_types"].items():
        node = t["node_config"]
        if provider["type"] == "aws":
            # Without explicit groups the launcher creates one with SSH open to 0.0.0.0/0.
            assert node.get("SecurityGroupIds"), f"{name}: set SecurityGroupIds"
        if provider["type"] == "gcp":
            # Without networkInterfaces the launcher picks a subnet of the project,
            # typically the default network whose SSH rule is open to 0.0.0.0/0.
            nics = node.get("networkInterfaces")
            assert nics, f"{name}: set networkInterfaces"
            for nic in nics:
                assert "/subnetworks/default" not in nic.get("subnetwork", "/subnetworks/default")


@each_launcher
def test_launcher_installs_rayseg(path):
    cfg = launcher(path)
    setup = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    image = cfg.get("docker", {}).get("image", "")
    assert any("pip install" in c and "rayseg" in c for c in setup) or "rayseg" in image
