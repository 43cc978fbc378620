"""The deployment file, the Dockerfile and the cluster manifests.

Every Kubernetes object in infra/k8s is checked against a schema, offline: the core kinds
(Deployment, Service, PersistentVolumeClaim, ConfigMap, StatefulSet...) against the
Kubernetes JSON schema of kubernetes-validate (strict: unknown fields are errors); the
RayCluster, ServiceMonitor and PodMonitor against the structural schemas below, written from
their CRDs for the fields these manifests use (unknown fields and wrong types are errors;
pod templates are checked against the Kubernetes PodTemplateSpec, which the RayCluster CRD
embeds). Then the contracts the code and the docs rely on: Ray custom resources per group,
/dev/shm under every object store, access modes of shared claims, the Prefect worker's
addresses, one image, the Dockerfile against the Makefile's install, and every path named.
"""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import re
import shlex
import socket
import tomllib
from copy import deepcopy
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from rzenembed.config import load_config

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "infra/k8s"
# The Kubernetes release whose schemas the core kinds are checked against.
KUBERNETES_VERSION = "1.33"
IMAGE = "ghcr.io/rzenembed/rzenembed"
PROJECT_DIR = "/opt/rzenembed"  # the image's project folder
RUN_AS = 1000  # the image's user, the pods' runAsUser and fsGroup
PULL_STEP = "prefect.deployments.steps.set_working_directory"


@cache
def parsed(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def docs(path: str) -> list[dict]:
    return deepcopy(parsed(path))


def manifests() -> list[tuple[str, dict]]:
    """(file, document) for every object of every manifest in infra/k8s."""
    return [
        (str(path.relative_to(ROOT)), doc)
        for path in sorted(K8S_DIR.glob("*.yaml"))
        for doc in docs(str(path.relative_to(ROOT)))
    ]


def objects(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == kind}


def raycluster() -> dict:
    (cluster,) = docs("infra/k8s/raycluster.yaml")
    return cluster


def ray_groups() -> dict[str, dict]:
    """The head ("head") and every worker group, by name."""
    spec = raycluster()["spec"]
    return {"head": spec["headGroupSpec"], **{g["groupName"]: g for g in spec["workerGroupSpecs"]}}


def pod_templates() -> dict[str, dict]:
    """Every pod spec of the manifests: "Kind/name" for workloads, "ray/<group>" for Ray."""
    pods = {f"ray/{name}": g["template"]["spec"] for name, g in ray_groups().items()}
    for _, doc in manifests():
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pods[f"{doc['kind']}/{doc['metadata']['name']}"] = doc["spec"]["template"]["spec"]
    return pods


def by_name(items: list[dict], key: str = "name") -> dict[str, dict]:
    return {item[key]: item for item in items}


def env_of(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def custom_resources(params: dict[str, str]) -> dict[str, int]:
    """A group's custom Ray resources, read as `ray start` gets them (KubeRay puts
    `--resources=<value>` in a bash command line) and as Ray's KubeRay autoscaler reads them
    (the value less its outer quotes and backslashes, integers only); both must agree."""
    value = params.get("resources")
    if value is None:
        return {}
    (arg,) = shlex.split(f"--resources={value}")
    from_shell = json.loads(arg.removeprefix("--resources="))
    from_autoscaler = json.loads(value[1:-1].replace("\\", ""))
    assert from_shell == from_autoscaler, value
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in from_shell.values())
    return from_shell


UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(text: str | int) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(text)).groups()
    return float(number) * UNITS.get(unit, 1)


def object_store_bytes(params: dict[str, str], memory_limit: float) -> float:
    """The object store `ray start` sizes: object-store-memory, else Ray 2.60's default
    (30% of the container's memory, at most 200 GB)."""
    if "object-store-memory" in params:
        return float(params["object-store-memory"])
    return min(0.3 * memory_limit, 200e9)


# --------------------------------------------------------------------------- schemas

DEFINITIONS = "https://kubernetes.io/api/_definitions.json"  # the $id of kubernetes-validate's


@cache
def registry() -> Registry:
    """kubernetes-validate's strict Kubernetes definitions, for $ref from the schemas below."""
    folder = f"v{KUBERNETES_VERSION}.0-local-strict"
    path = importlib.resources.files("kubernetes_validate").joinpath(
        "kubernetes-json-schema", folder, "_definitions.json"
    )
    return Registry().with_resource(
        DEFINITIONS, Resource.from_contents(json.loads(path.read_text()))
    )


def k8s(name: str) -> dict:
    return {"$ref": f"{DEFINITIONS}#/$defs/{name}"}


def obj(required: tuple[str, ...] = (), **properties: dict) -> dict:
    """A structural object: these properties only (an unknown field is an error)."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}  # fmt: skip


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def custom_resource(api_version: str, kind: str, spec: dict) -> dict:
    metadata = k8s("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
    return obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": api_version},
               kind={"const": kind}, metadata=metadata, spec=spec)  # fmt: skip


STRING = {"type": "string"}
BOOLEAN = {"type": "boolean"}
INT32 = {"type": "integer", "minimum": -(2**31), "maximum": 2**31 - 1}
STRING_MAP = {"type": "object", "additionalProperties": STRING}
LABEL_SELECTOR = k8s("io.k8s.apimachinery.pkg.apis.meta.v1.LabelSelector")

# KubeRay's ray.io/v1 RayCluster CRD (v1.7.0), the fields used here: rayStartParams is a map
# of strings (every value quoted), replicas are int32, groupName/minReplicas/maxReplicas/
# template are required in a worker group, the pod template is a core PodTemplateSpec.
RAY_GROUP = {"rayStartParams": STRING_MAP, "template": k8s("io.k8s.api.core.v1.PodTemplateSpec")}
RAYCLUSTER = custom_resource("ray.io/v1", "RayCluster", obj(
    ("headGroupSpec",),
    rayVersion=STRING,
    enableInTreeAutoscaling=BOOLEAN,
    autoscalerOptions=obj(
        upscalingMode={"type": "string", "enum": ["Default", "Aggressive", "Conservative"]},
        idleTimeoutSeconds=INT32,
    ),
    headGroupSpec=obj(("template",), **RAY_GROUP),
    workerGroupSpecs=array(obj(
        ("groupName", "minReplicas", "maxReplicas", "template"),
        groupName=STRING, replicas=INT32, minReplicas=INT32, maxReplicas=INT32, **RAY_GROUP,
    )),
))  # fmt: skip

# The Prometheus Operator's monitoring.coreos.com/v1 CRDs, the fields used here.
DURATION = {"type": "string",
            "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                       r"(([0-9]+)s)?(([0-9]+)ms)?)$"}  # fmt: skip
SERVICE_MONITOR = custom_resource("monitoring.coreos.com/v1", "ServiceMonitor", obj(
    ("selector", "endpoints"),
    selector=LABEL_SELECTOR,
    endpoints=array(obj(
        port=STRING, path=STRING, interval=DURATION,
        authorization=obj(type=STRING, credentials=obj(("key",), name=STRING, key=STRING)),
    )),
))  # fmt: skip
POD_MONITOR = custom_resource("monitoring.coreos.com/v1", "PodMonitor", obj(
    ("selector",),
    selector=LABEL_SELECTOR,
    podMetricsEndpoints=array(obj(port=STRING, path=STRING, interval=DURATION)),
))  # fmt: skip

CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayCluster"): RAYCLUSTER,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
}


def where(path) -> str:
    return ".".join(str(part) for part in path) or "<root>"


def validation_errors(doc: dict) -> list[str]:
    """Every schema error of one manifest object as 'path: message' (the path dotted from
    the object's root); kubernetes-validate reports the first error of a core kind."""
    schema = CUSTOM_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schema is not None:
        validator = jsonschema.Draft202012Validator(schema, registry=registry())
        return sorted(f"{where(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc))
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{where(error.path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


@pytest.fixture
def offline(monkeypatch):
    """Any network connection fails: the validation reads schemas from the installed package."""

    def refuse(*args, **kwargs):
        raise AssertionError("the manifest validation tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    "source, doc",
    [pytest.param(f, d, id=f"{Path(f).name}:{d['kind']}/{d['metadata']['name']}")
     for f, d in manifests()],
)  # fmt: skip
def test_every_manifest_object_is_valid_against_its_schema(source, doc, offline):
    assert validation_errors(doc) == [], source


def test_the_manifests_use_these_kinds():
    kinds = {(d["apiVersion"], d["kind"]) for _, d in manifests()}
    assert set(CUSTOM_SCHEMAS) <= kinds  # every structural schema is exercised
    assert {("v1", "PersistentVolumeClaim"), ("apps/v1", "Deployment"), ("v1", "Service"),
            ("v1", "ConfigMap"), ("apps/v1", "StatefulSet")} <= kinds  # fmt: skip


def dig(doc: dict, path: str):
    node = doc
    for part in path.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


UNEXPECTED = "Additional properties are not allowed ('{}' was unexpected)"
WORKER = "prefect.yaml:Deployment/prefect-worker"
CLUSTER = "raycluster.yaml:RayCluster/rzenembed"
HEAD_POD = "spec.headGroupSpec.template.spec"
# (the object, where the error is planted: the field's path; the value, or None to delete
#  the field; what the report must say: the path of the object that holds the error, and
#  the start of the message)
PLANTED = [
    (WORKER, "spec.replicas", "two", "spec.replicas", "'two' is not of type 'integer'"),
    (WORKER, "spec.template.spec.containers.0.imagePullPolicyy", "Always",
     "spec.template.spec.containers.0", UNEXPECTED.format("imagePullPolicyy")),
    ("volumes.yaml:PersistentVolumeClaim/rzenembed-models", "spec.accessModes", "ReadOnlyMany",
     "spec.accessModes", "'ReadOnlyMany' is not of type 'array'"),
    ("mlflow.yaml:StatefulSet/rzenembed-postgres", "spec.template.spec.volumes.0.configMap.mode",
     365, "spec.template.spec.volumes.0.configMap", UNEXPECTED.format("mode")),
    (CLUSTER, "spec.workerGroupSpecs.0.replicas", "2", "spec.workerGroupSpecs.0.replicas",
     "'2' is not of type 'integer'"),
    (CLUSTER, "spec.workerGroupSpecs.1.minReplica", 1, "spec.workerGroupSpecs.1",
     UNEXPECTED.format("minReplica")),
    (CLUSTER, "spec.workerGroupSpecs.0.maxReplicas", None, "spec.workerGroupSpecs.0",
     "'maxReplicas' is a required property"),
    (CLUSTER, "spec.workerGroupSpecs.0.rayStartParams.num-gpus", 8,
     "spec.workerGroupSpecs.0.rayStartParams.num-gpus", "8 is not of type 'string'"),
    (CLUSTER, f"{HEAD_POD}.containers.0.volumeMount", [], f"{HEAD_POD}.containers.0",
     UNEXPECTED.format("volumeMount")),
    (CLUSTER, "spec.workerGroupSpecs.1.template.spec.volumes.0.emptyDir.medum", "Memory",
     "spec.workerGroupSpecs.1.template.spec.volumes.0.emptyDir", UNEXPECTED.format("medum")),
    (CLUSTER, "spec.autoscalerOptions.upscalingMode", "Fast",
     "spec.autoscalerOptions.upscalingMode", "'Fast' is not one of"),
    (CLUSTER, "spec.headGroupSpecs", {}, "spec", UNEXPECTED.format("headGroupSpecs")),
    ("serve.yaml:ServiceMonitor/rzenembed-embeddings", "spec.endpoints.0.interval", "30 seconds",
     "spec.endpoints.0.interval", "'30 seconds' does not match"),
    ("serve.yaml:ServiceMonitor/rzenembed-embeddings", "spec.endpoints.0.bearerToken", "x",
     "spec.endpoints.0", UNEXPECTED.format("bearerToken")),
    ("serve.yaml:PodMonitor/rzenembed-ray", "spec.podMetricsEndpoints.0.port", 8080,
     "spec.podMetricsEndpoints.0.port", "8080 is not of type 'string'"),
]  # fmt: skip


@pytest.mark.parametrize("name, path, value, reported_at, message", PLANTED,
                         ids=[f"{n.split(':')[1]}:{p}" for n, p, *_ in PLANTED])  # fmt: skip
def test_a_planted_error_is_reported_with_its_field(name, path, value, reported_at, message,
                                                    offline):  # fmt: skip
    (doc,) = [d for f, d in manifests()
              if f"{Path(f).name}:{d['kind']}/{d['metadata']['name']}" == name]  # fmt: skip
    assert validation_errors(doc) == []
    planted = deepcopy(doc)
    parent_path, _, field = path.rpartition(".")
    parent = dig(planted, parent_path)
    key = int(field) if isinstance(parent, list) else field
    if value is None:
        del parent[key]
    else:
        parent[key] = value
    errors = validation_errors(planted)
    assert any(e.startswith(f"{reported_at}: {message}") for e in errors), errors


# --------------------------------------------------------------------------- prefect.yaml


def prefect_deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return by_name(spec["deployments"])


def test_prefect_yaml_deployments():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"local", "cluster", "scheduled-retraining", "cluster-retraining"}
    assert by_name["local"]["entrypoint"] == "flows/pipeline.py:full_pipeline"
    assert by_name["local"]["work_pool"]["name"] == "local-process"
    assert by_name["cluster"]["parameters"]["config_path"] == "configs/qwen2vl-2b.yaml"
    retrain = by_name["scheduled-retraining"]
    assert retrain["entrypoint"] == "flows/pipeline.py:retrain"
    assert retrain["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC", "active": True}]
    # The cluster's retraining: the same week, paused until resumed on the cluster (a local
    # `deploy --all` queues nothing for a pool nobody serves there).
    on_cluster = by_name["cluster-retraining"]
    assert on_cluster["entrypoint"] == "flows/pipeline.py:retrain"
    assert on_cluster["schedules"] == [{**retrain["schedules"][0], "active": False}]
    assert on_cluster["parameters"] == by_name["cluster"]["parameters"]
    assert on_cluster["work_pool"] == by_name["cluster"]["work_pool"]
    for deployment in spec["deployments"]:
        assert (ROOT / deployment["entrypoint"].split(":")[0]).is_file()
        load_config(ROOT / deployment["parameters"]["config_path"],
                    deployment["parameters"].get("overrides", []))  # fmt: skip


def test_cluster_deployments_enter_the_image_and_local_ones_the_repository():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    # A top-level pull would replace the default of the local deployments (the directory
    # `prefect deploy` ran in), which the local stack's worker shares.
    assert "pull" not in spec
    for name, deployment in prefect_deployments().items():
        if deployment["work_pool"]["name"] == "local-process":
            assert "pull" not in deployment, name
        else:
            assert deployment["pull"] == [{PULL_STEP: {"directory": PROJECT_DIR}}], name
    # The worker pod serves the cluster pool, from the project folder.
    worker = objects("Deployment")["prefect-worker"]["spec"]["template"]["spec"]["containers"][0]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    assert pool == prefect_deployments()["cluster"]["work_pool"]["name"]
    assert worker["workingDir"] == PROJECT_DIR


def test_the_cluster_deployment_reads_everything_from_s3():
    parameters = prefect_deployments()["cluster"]["parameters"]
    overrides = dict(o.split("=", 1) for o in parameters["overrides"])
    assert overrides["model.name_or_path"] == "s3://rzenembed-data/models/Qwen2-VL-2B-Instruct"
    cfg = load_config(ROOT / parameters["config_path"], parameters["overrides"])
    assert cfg.model.name_or_path.startswith("s3://")
    assert cfg.storage.root.startswith("s3://")


# --------------------------------------------------------------------------- RayCluster


def test_the_ray_cluster_fits_the_paper_configs():
    cluster = raycluster()
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-h100"]
    gpus = int(gpu["rayStartParams"]["num-gpus"]) * gpu["replicas"]
    cpus = int(gpu["rayStartParams"]["num-cpus"]) * gpu["replicas"]
    pipeline = custom_resources(gpu["rayStartParams"])["pipeline"] * gpu["minReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"]
    for name in ("qwen2vl-2b", "qwen2vl-7b"):
        compute = load_config(ROOT / f"configs/{name}.yaml").compute
        assert gpus >= compute.num_workers * compute.gpus_per_worker
        assert cpus >= compute.num_workers * compute.cpus_per_worker
        # Each training worker and evaluation actor asks {"pipeline": 1}.
        assert pipeline >= max(compute.num_workers, compute.eval_actors)
    head_ports = {p["name"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["ports"]}  # fmt: skip
    assert {"gcs", "client", "dashboard"} <= head_ports
    # One staged copy of each model per GPU node, on a volume of a stated size.
    spec = gpu["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert env["RZENEMBED_CACHE"].startswith(mounts["staged"] + "/")
    claim = volumes["staged"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "300Gi"


def test_the_head_runs_job_drivers_only():
    params = ray_groups()["head"]["rayStartParams"]
    assert params["num-cpus"] == "0" and params["num-gpus"] == "0"
    assert custom_resources(params) == {"driver": 16}
    # The job server listens on the pod network (the Prefect worker submits to it).
    assert params["dashboard-host"] == "0.0.0.0"
    head = ray_groups()["head"]["template"]["spec"]["containers"][0]
    assert by_name(head["ports"])["dashboard"]["containerPort"] == 8265


def test_each_kind_of_work_has_its_group_and_resource():
    groups = ray_groups()
    assert set(groups) == {"head", "gpu-h100", "gpu-serve", "cpu-prep"}
    declared = {name: custom_resources(g["rayStartParams"]) for name, g in groups.items()}
    assert declared == {
        "head": {"driver": 16},
        "gpu-h100": {"pipeline": int(groups["gpu-h100"]["rayStartParams"]["num-gpus"])},
        "gpu-serve": {"serving": 2},
        "cpu-prep": {},
    }
    serve = groups["gpu-serve"]
    assert serve["rayStartParams"]["num-gpus"] == "1"
    assert (serve["minReplicas"], serve["maxReplicas"]) == (1, 4)
    limits = serve["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and 2 <= int(serve["rayStartParams"]["num-cpus"]) <= 16
    prep = groups["cpu-prep"]
    assert "num-gpus" not in prep["rayStartParams"]
    assert "nvidia.com/gpu" not in prep["template"]["spec"]["containers"][0]["resources"]["limits"]
    # KubeRay's container resources and Ray's logical ones agree on every group but the
    # head (no task slots) and gpu-serve (slots for its model replica only; its other cores
    # decode requests for the HTTP fronts).
    for name, group in groups.items():
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"], name
        slots = int(group["rayStartParams"]["num-cpus"])
        if name == "gpu-serve":
            assert 0 < slots < int(resources["limits"]["cpu"])
        elif name != "head":
            assert resources["limits"]["cpu"] == str(slots), name


def test_every_ray_group_keeps_its_object_store_in_shared_memory():
    for name, group in ray_groups().items():
        spec = group["template"]["spec"]
        container = spec["containers"][0]
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        empty_dir = by_name(spec["volumes"])[shm["name"]]["emptyDir"]
        assert empty_dir["medium"] == "Memory", name
        size = quantity(empty_dir["sizeLimit"])
        memory = quantity(container["resources"]["limits"]["memory"])
        # `ray start` puts the store in /dev/shm only when it fits there.
        assert object_store_bytes(group["rayStartParams"], memory) <= size < memory, name


def test_serving_and_training_pods_never_share_a_node():
    groups = ray_groups()
    for name, other in (("gpu-h100", "gpu-serve"), ("gpu-serve", "gpu-h100")):
        terms = groups[name]["template"]["spec"]["affinity"]["podAntiAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]  # fmt: skip
        assert {"labelSelector": {"matchLabels": {"ray.io/cluster": "rzenembed",
                                                  "ray.io/group": other}},
                "topologyKey": "kubernetes.io/hostname"} in terms  # fmt: skip


def test_replica_ranges_and_the_autoscaler():
    spec = raycluster()["spec"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    # Groups that grow need the autoscaler; the training nodes stay between runs.
    assert spec["enableInTreeAutoscaling"] is True
    gpu = ray_groups()["gpu-h100"]
    assert gpu["minReplicas"] == gpu["replicas"]


def test_the_ray_version_is_the_pinned_one():
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)", (ROOT / "requirements.txt")
                           .read_text(), re.MULTILINE))  # fmt: skip
    assert raycluster()["spec"]["rayVersion"] == pins["ray[serve,train]"]


# --------------------------------------------------------------------------- volumes


def test_shared_claims_have_the_access_modes_of_their_readers_and_writers():
    claims = objects("PersistentVolumeClaim")
    for name, claim in claims.items():
        modes = claim["spec"]["accessModes"]
        assert modes and set(modes) <= {"ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                                        "ReadWriteOncePod"}, name  # fmt: skip
        assert quantity(claim["spec"]["resources"]["requests"]["storage"]) > 0, name
    assert claims["rzenembed-models"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claims["rzenembed-eval"]["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert claims["rzenembed-prefect-results"]["spec"]["accessModes"] == ["ReadWriteMany"]
    users: dict[str, set[str]] = {}
    groups = ray_groups()
    for pod, spec in pod_templates().items():
        volumes = by_name(spec.get("volumes", []))
        mounts = {m["name"]: m for c in spec["containers"] for m in c.get("volumeMounts", [])}
        for volume in volumes.values():
            if "persistentVolumeClaim" not in volume:
                continue
            source = volume["persistentVolumeClaim"]
            assert source["claimName"] in claims, f"{pod}: no claim {source['claimName']}"
            users.setdefault(source["claimName"], set()).add(pod)
            if pod.startswith("ray/") and groups[pod[4:]].get("maxReplicas", 1) > 1:
                users[source["claimName"]].add(pod + "#2")  # pods on several nodes
            if claims[source["claimName"]]["spec"]["accessModes"] == ["ReadOnlyMany"]:
                assert source.get("readOnly") is True, pod
                assert mounts[volume["name"]].get("readOnly") is True, pod
    for name, pods in users.items():
        if len(pods) > 1:
            assert "ReadWriteOnce" not in claims[name]["spec"]["accessModes"], (name, pods)
    text = (K8S_DIR / "volumes.yaml").read_text()
    assert all(word in text for word in ("NFS", "EFS", "Filestore")), "storage classes named"


# --------------------------------------------------------------------------- the worker


def test_the_worker_reaches_ray_mlflow_and_prefect():
    deployments = objects("Deployment")
    worker = deployments["prefect-worker"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(worker)
    head_service = f"{raycluster()['metadata']['name']}-head-svc"  # KubeRay's name
    head = ray_groups()["head"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert head_service == "rzenembed-head-svc"
    # Long steps: Ray Jobs on the head's job server; short calls: Ray Client.
    assert env["RZENEMBED_JOB_ADDRESS"] == f"http://{head_service}:{ports['dashboard']}"
    assert env["RAY_ADDRESS"] == f"ray://{head_service}:{ports['client']}"
    assert env["RAY_ADDRESS"] == "ray://rzenembed-head-svc:10001"  # Ray Client on the head
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "cluster-process" in worker["command"]
    assert worker["envFrom"] == [
        {"secretRef": {"name": "rzenembed-s3"}},
        {"secretRef": {"name": "rzenembed-ray-auth"}},
    ]


def test_mlflow_uses_postgres_and_s3_artifacts():
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs("infra/k8s/mlflow.yaml")}
    server = by_kind[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    args = server["args"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    secret = server["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "rzenembed-mlflow-db", "key": "url"}
    assert ("StatefulSet", "rzenembed-postgres") in by_kind
    # The postgres image creates one database; the init script creates MLflow's and Prefect's.
    postgres = by_kind[("StatefulSet", "rzenembed-postgres")]["spec"]["template"]["spec"]
    wanted = env_of(postgres["containers"][0])["POSTGRES_MULTIPLE_DATABASES"]
    assert set(wanted.split(",")) == {"mlflow", "prefect"}
    mounts = {m["mountPath"]: m["name"] for m in postgres["containers"][0]["volumeMounts"]}
    init = by_name(postgres["volumes"])[mounts["/docker-entrypoint-initdb.d"]]["configMap"]
    script = by_kind[("ConfigMap", init["name"])]["data"]
    assert init["defaultMode"] & 0o111 and "POSTGRES_MULTIPLE_DATABASES" in "".join(script.values())


def test_the_cluster_launcher_config():
    (spec,) = docs("infra/ray/cluster.yaml")
    types = spec["available_node_types"]
    assert spec["head_node_type"] == "head" and types["gpu_h100"]["resources"]["GPU"] == 8
    compute = load_config(ROOT / "configs/qwen2vl-7b.yaml").compute
    assert types["gpu_h100"]["max_workers"] * 8 >= compute.num_workers
    # The same Ray resources and node counts as the KubeRay groups.
    for group_name, group in ray_groups().items():
        node_type = types[group_name.replace("-", "_")]
        params = group["rayStartParams"]
        resources = {"CPU": int(params["num-cpus"]), "GPU": int(params.get("num-gpus", 0)),
                     **custom_resources(params)}  # fmt: skip
        assert node_type["resources"] == {k: v for k, v in resources.items()
                                          if v or k == "CPU"}, group_name  # fmt: skip
        if group_name != "head":
            assert node_type["min_workers"] == group["minReplicas"], group_name
            assert node_type["max_workers"] == group["maxReplicas"], group_name
    assert sum(t.get("max_workers", 0) for t in types.values()) <= spec["max_workers"]


def test_the_endpoint_follower_and_its_service():
    kinds = {d["kind"]: d for d in docs("infra/k8s/serve.yaml")}
    follower = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in follower["env"]}
    assert env["RAY_ADDRESS"] == "ray://rzenembed-head-svc:10001"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert follower["command"][:2] == ["rzenembed", "serve"]
    assert follower["workingDir"] == PROJECT_DIR
    config = follower["command"][follower["command"].index("--config") + 1]
    serve = load_config(ROOT / config).serve
    assert serve.host == "0.0.0.0" and serve.num_gpus == 1 and serve.autoscaling is not None
    # Open to the namespace: keys on, their hashes from the mounted secret.
    mounts = {m["name"]: m["mountPath"] for m in follower["volumeMounts"]}
    volumes = {v["name"]: v for v in kinds["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    assert serve.auth == "keys" and serve.api_keys_file.startswith(mounts["api-keys"] + "/")
    assert volumes["api-keys"]["secret"]["secretName"] == "rzenembed-api-keys"
    # Scraped: the endpoint's /metrics (with a key) and Ray's metrics port on every Ray pod.
    monitor = kinds["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == kinds["Service"]["metadata"]["labels"]
    assert monitor["endpoints"][0]["path"] == "/metrics"
    authorization = monitor["endpoints"][0]["authorization"]
    assert authorization["type"] == "Bearer"
    assert authorization["credentials"]["name"] == "rzenembed-metrics-key"
    cluster = raycluster()
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {
            p["name"]: p["containerPort"]
            for p in group["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports["metrics"] == 8080
    assert kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    service = kinds["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == serve.port == head_ports["serve"]
    assert service["selector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # The endpoint (model replicas and HTTP fronts, with what the config asks) fits the
    # gpu-serve group at its smallest and at its largest, one model replica per pod, and
    # leaves no CPU slot on a serving pod for a data-prep task.
    from rzenembed.compute.admission import pack

    group = ray_groups()["gpu-serve"]
    params = group["rayStartParams"]
    pod = {
        "GPU": float(params["num-gpus"]),
        "CPU": float(params["num-cpus"]),
        **custom_resources(params),
    }
    model = {"GPU": serve.num_gpus, "CPU": serve.num_cpus, **serve.resources}
    front = {"CPU": serve.api_num_cpus, **serve.api_resources}
    for replicas, pods in (
        (serve.autoscaling.min_replicas, group["minReplicas"]),
        (serve.autoscaling.max_replicas, group["maxReplicas"]),
    ):
        assert pack([model] * replicas + [front] * serve.api_replicas, [pod] * pods)
    assert pack([model, model], [pod]) is None  # one model replica per pod
    assert pod["CPU"] == serve.num_cpus


# --------------------------------------------------------------------------- image


def containers_of(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_manifest_runs_one_and_the_same_image():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for spec in pod_templates().values() for c in containers_of(spec)}
    ours = {image for image in images if image.startswith(IMAGE + ":")}
    assert ours == {f"{IMAGE}:{version}"}
    assert images - ours == {"postgres:16"}
    # The Dockerfile's build command names the same image.
    assert f"docker build -t {IMAGE}:{version} ." in (ROOT / "Dockerfile").read_text()
    # Pods of the image run as its user.
    for pod, spec in pod_templates().items():
        if any(c["image"].startswith(IMAGE + ":") for c in containers_of(spec)):
            context = spec["securityContext"]
            assert context["runAsUser"] == context["fsGroup"] == RUN_AS, pod
            assert context["runAsNonRoot"] is True, pod


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each Dockerfile instruction, continuations joined."""
    instructions, current = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        instruction, _, arguments = (current + line).partition(" ")
        instructions.append((instruction.upper(), " ".join(arguments.split())))
        current = ""
    assert not current, "a continuation runs off the end"
    return instructions


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str) -> bool:
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
               or fnmatch.fnmatch(Path(prefix).name, pattern.removeprefix("**/"))
               for pattern in dockerignore() for prefix in prefixes)  # fmt: skip


def test_the_dockerfile_copies_files_that_exist_and_are_in_the_context():
    copies = [args.split() for instruction, args in dockerfile() if instruction in ("COPY", "ADD")]
    assert copies
    copied = set()
    for args in copies:
        assert not any(a.startswith("--from") for a in args)
        *sources, _destination = [a for a in args if not a.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not ignored(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"
            copied.add(source.rstrip("/"))
    # What the editable install and the deployments need.
    assert {"requirements.txt", "constraints.txt", "pyproject.toml", "README.md", "prefect.yaml",
            "rzenembed", "tasks", "flows", "configs"} <= copied  # fmt: skip
    # The install finds no stray build output or environment in the context.
    for path in (".venv", ".git", "runs", "rzenembed.egg-info", "rzenembed/__pycache__"):
        assert ignored(path), path


def test_the_dockerfile_installs_as_the_makefile_does():
    makefile = (ROOT / "Makefile").read_text()
    make_installs = [" ".join(a for a in args.split() if a != "--quiet")
                     for args in re.findall(r"\$\(BIN\)/pip install (.+)", makefile)]  # fmt: skip
    runs = " && ".join(args for instruction, args in dockerfile() if instruction == "RUN")
    image_installs = re.findall(r"python -m pip install (.+?)(?= &&|$)", runs)
    assert make_installs == image_installs
    assert "-r requirements.txt -c constraints.txt" in image_installs
    # Into the image's Python (console scripts in /usr/local/bin, on PATH in login shells too).
    (base,) = [args for instruction, args in dockerfile() if instruction == "FROM"]
    assert re.fullmatch(r"python:3\.11[.\w-]*", base)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11"
    assert "venv" not in runs and "ray --version" in runs
    assert re.search(r"apt-get install [^&]*\bbash\b", runs)
    # The Makefile's environment (PREFECT_HOME is the local stack's folder, not the image's).
    exported = dict(re.findall(r"^export (\w+) := (.*)$", makefile, re.MULTILINE))
    env = dict(pair.split("=", 1) for instruction, args in dockerfile() if instruction == "ENV"
               for pair in args.split())  # fmt: skip
    assert {k: v for k, v in exported.items() if k != "PREFECT_HOME"}.items() <= env.items()


def test_the_dockerfile_workdir_and_user_match_the_manifests():
    workdirs = [args for instruction, args in dockerfile() if instruction == "WORKDIR"]
    assert workdirs == [PROJECT_DIR]
    (user,) = [args for instruction, args in dockerfile() if instruction == "USER"]
    assert user == f"{RUN_AS}:{RUN_AS}"
    pulls = [d["pull"][0][PULL_STEP]["directory"] for d in prefect_deployments().values()
             if "pull" in d]  # fmt: skip
    assert pulls and set(pulls) == {PROJECT_DIR}


# --------------------------------------------------------------------------- paths named

# A repository path in a comment or a value: it starts with one of these folders (relative
# to the repository root or to the naming file's folder), or is a file name with one of these
# extensions.
PATH = re.compile(r"(?<![\w./:@-])((?:infra|configs|docs|flows|tasks|rzenembed|tests|"
                  r"benchmarks|k8s|ray|local)/[\w./-]*\w"
                  r"|[\w-]+\.(?:yaml|md|py|txt|toml))(?![\w/])")  # fmt: skip
NAMING_FILES = ["prefect.yaml", "Dockerfile", "infra/README.md", "infra/ray/cluster.yaml",
                *(str(p.relative_to(ROOT)) for p in sorted(K8S_DIR.glob("*.yaml")))]  # fmt: skip


def named_paths(file: str) -> set[str]:
    return set(PATH.findall((ROOT / file).read_text()))


@pytest.mark.parametrize("file", NAMING_FILES)
def test_every_path_named_exists(file):
    folder = (ROOT / file).parent
    missing = [p for p in sorted(named_paths(file))
               if not ((ROOT / p).exists() or (folder / p).exists())]  # fmt: skip
    assert missing == []


def test_the_path_scan_sees_the_paths():
    assert {"infra/k8s/prefect.yaml", "infra/local/up", "configs/tiny.yaml"} <= named_paths(
        "prefect.yaml"
    )
    assert {"k8s/raycluster.yaml", "k8s/volumes.yaml", "ray/cluster.yaml",
            "docs/operations.md"} <= named_paths("infra/README.md")  # fmt: skip
    assert "prefect-worker.yaml" not in " ".join(named_paths("prefect.yaml"))


CLUSTER_CONFIGS = (
    "qwen2vl-2b",
    "qwen2vl-7b",
    "qwen25vl-3b",
    "qwen3vl-2b",
    "qwen3vl-8b",
    "paper-data",
)


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_every_path_a_cluster_config_names_is_on_the_bucket(name):
    """A step's driver, coordinator or worker may run on any node of its kind; a local path
    would be found on some nodes and not others (cpu-prep mounts nothing). So every path a
    cluster config names (storage root, base and captioner models, sources, evaluation and
    validation sets) is an s3:// location, and work is placed by resource."""
    from rzenembed.config import resolve_paths
    from rzenembed.prep.decontaminate import decontamination_sets

    cfg = resolve_paths(load_config(ROOT / f"configs/{name}.yaml"), None)
    paths = {
        "storage.root": cfg.storage.root,
        "model.name_or_path": cfg.model.name_or_path,
        **{f"eval.sets[{i}]": s for i, s in enumerate(cfg.eval.sets)},
        **{f"soup.validation_sets[{i}]": s for i, s in enumerate(cfg.soup.validation_sets)},
        **{f"sources.{s.name}": s.uri for s in cfg.sources},
        **{f"decontamination[{i}]": s for i, s in enumerate(decontamination_sets(cfg))},
    }
    if cfg.prep.recaption.model:
        paths["prep.recaption.model"] = cfg.prep.recaption.model
    local = {k: v for k, v in paths.items() if not str(v).startswith("s3://")}
    assert not local, local
    assert cfg.compute.driver_resources == {"driver": 1.0}
    assert cfg.compute.step_resources == cfg.compute.resources_per_worker == {"pipeline": 1.0}
    assert cfg.compute.step_timeout_s is not None


def test_every_ray_pod_and_every_client_of_the_cluster_has_the_ray_token():
    """Ray's token authentication on every node and in every process that reaches the job
    server or Ray Client: without the token, nothing submitted runs."""
    containers = {}
    for name, group in ray_groups().items():
        containers[f"ray:{name}"] = group["template"]["spec"]["containers"][0]
    for kind_docs in (docs("infra/k8s/prefect.yaml"), docs("infra/k8s/serve.yaml")):
        for doc in kind_docs:
            if doc.get("kind") == "Deployment":
                for container in doc["spec"]["template"]["spec"]["containers"]:
                    env = {e["name"] for e in container.get("env", [])}
                    if env & {"RAY_ADDRESS", "RZENEMBED_JOB_ADDRESS"}:
                        containers[doc["metadata"]["name"]] = container
    assert {"prefect-worker", "rzenembed-serve"} <= set(containers), set(containers)
    for name, container in containers.items():
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", [])]
        assert "rzenembed-ray-auth" in secrets, name
