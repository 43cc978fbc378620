"""The deployment file and the cluster manifests parse and carry what the docs rely on."""

from __future__ import annotations

from pathlib import Path

import yaml

from rzenembed.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def docs(path: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / path).read_text()) if d]


def test_prefect_yaml_deployments():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"local", "cluster", "scheduled-retraining"}
    assert by_name["local"]["entrypoint"] == "flows/pipeline.py:full_pipeline"
    assert by_name["local"]["work_pool"]["name"] == "local-process"
    assert by_name["cluster"]["parameters"]["config_path"] == "configs/qwen2vl-2b.yaml"
    retrain = by_name["scheduled-retraining"]
    assert retrain["entrypoint"] == "flows/pipeline.py:retrain"
    assert retrain["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC", "active": True}]
    for deployment in spec["deployments"]:
        load_config(ROOT / deployment["parameters"]["config_path"],
                    deployment["parameters"].get("overrides", []))  # fmt: skip


def test_the_ray_cluster_fits_the_paper_configs():
    (cluster,) = docs("infra/k8s/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpu = groups["gpu-h100"]
    gpus = int(gpu["rayStartParams"]["num-gpus"]) * gpu["replicas"]
    cpus = int(gpu["rayStartParams"]["num-cpus"]) * gpu["replicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"]
    for name in ("qwen2vl-2b", "qwen2vl-7b"):
        compute = load_config(ROOT / f"configs/{name}.yaml").compute
        assert gpus >= compute.num_workers * compute.gpus_per_worker
        assert cpus >= compute.num_workers * compute.cpus_per_worker
    head_ports = {p["name"] for p in cluster["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["ports"]}  # fmt: skip
    assert {"gcs", "client"} <= head_ports
    # One staged copy of each model per GPU node, on a volume of a stated size.
    spec = gpu["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert env["RZENEMBED_CACHE"].startswith(mounts["staged"] + "/")
    claim = volumes["staged"]["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert claim["resources"]["requests"]["storage"] == "300Gi"


def test_the_worker_reaches_ray_mlflow_and_prefect():
    deployments = {d["metadata"]["name"]: d for d in docs("infra/k8s/prefect.yaml")
                   if d["kind"] == "Deployment"}  # fmt: skip
    worker = deployments["prefect-worker"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["RAY_ADDRESS"] == "ray://rzenembed-head-svc:10001"  # Ray Client on the head
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert "cluster-process" in worker["command"]
    assert worker["envFrom"] == [{"secretRef": {"name": "rzenembed-s3"}}]


def test_mlflow_uses_postgres_and_s3_artifacts():
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs("infra/k8s/mlflow.yaml")}
    server = by_kind[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    args = server["args"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    assert any(a.startswith("--artifacts-destination=s3://") for a in args)
    secret = server["env"][0]["valueFrom"]["secretKeyRef"]
    assert secret == {"name": "rzenembed-mlflow-db", "key": "url"}
    assert ("StatefulSet", "rzenembed-postgres") in by_kind


def test_the_cluster_launcher_config():
    (spec,) = docs("infra/ray/cluster.yaml")
    types = spec["available_node_types"]
    assert spec["head_node_type"] == "head" and types["gpu_h100"]["resources"]["GPU"] == 8
    compute = load_config(ROOT / "configs/qwen2vl-7b.yaml").compute
    assert types["gpu_h100"]["max_workers"] * 8 >= compute.num_workers


def test_the_endpoint_follower_and_its_service():
    kinds = {d["kind"]: d for d in docs("infra/k8s/serve.yaml")}
    follower = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in follower["env"]}
    assert env["RAY_ADDRESS"] == "ray://rzenembed-head-svc:10001"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert follower["command"][:2] == ["rzenembed", "serve"]
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
    assert monitor["endpoints"][0]["bearerTokenSecret"]["name"] == "rzenembed-metrics-key"
    (cluster,) = docs("infra/k8s/raycluster.yaml")
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {
            p["name"]: p["containerPort"]
            for p in group["template"]["spec"]["containers"][0]["ports"]
        }
        assert ports["metrics"] == 8080
    assert kinds["PodMonitor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (cluster,) = docs("infra/k8s/raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    service = kinds["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == serve.port == head_ports["serve"]
    assert service["selector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    gpu = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}["gpu-h100"]
    total = int(gpu["rayStartParams"]["num-gpus"]) * gpu["replicas"]
    assert serve.autoscaling.max_replicas * serve.num_gpus <= total
