"""The KubeRay manifests under cluster/kuberay/, checked offline against the KubeRay v1 CRDs.

    pytest tests/unit/test_cluster_kuberay.py

RayCluster, RayJob and RayCronJob documents (also those embedded in ConfigMaps) are validated with the CRD
schemas kept in tests/schemas/kuberay-v1/, and so are the pod templates of the core kinds. The few core kinds
no CRD describes (CronJob, ConfigMap, ServiceAccount, Role, RoleBinding) get closed schemas of just the fields
these manifests use. Then the project's rules: token auth, no public endpoints, explicit resources, job
entrypoints that the rayseg CLI accepts.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster_helpers import CRD_DIR, REPO, Loader, cluster_specs, files_of, job_specs, k8s_docs, labelled, rel, yaml_docs

KUBERAY_FILES = {"kuberay/raycluster.yaml", "kuberay/rayjob-segment.yaml", "kuberay/rayjob-train.yaml",
                 "kuberay/raycronjob-nightly.yaml", "kuberay/cronjob-nightly.yaml"}
CRD_KINDS = {"RayCluster": "rayclusters", "RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
JOB_SCRIPTS = {"segment.py", "train.py", "nightly.py"}


def test_every_kuberay_manifest_is_checked():
    assert {rel(p) for p in files_of("k8s")} == KUBERAY_FILES


@functools.lru_cache(maxsize=None)
def _crd_schema(kind: str) -> dict:
    crd = yaml.load(gzip.decompress((CRD_DIR / f"ray.io_{CRD_KINDS[kind]}.yaml.gz").read_bytes()), Loader=Loader)
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


@labelled(k8s_docs())
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


@labelled(k8s_docs())
def test_manifest_matches_schema(label, doc):
    errors = sorted(_validator(doc["apiVersion"], doc["kind"]).iter_errors(doc), key=str)
    assert not errors, "\n".join(
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
    )


@labelled(k8s_docs())
def test_manifest_has_no_unknown_fields(label, doc):
    unknown = _unknown_keys(doc, _schema_for(doc))
    assert not unknown, f"fields the API server would drop: {unknown}"


# ---- helpers over Ray cluster specs ------------------------------------


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
    for label, spec in cluster_specs():
        for name, g in _groups(spec):
            yield f"{label}/{name}", g["template"]
    for label, spec in job_specs():
        if "submitterPodTemplate" in spec:
            yield f"{label}/submitter", spec["submitterPodTemplate"]
    for label, doc in k8s_docs():
        if doc["kind"] == "CronJob":
            yield label, doc["spec"]["jobTemplate"]["spec"]["template"]


def test_there_are_ray_clusters_and_jobs():
    kinds = {doc["kind"] for _, doc in k8s_docs()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob"} <= kinds, kinds


@labelled(cluster_specs(), "label,spec")
def test_ray_cluster_token_auth(label, spec):
    assert spec.get("authOptions", {}).get("mode") == "token", label
    # Also in each Ray container, so an operator that drops authOptions fails
    # closed (no token -> Ray refuses to start) instead of running open.
    for name, g in _groups(spec):
        for c in g["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", f"{label}/{name}/{c['name']}"


@labelled(cluster_specs(), "label,spec")
def test_ray_cluster_head_not_exposed(label, spec):
    head = spec["headGroupSpec"]
    assert head.get("serviceType") == "ClusterIP", label
    assert not head.get("enableIngress"), label
    svc_type = head.get("headService", {}).get("spec", {}).get("type", "ClusterIP")
    assert svc_type == "ClusterIP", label


@labelled(cluster_specs(), "label,spec")
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
    for label, doc in k8s_docs():
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
    for label, doc in k8s_docs():
        assert doc["kind"] != "Ingress", label
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", label


@labelled(job_specs(), "label,spec")
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


@labelled(job_specs(), "label,spec")
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


@labelled(job_specs(), "label,spec")
def test_entrypoint_runs_an_existing_job_script(label, spec):
    argv, script = _entrypoint_script(spec["entrypoint"])
    assert script.name in JOB_SCRIPTS, script.name
    assert script.is_file(), f"{label}: {script.relative_to(REPO)} does not exist"
    if "--config" in argv:
        config = argv[argv.index("--config") + 1]
        rel = config.removeprefix("/app/")
        assert rel.startswith("jobs/configs/"), config
        assert (REPO / rel).is_file(), f"{label}: {rel} does not exist"
    if "--output" in argv:
        assert re.match(r"^(s3|gs|abfs|az)://", argv[argv.index("--output") + 1]), label


@labelled(job_specs(), "label,spec")
def test_runtime_env_matches_jobs_runtime_env(label, spec):
    """RayJobs set the same env_vars as `ray job submit --runtime-env jobs/runtime_env.yaml`."""
    wanted = (yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text()) or {}).get("env_vars", {})
    assert wanted, "jobs/runtime_env.yaml sets no env_vars"
    got = yaml.safe_load(spec["runtimeEnvYAML"]).get("env_vars", {})
    assert {k: got.get(k) for k in wanted} == wanted, label


def test_entrypoints_parse_with_the_rayseg_cli():
    """Every entrypoint's arguments are accepted by the real `rayseg` parser
    (jobs/*.py pass them to `rayseg <command>` unchanged)."""
    from rayseg.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    specs = job_specs()
    assert specs
    for label, spec in specs:
        argv, script = _entrypoint_script(spec["entrypoint"])
        command = script.stem
        assert command in sub.choices, f"{label}: runs jobs/{script.name}, but rayseg has no {command!r} command"
        try:
            parser.parse_args([command, *argv[2:]])
        except SystemExit:
            pytest.fail(f"{label}: `rayseg {command}` rejects {argv[2:]}")


@labelled(job_specs(), "label,spec")
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
    docs = k8s_docs()
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
    for path in files_of("k8s"):
        docs = yaml_docs(path)
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


