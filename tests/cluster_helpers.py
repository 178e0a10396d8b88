"""What the cluster/ tests share: finding and parsing the files under cluster/.

Files are classified by content, so a new file is covered as soon as it is added; a file of a kind no test
checks fails `test_every_file_is_known` (tests/unit/test_cluster_docker.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay-v1"  # KubeRay v1.7 CRDs, gzipped

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def rel(path: Path) -> str:
    return path.relative_to(CLUSTER).as_posix()


def all_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=None)
def yaml_docs(path: Path) -> list:
    """Parsed documents (cached: callers must not modify them)."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=Loader) if d is not None]


def kind_of(path: Path) -> str:
    """launcher | k8s | dockerfile | dockerignore | readme | unknown."""
    if path.name == "README.md" and path.parent == CLUSTER:
        return "readme"
    if path.name == "Dockerfile":
        return "dockerfile"
    if path.name.endswith(".dockerignore"):
        return "dockerignore"
    if path.suffix in {".yaml", ".yml"}:
        docs = yaml_docs(path)
        if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]:
            return "launcher"
        if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            return "k8s"
    return "unknown"


def files_of(kind: str) -> list[Path]:
    return [p for p in all_files() if kind_of(p) == kind]


def launcher(path: Path) -> dict:
    return yaml_docs(path)[0]


def k8s_docs() -> list[tuple[str, dict]]:
    """(label, document) for every manifest, including RayJobs embedded in ConfigMaps (as cronjob-nightly.yaml does)."""
    out = []
    for path in files_of("k8s"):
        for i, doc in enumerate(yaml_docs(path)):
            label = f"{rel(path)}#{i}:{doc['kind']}"
            out.append((label, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for j, sub in enumerate(yaml.load_all(text, Loader=Loader)):
                            if isinstance(sub, dict) and "kind" in sub:
                                out.append((f"{label}/{key}#{j}:{sub['kind']}", sub))
    return out


def job_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec, including RayCronJob job templates."""
    out = []
    for label, doc in k8s_docs():
        if doc["kind"] == "RayJob":
            out.append((label, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            out.append((label, doc["spec"]["jobTemplate"]))
    return out


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standalone, and the one each RayJob (or RayCronJob's job template) starts."""
    standalone = [(label, doc["spec"]) for label, doc in k8s_docs() if doc["kind"] == "RayCluster"]
    return standalone + [(label, spec["rayClusterSpec"]) for label, spec in job_specs()]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        lines.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return lines


def labelled(pairs: list[tuple[str, dict]], names: str = "label,doc"):
    """parametrize over (label, value) pairs, the label as test id."""
    return pytest.mark.parametrize(names, pairs, ids=[lbl for lbl, _ in pairs])
