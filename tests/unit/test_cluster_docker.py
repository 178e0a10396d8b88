"""The image (cluster/Dockerfile and its .dockerignore), and what holds the cluster/ folder together:
one Ray version everywhere, every file of a checked kind, a README that names every file and command.

    pytest tests/unit/test_cluster_docker.py

No docker: the Dockerfile is parsed, not built.
"""

from __future__ import annotations

import re
from importlib.metadata import version

from cluster_helpers import (CLUSTER, all_files, cluster_specs, dockerfile_instructions, files_of, kind_of, launcher,
                             rel)

DOCKERFILE = CLUSTER / "Dockerfile"
DOCKERIGNORE = CLUSTER / "Dockerfile.dockerignore"
PRIVATE_PORTS = {6379, 8265, 10001}  # GCS, dashboard, Ray client: never reachable from outside the cluster


def test_cluster_folder_has_each_kind():
    kinds = {kind_of(p) for p in all_files()}
    assert {"launcher", "k8s", "dockerfile", "dockerignore", "readme"} <= kinds, kinds


def test_every_file_is_known():
    unknown = [rel(p) for p in all_files() if kind_of(p) == "unknown"]
    assert not unknown, f"no checks exist for {unknown}: add a file kind to tests/cluster_helpers.py"


def test_dockerfile():
    ins = dockerfile_instructions(DOCKERFILE)
    ops = [op for op, _ in ins]
    first = next(op for op in ops if op != "ARG")
    assert first == "FROM", "FROM must come first"
    base = dict(ins)["FROM"]
    assert re.match(r"rayproject/ray:\S+-(gpu|cu\d+)", base), f"need a CUDA Ray image: {base}"
    copies = [a for op, a in ins if op in ("COPY", "ADD")]
    assert any(a.split()[-1].rstrip("/") == "/app" for a in copies), "copy the repo to /app"
    runs = " ".join(a for op, a in ins if op == "RUN")
    assert re.search(r'pip install --no-cache-dir "?/app\[', runs), "pip install the package"
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), "run as a non-root USER"


def test_dockerignore():
    patterns = {ln.strip() for ln in DOCKERIGNORE.read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv"} <= patterns
    # BuildKit only reads <Dockerfile>.dockerignore next to that Dockerfile.
    assert [rel(p) for p in files_of("dockerignore")] == [rel(DOCKERIGNORE)]
    assert (DOCKERIGNORE.parent / DOCKERIGNORE.name.removesuffix(".dockerignore")).is_file()


def test_ray_versions_agree():
    """Image tags, rayVersion and the installed (client) Ray are one version."""
    versions = {"installed ray": version("ray")}
    for path in files_of("dockerfile"):
        for op, args in dockerfile_instructions(path):
            if op == "FROM":
                versions[rel(path)] = re.search(r":(\d+\.\d+\.\d+)", args).group(1)
    for path in files_of("launcher"):
        image = launcher(path).get("docker", {}).get("image", "")
        if image.startswith("rayproject/ray:"):
            versions[rel(path)] = re.search(r":(\d+\.\d+\.\d+)", image).group(1)
    for label, spec in cluster_specs():
        versions[label] = spec["rayVersion"]
    assert rel(DOCKERFILE) in versions and len(versions) > 2, versions
    assert len(set(versions.values())) == 1, versions


def test_readme_covers_files_and_commands():
    readme = (CLUSTER / "README.md").read_text()
    for path in all_files():
        if path.name != "README.md":
            assert rel(path) in readme, f"README does not mention {rel(path)}"
    # `kubectl -n NS get ...` counts as `kubectl get ...`.
    flat = re.sub(r"kubectl -n \S+ ", "kubectl ", readme)
    for cmd in ("ray up", "ray down", "ray dashboard", "kubectl apply", "kubectl delete",
                "ray job submit", "ray job logs -f", "kubectl get rayjobs",
                "kubectl port-forward", "helm install", "RAY_AUTH_MODE=token",
                "RAY_AUTH_TOKEN", "--working-dir .", "--workers 8 --use-gpu"):
        assert cmd in flat, f"README lacks {cmd!r}"
    for port in PRIVATE_PORTS:
        assert str(port) in readme
