"""What the GPU parts of cluster/ must agree on: a torch built for a CUDA the nodes' drivers run, GPU pools as large
as the GPU groups, and an object store that fits in each pod's /dev/shm.

    pytest tests/unit/test_cluster_gpu.py
"""

from __future__ import annotations

import re

import yaml

from cluster_helpers import CLUSTER, cluster_specs, dockerfile_instructions, launcher

REPO = CLUSTER.parent
CU128 = "https://download.pytorch.org/whl/cu128"


def quantity(text: str) -> int:
    m = re.fullmatch(r"(\d+)(Gi|Mi)?", str(text))
    return int(m.group(1)) * {"Gi": 2**30, "Mi": 2**20, None: 1}[m.group(2)]


def test_torch_comes_from_the_cuda_12_8_index_before_rayseg_everywhere():
    runs = " ".join(a for op, a in dockerfile_instructions(CLUSTER / "Dockerfile") if op == "RUN")
    assert runs.index(CU128) < runs.index("/app[")
    for name in ("aws.yaml", "gcp.yaml"):
        setup = launcher(CLUSTER / name)["setup_commands"]
        first = next(i for i, c in enumerate(setup) if "torch" in c)
        assert CU128 in setup[first] and first < next(i for i, c in enumerate(setup) if "rayseg" in c), name


def test_launcher_images_carry_a_driver_for_that_build():
    aws = launcher(CLUSTER / "aws.yaml")
    assert all(t["node_config"]["ImageId"] != "latest_dlami" for t in aws["available_node_types"].values())
    gcp = (CLUSTER / "gcp.yaml").read_text()
    assert "common-cu124" not in gcp and "nvidia-570" in gcp


def test_segment_jobs_ask_for_gpus_up_to_the_gpu_groups_size():
    cfg = yaml.safe_load((REPO / "jobs/configs/segment.yaml").read_text())
    assert cfg["device"] == "cuda"
    most = int(cfg["actors"].split(":")[1])
    for name in ("aws.yaml", "gcp.yaml"):
        assert launcher(CLUSTER / name)["available_node_types"]["gpu_segment"]["max_workers"] == most, name
    for label, spec in cluster_specs():
        for group in spec.get("workerGroupSpecs", []):
            if group["groupName"] == "gpu-segment":
                assert group["maxReplicas"] == most, label


def test_every_ray_pods_object_store_fits_in_its_shm():
    for label, spec in cluster_specs():
        for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
            name = group.get("groupName", "head")
            store = quantity(group["rayStartParams"]["object-store-memory"])
            pod = group["template"]["spec"]
            shm = next(v for v in pod["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"]
            memory = quantity(pod["containers"][0]["resources"]["limits"]["memory"])
            assert store + 2**30 <= quantity(shm) <= memory // 2, (label, name)
