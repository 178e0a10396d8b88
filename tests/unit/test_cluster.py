"""Checks for everything under cluster/: launcher YAMLs, KubeRay manifests,
the Dockerfile and the README.

Files are discovered by glob, so a new file is covered as soon as it is added;
a file of a kind this module has no check for fails `test_every_file_is_known`.

    pytest tests/unit/test_cluster.py

No network, no cluster, no docker: launcher configs are validated with the
JSON schema (and `validate_config`) shipped in the installed ray wheel, and
KubeRay resources with the CRD schemas in ../shared/schemas/kuberay-v1.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
# The project's shared copy of the KubeRay v1.7 CRDs where present; else the gzipped copy kept beside the tests
# (the same files), so a clean clone on its own still validates every manifest.
SHARED_CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kuberay-v1"
VENDORED_CRD_DIR = Path(__file__).resolve().parents[1] / "schemas" / "kuberay-v1"
CRD_DIR = SHARED_CRD_DIR if SHARED_CRD_DIR.is_dir() else VENDORED_CRD_DIR

JOB_SCRIPTS = {"segment.py", "train.py", "nightly.py"}
CRD_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
# Ports that must never be reachable from outside the cluster.
PRIVATE_PORTS = {6379, 8265, 10001}
WORLD = {"0.0.0.0/0", "::/0"}
# GPUs per machine type used in the launcher files; a type listed here must
# declare exactly this many GPUs (and a GPU count on an unlisted type fails, so
# the table grows with the configs).
MACHINE_GPUS = {
    "m6i.2xlarge": 0, "c6i.8xlarge": 0, "g5.xlarge": 1, "g5.12xlarge": 4,
    "n2-standard-8": 0, "n2-highcpu-32": 0, "g2-standard-8": 1, "g2-standard-48": 4,
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------


def _rel(path: Path) -> str:
    return path.relative_to(CLUSTER).as_posix()


def _all_files() -> list[Path]:
    if not CLUSTER.is_dir():
        return []
    return sorted(
        p for p in CLUSTER.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


@functools.lru_cache(maxsize=None)
def _yaml_docs(path: Path) -> list:
    """Parsed documents (cached: callers must not modify them)."""
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


def _kind(path: Path) -> str:
    """launcher | k8s | dockerfile | dockerignore | readme | unknown."""
    if path.name == "README.md" and path.parent == CLUSTER:
        return "readme"
    if path.name == "Dockerfile":
        return "dockerfile"
    if path.name.endswith(".dockerignore"):
        return "dockerignore"
    if path.suffix in {".yaml", ".yml"}:
        docs = _yaml_docs(path)
        if len(docs) == 1 and isinstance(docs[0], dict) and "provider" in docs[0]:
            return "launcher"
        if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
            return "k8s"
    return "unknown"


def _files_of(kind: str) -> list[Path]:
    return [p for p in _all_files() if _kind(p) == kind]


def _params(kind: str):
    files = _files_of(kind)
    return pytest.mark.parametrize("path", files, ids=[_rel(p) for p in files])


def test_cluster_folder_has_each_kind():
    kinds = {_kind(p) for p in _all_files()}
    assert {"launcher", "k8s", "dockerfile", "readme"} <= kinds, kinds


def test_every_file_is_known():
    unknown = [_rel(p) for p in _all_files() if _kind(p) == "unknown"]
    assert not unknown, (
        f"no checks exist for {unknown}: add a file kind to tests/unit/test_cluster.py"
    )


# --------------------------------------------------------------------------
# Ray cluster launcher
# --------------------------------------------------------------------------


def _ray_dir() -> Path | None:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def _ray_launcher_schema() -> dict:
    ray_dir = _ray_dir()
    if ray_dir is None:
        pytest.skip("ray is not installed: its launcher schema ships in the wheel")
    return json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())


def _launcher(path: Path) -> dict:
    return _yaml_docs(path)[0]


@_params("launcher")
def test_launcher_matches_ray_schema(path):
    jsonschema.validate(_launcher(path), _ray_launcher_schema())


@_params("launcher")
def test_launcher_cross_field_rules(path):
    cfg = _launcher(path)
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


@_params("launcher")
def test_launcher_passes_rays_own_validation(path):
    """prepare_config + validate_config run offline (no cloud credentials)."""
    if _ray_dir() is None:
        pytest.skip("ray is not installed")
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_launcher(path)))


@_params("launcher")
def test_launcher_node_resources(path):
    cfg = _launcher(path)
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
    cpu_types = [
        n for n, t in cfg["available_node_types"].items()
        if not t["resources"].get("GPU") and n != cfg["head_node_type"]
    ]
    assert gpu_types and cpu_types, "need GPU workers (segment/train) and CPU workers (decode)"


@_params("launcher")
def test_launcher_security(path):
    cfg = _launcher(path)
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


@_params("launcher")
def test_launcher_installs_rayseg(path):
    cfg = _launcher(path)
    setup = cfg.get("setup_commands", []) + cfg.get("head_setup_commands", [])
    image = cfg.get("docker", {}).get("image", "")
    assert any("pip install" in c and "rayseg" in c for c in setup) or "rayseg" in image


# --------------------------------------------------------------------------
# Kubernetes / KubeRay
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR}")
    path = CRD_DIR / f"ray.io_{CRD_KINDS[kind]}.yaml"
    if not path.exists():
        import gzip

        crd = yaml.load(gzip.decompress((CRD_DIR / f"{path.name}.gz").read_bytes()), Loader=_Loader)
    else:
        crd = _yaml_docs(path)[0]
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def _pod_template_schema() -> dict:
    """The core PodTemplateSpec schema, as embedded in the RayCluster CRD."""
    spec = _crd_schema("RayCluster")["properties"]["spec"]
    return spec["properties"]["headGroupSpec"]["properties"]["template"]


OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations"}


def _obj(props: dict, required=()) -> dict:
    return {"type": "object", "properties": props, "required": list(required),
            "additionalProperties": False}


_STR = {"type": "string"}
_INT = {"type": "integer"}
_BOOL = {"type": "boolean"}
_STRS = {"type": "array", "items": _STR}
_META = _obj({k: ({"type": "object", "additionalProperties": _STR}
                  if k in ("labels", "annotations") else _STR) for k in OBJECT_META})


@functools.lru_cache(maxsize=None)
def _core_schemas() -> dict:
    """Hand-written, closed schemas for the core kinds used under cluster/:
    just the fields these manifests may use, so a typo fails here instead of
    being pruned by the API server. Pod templates use the CRD's full schema."""
    pod = _pod_template_schema()
    cronjob_spec = _obj({
        "schedule": _STR, "timeZone": _STR,
        "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
        "startingDeadlineSeconds": _INT, "successfulJobsHistoryLimit": _INT,
        "failedJobsHistoryLimit": _INT, "suspend": _BOOL,
        "jobTemplate": _obj({
            "metadata": _META,
            "spec": _obj({
                "backoffLimit": _INT, "activeDeadlineSeconds": _INT,
                "ttlSecondsAfterFinished": _INT, "parallelism": _INT,
                "completions": _INT, "template": pod,
            }, required=["template"]),
        }, required=["spec"]),
    }, required=["schedule", "jobTemplate"])
    rule = _obj({"apiGroups": _STRS, "resources": _STRS, "verbs": _STRS,
                 "resourceNames": _STRS}, required=["verbs"])
    subject = _obj({"kind": _STR, "name": _STR, "namespace": _STR, "apiGroup": _STR},
                   required=["kind", "name"])
    head = {"apiVersion": _STR, "kind": _STR, "metadata": _META}
    return {
        ("batch/v1", "CronJob"): _obj({**head, "spec": cronjob_spec}, ["spec"]),
        ("v1", "ServiceAccount"): _obj({**head, "automountServiceAccountToken": _BOOL,
                                        "imagePullSecrets": {"type": "array"}}),
        ("rbac.authorization.k8s.io/v1", "Role"): _obj(
            {**head, "rules": {"type": "array", "items": rule}}, ["rules"]),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"): _obj({
            **head,
            "roleRef": _obj({"apiGroup": _STR, "kind": _STR, "name": _STR},
                            ["apiGroup", "kind", "name"]),
            "subjects": {"type": "array", "items": subject},
        }, ["roleRef", "subjects"]),
        ("v1", "ConfigMap"): _obj({**head, "data": {"type": "object",
                                                    "additionalProperties": _STR}}),
    }


def _unknown_keys(doc, schema: dict, path: str = "") -> list[str]:
    """Keys in `doc` that `schema` does not define. The API server prunes such
    fields silently (CRDs have no x-kubernetes-preserve-unknown-fields here),
    so a misspelt field would simply vanish."""
    if not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(doc, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if props is None and not isinstance(extra, dict):
            return []  # a free-form object (e.g. embedded ObjectMeta): nothing to walk
        for key, value in doc.items():
            if props and key in props:
                found += _unknown_keys(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += _unknown_keys(value, extra, f"{path}.{key}")
            else:
                found.append(f"{path}.{key}")
    elif isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            found += _unknown_keys(item, schema["items"], f"{path}[{i}]")
    return found


def _k8s_docs() -> list[tuple[str, dict]]:
    """(label, document) for every manifest, including RayJobs embedded in
    ConfigMaps (as cronjob-nightly.yaml does)."""
    out = []
    for path in _files_of("k8s"):
        for i, doc in enumerate(_yaml_docs(path)):
            label = f"{_rel(path)}#{i}:{doc['kind']}"
            out.append((label, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in (doc.get("data") or {}).items():
                    if key.endswith((".yaml", ".yml")):
                        for j, sub in enumerate(yaml.load_all(text, Loader=_Loader)):
                            if isinstance(sub, dict) and "kind" in sub:
                                out.append((f"{label}/{key}#{j}:{sub['kind']}", sub))
    return out


def _doc_params():
    docs = _k8s_docs()
    return pytest.mark.parametrize("label,doc", docs, ids=[lbl for lbl, _ in docs])


def _schema_for(doc: dict) -> dict:
    if doc["kind"] in CRD_KINDS:
        assert doc["apiVersion"] == "ray.io/v1"
        schema = dict(_crd_schema(doc["kind"]))
        # The CRD leaves metadata to the API server; check it like core objects.
        schema["properties"] = {**schema["properties"], "metadata": _META}
        return schema
    key = (doc["apiVersion"], doc["kind"])
    schemas = _core_schemas()
    assert key in schemas, f"no schema for {key}: add one to _core_schemas()"
    return schemas[key]


@_doc_params()
def test_manifest_identity(label, doc):
    meta = doc.get("metadata") or {}
    assert doc.get("apiVersion") and doc.get("kind")
    assert meta.get("name") or meta.get("generateName"), label
    assert meta.get("namespace"), f"{label}: set metadata.namespace explicitly"


@functools.lru_cache(maxsize=None)
def _validator(api_version: str, kind: str):
    schema = _schema_for({"apiVersion": api_version, "kind": kind})
    # No check_schema(): the CRD schemas are large and use OpenAPI extensions.
    return jsonschema.validators.validator_for(schema)(schema)


@_doc_params()
def test_manifest_matches_schema(label, doc):
    errors = sorted(_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=str)
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
    )


@_doc_params()
def test_manifest_has_no_unknown_fields(label, doc):
    unknown = _unknown_keys(doc, _schema_for(doc))
    assert not unknown, f"fields the API server would drop: {unknown}"


# ---- helpers over Ray cluster specs ------------------------------------


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standalone, inside RayJobs, inside RayCronJobs."""
    specs = []
    for label, doc in _k8s_docs():
        if doc["kind"] == "RayCluster":
            specs.append((label, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((label, doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((label, doc["spec"]["jobTemplate"]["rayClusterSpec"]))
    return specs


def _job_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec, including RayCronJob job templates."""
    out = []
    for label, doc in _k8s_docs():
        if doc["kind"] == "RayJob":
            out.append((label, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            out.append((label, doc["spec"]["jobTemplate"]))
    return out


def _spec_params(fn):
    specs = fn()
    return pytest.mark.parametrize("label,spec", specs, ids=[lbl for lbl, _ in specs])


def _groups(spec: dict):
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs", []):
        yield g["groupName"], g


def _containers(pod_template: dict) -> list[dict]:
    spec = pod_template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def _quantity(q) -> float:
    q = str(q)
    if q.endswith("m"):
        return float(q[:-1]) / 1000
    return float(q)


def _all_pod_templates():
    """(label, pod template) for every pod this folder defines."""
    for label, spec in _cluster_specs():
        for name, g in _groups(spec):
            yield f"{label}/{name}", g["template"]
    for label, spec in _job_specs():
        if "submitterPodTemplate" in spec:
            yield f"{label}/submitter", spec["submitterPodTemplate"]
    for label, doc in _k8s_docs():
        if doc["kind"] == "CronJob":
            yield label, doc["spec"]["jobTemplate"]["spec"]["template"]


def test_there_are_ray_clusters_and_jobs():
    kinds = {doc["kind"] for _, doc in _k8s_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds, kinds


@_spec_params(_cluster_specs)
def test_ray_cluster_token_auth(label, spec):
    assert spec.get("authOptions", {}).get("mode") == "token", label
    # Also in each Ray container, so an operator that drops authOptions fails
    # closed (no token -> Ray refuses to start) instead of running open.
    for name, g in _groups(spec):
        for c in g["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", f"{label}/{name}/{c['name']}"


@_spec_params(_cluster_specs)
def test_ray_cluster_head_not_exposed(label, spec):
    head = spec["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP", label
    assert not head.get("enableIngress"), label
    svc_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
    assert svc_type == "ClusterIP", label


@_spec_params(_cluster_specs)
def test_ray_cluster_groups(label, spec):
    assert spec.get("rayVersion"), label
    for name, g in _groups(spec):
        assert "rayStartParams" in g, f"{label}/{name}: rayStartParams explicit"
        if name != "head":
            assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], name
        (c,) = [c for c in g["template"]["spec"]["containers"] if c["name"].startswith("ray-")]
        limits = c["resources"]["limits"]
        gpus = int(limits.get("nvidia.com/gpu", 0))
        if "gpu" in name:
            assert gpus > 0, f"{label}/{name}: a GPU group needs nvidia.com/gpu limits"
        else:
            assert gpus == 0, f"{label}/{name}: only GPU groups may ask for GPUs"
        params = g["rayStartParams"]
        assert int(params.get("num-gpus", gpus)) == gpus, f"{label}/{name}: num-gpus"
        if name != "head":
            assert _quantity(params.get("num-cpus", limits["cpu"])) == _quantity(limits["cpu"])


def test_standalone_cluster_has_gpu_and_cpu_groups():
    for label, doc in _k8s_docs():
        if doc["kind"] == "RayCluster":
            names = [g["groupName"] for g in doc["spec"]["workerGroupSpecs"]]
            assert any("gpu" in n for n in names) and any("gpu" not in n for n in names), names


def test_pods_are_explicit_and_non_root():
    pods = list(_all_pod_templates())
    assert pods
    for label, tpl in pods:
        pod = tpl["spec"]
        assert pod.get("restartPolicy"), label
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, label
        for c in _containers(tpl):
            where = f"{label}/{c['name']}"
            assert c.get("image") and c.get("imagePullPolicy"), where
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{where}: requests and limits"
            # Extended resources (GPUs) must have requests == limits.
            for key, value in res["limits"].items():
                if "/" in key:
                    assert res["requests"].get(key) == value, where
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where


def test_no_inline_credentials():
    secretish = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL)", re.I)
    for label, tpl in _all_pod_templates():
        for c in _containers(tpl):
            for e in c.get("env", []):
                if secretish.search(e["name"]):
                    assert "value" not in e, f"{label}: {e['name']} inline; use secretKeyRef"


def test_no_public_services():
    for label, doc in _k8s_docs():
        assert doc["kind"] != "Ingress", label
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", label


@_spec_params(_job_specs)
def test_ray_job_fields_explicit(label, spec):
    for field in ("entrypoint", "runtimeEnvYAML", "shutdownAfterJobFinishes",
                  "ttlSecondsAfterFinished", "submissionMode", "backoffLimit",
                  "activeDeadlineSeconds", "suspend", "rayClusterSpec"):
        assert field in spec, f"{label}: {field}"
    assert spec["shutdownAfterJobFinishes"] is True, label
    assert not spec.get("clusterSelector"), label
    if spec["submissionMode"] == "K8sJobMode":
        assert "submitterPodTemplate" in spec, f"{label}: submitter pod explicit"
    # The head runs with num-cpus 0: a driver that asks for CPUs never starts.
    head_cpus = spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].get("num-cpus")
    if head_cpus == "0":
        assert spec.get("entrypointNumCpus") == 0, label


@_spec_params(_job_specs)
def test_runtime_env_yaml_parses(label, spec):
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(env, dict), label
    for k, v in env.get("env_vars", {}).items():
        assert isinstance(k, str) and isinstance(v, str), f"{label}: env_vars must be strings"


def _entrypoint_script(entrypoint: str) -> tuple[list[str], Path]:
    argv = shlex.split(entrypoint)
    assert argv[0] in {"python", "python3"}, argv
    script = argv[1]
    m = re.fullmatch(r"(?:/app/)?(jobs/[\w/]+\.py)", script)
    assert m, f"entrypoint must run a jobs/ script, got {script!r}"
    return argv, REPO / m.group(1)


@_spec_params(_job_specs)
def test_entrypoint_runs_an_existing_job_script(label, spec):
    argv, script = _entrypoint_script(spec["entrypoint"])
    jobs = REPO / "jobs"
    if any(jobs.glob("*.py")):
        assert script.is_file(), f"{label}: {script.relative_to(REPO)} does not exist"
    else:
        assert script.name in JOB_SCRIPTS, script.name
    if "--config" in argv:
        config = argv[argv.index("--config") + 1]
        rel = config.removeprefix("/app/")
        assert rel.startswith("jobs/configs/"), config
        if (REPO / "jobs" / "configs").is_dir():
            assert (REPO / rel).is_file(), f"{label}: {rel} does not exist"
    if "--output" in argv:
        assert re.match(r"^(s3|gs|abfs|az)://", argv[argv.index("--output") + 1]), label


@_spec_params(_job_specs)
def test_runtime_env_matches_jobs_runtime_env(label, spec):
    """RayJobs set the same env_vars as `ray job submit --runtime-env jobs/runtime_env.yaml`."""
    path = REPO / "jobs" / "runtime_env.yaml"
    if not path.is_file():
        pytest.skip("jobs/runtime_env.yaml not written yet")
    wanted = (yaml.safe_load(path.read_text()) or {}).get("env_vars", {})
    got = yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})
    assert {k: got.get(k) for k in wanted} == wanted, label


def test_entrypoints_parse_with_the_rayseg_cli():
    """Every entrypoint's arguments are accepted by the real `rayseg` parser
    (jobs/*.py pass them to `rayseg <command>` unchanged)."""
    try:
        from rayseg.cli import build_parser
    except ImportError as e:
        pytest.skip(f"rayseg.cli not importable: {e}")
    import argparse

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    commands = set(sub.choices)
    checked = 0
    for label, spec in _job_specs():
        argv, script = _entrypoint_script(spec["entrypoint"])
        command = script.stem
        if command not in commands:
            continue  # subcommand not written yet
        try:
            parser.parse_args([command, *argv[2:]])
        except SystemExit:
            pytest.fail(f"{label}: `rayseg {command}` rejects {argv[2:]}")
        checked += 1
    if not checked:
        pytest.skip("no jobs/ subcommand registered in rayseg.cli yet")


@_spec_params(_job_specs)
def test_train_job_has_the_gpus_it_asks_for(label, spec):
    argv, script = _entrypoint_script(spec["entrypoint"])
    if script.name != "train.py" or "--use-gpu" not in argv:
        return
    workers = int(argv[argv.index("--workers") + 1])
    gpus = sum(
        g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                               .get("nvidia.com/gpu", 0))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert gpus >= workers, f"{label}: --workers {workers} but only {gpus} GPUs"


def test_nightly_cron_variants_agree():
    """cronjob-nightly.yaml embeds the same RayJob as raycronjob-nightly.yaml,
    so operators with and without the RayCronJob feature run the same job."""
    docs = _k8s_docs()
    templates = [d["spec"]["jobTemplate"] for _, d in docs if d["kind"] == "RayCronJob"]
    embedded = [d for lbl, d in docs if d["kind"] == "RayJob" and "/" in lbl.split("#")[1]]
    crons = [d for _, d in docs if d["kind"] in ("RayCronJob", "CronJob")]
    assert templates and embedded
    for job in embedded:
        assert job["spec"] in templates, "embedded RayJob differs from the RayCronJob template"
        # One RayJob per night: kubectl create with generateName, never a fixed name.
        assert job["metadata"].get("generateName") and not job["metadata"].get("name")
    for cron in crons:
        assert len(cron["spec"]["schedule"].split()) == 5
        assert cron["spec"].get("timeZone")
    schedules = {c["spec"]["schedule"] for c in crons}
    assert len(schedules) == 1, schedules


def test_cronjob_can_create_its_rayjob():
    for path in _files_of("k8s"):
        docs = _yaml_docs(path)
        for cron in (d for d in docs if d["kind"] == "CronJob"):
            pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            assert c["command"][:3] == ["kubectl", "create", "-f"], c["command"]
            # The manifest file comes from a ConfigMap in the same file.
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            volumes = {v["name"]: v for v in pod["volumes"]}
            target = c["command"][3]
            (vol,) = [n for n, p in mounts.items() if target.startswith(p.rstrip("/") + "/")]
            cm_name = volumes[vol]["configMap"]["name"]
            cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
            key = target.rsplit("/", 1)[1]
            items = {i["path"]: i["key"] for i in volumes[vol]["configMap"].get("items", [])}
            assert items.get(key, key) in cms[cm_name]["data"], target
            # RBAC: the pod's ServiceAccount may create (and get) RayJobs.
            sa = pod["serviceAccountName"]
            assert any(d["kind"] == "ServiceAccount" and d["metadata"]["name"] == sa for d in docs)
            bindings = [
                d for d in docs if d["kind"] == "RoleBinding"
                and any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in d["subjects"])
            ]
            roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Role"}
            verbs = {
                v for b in bindings for r in roles[b["roleRef"]["name"]]["rules"]
                if "ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] for v in r["verbs"]
            }
            assert {"create", "get"} <= verbs, verbs
            assert pod.get("automountServiceAccountToken") is not False


# --------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
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


@_params("dockerfile")
def test_dockerfile(path):
    ins = _instructions(path)
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


@_params("dockerignore")
def test_dockerignore(path):
    patterns = {ln.strip() for ln in path.read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv"} <= patterns
    # BuildKit only reads <Dockerfile>.dockerignore next to that Dockerfile.
    assert (path.parent / path.name.removesuffix(".dockerignore")).is_file()


def test_ray_versions_agree():
    """Image tags, rayVersion and the installed (client) Ray are one version."""
    versions = {}
    for path in _files_of("dockerfile"):
        for op, args in _instructions(path):
            if op == "FROM":
                versions[_rel(path)] = re.search(r":(\d+\.\d+\.\d+)", args).group(1)
    for path in _files_of("launcher"):
        image = _launcher(path).get("docker", {}).get("image", "")
        if image.startswith("rayproject/ray:"):
            versions[_rel(path)] = re.search(r":(\d+\.\d+\.\d+)", image).group(1)
    for label, spec in _cluster_specs():
        versions[label] = spec["rayVersion"]
    ray_dir = _ray_dir()
    if ray_dir is not None:
        from importlib.metadata import version

        versions["installed ray"] = version("ray")
    assert len(set(versions.values())) == 1, versions


# --------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------


def test_readme_covers_files_and_commands():
    readme = (CLUSTER / "README.md").read_text()
    for path in _all_files():
        if path.name != "README.md":
            assert _rel(path) in readme, f"README does not mention {_rel(path)}"
    # `kubectl -n NS get ...` counts as `kubectl get ...`.
    flat = re.sub(r"kubectl -n \S+ ", "kubectl ", readme)
    for cmd in ("ray up", "ray down", "ray dashboard", "kubectl apply", "kubectl delete",
                "ray job submit", "ray job logs -f", "kubectl get rayjobs",
                "kubectl port-forward", "helm install", "RAY_AUTH_MODE=token",
                "RAY_AUTH_TOKEN", "--working-dir .", "--workers 8 --use-gpu"):
        assert cmd in flat, f"README lacks {cmd!r}"
    for port in PRIVATE_PORTS:
        assert str(port) in readme
