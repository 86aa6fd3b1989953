"""The kustomize overlays build, every object validates, and the cluster serves what deployments/ says."""

import json
import math

import pytest
import yaml

from mistral_ray import k8s
from mistral_ray.config import PROJECT_ROOT, load_deployment, parse_service
from mistral_ray.options import cluster_env, llm_deployment_options
from tests.k8s.schemas import kustomize, require_schemas, validate

OVERLAYS = PROJECT_ROOT / "k8s" / "overlays"


@pytest.fixture(scope="module", params=sorted(k8s.OVERLAYS))
def built(request):
    return request.param, kustomize(OVERLAYS / request.param)


def rayservice(objs):
    return next(o for o in objs if o["kind"] == "RayService")


def test_every_object_validates(built):
    require_schemas()
    _, objs = built
    kinds = sorted(o["kind"] for o in objs)
    expected = {"RayService", "Service", "PodDisruptionBudget", "NetworkPolicy", "PodMonitor", "PrometheusRule"}
    assert expected <= set(kinds)
    assert "Secret" not in kinds  # secrets are referenced, never shipped
    for obj in objs:
        validate(obj)


def test_overlay_files_are_generated_from_the_deployment_file(built):
    overlay, _ = built
    generated = k8s.serve_config_yaml(k8s.OVERLAYS[overlay])
    assert k8s.overlay_file(overlay).read_text() == generated, "run: mistral-ray k8s serve-config --write"
    env = k8s.data_plane_env(k8s.OVERLAYS[overlay])
    assert k8s.overlay_file(overlay, "data-plane.env").read_text() == env, "run: mistral-ray k8s serve-config --write"
    ports = k8s.ports_patch(k8s.OVERLAYS[overlay])
    assert k8s.overlay_file(overlay, "ports.yaml").read_text() == ports, "run: mistral-ray k8s serve-config --write"


def test_every_ray_pod_starts_with_the_data_plane_environment(built):
    overlay, objs = built
    config_map = next(o for o in objs if o["metadata"]["name"] == "mistral-ray-data-plane")
    local = load_deployment(PROJECT_ROOT / k8s.OVERLAYS[overlay]).service
    assert config_map["data"] == cluster_env(local, k8s.IMAGE_SCRIPTS)
    assert config_map["data"]["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/home/ray/anaconda3/bin/mistral-ray-haproxy"
    assert config_map["data"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    cluster = rayservice(objs)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert {"configMapRef": {"name": "mistral-ray-data-plane"}} in container["envFrom"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["haproxy-metrics"] == int(config_map["data"]["RAY_SERVE_HAPROXY_METRICS_PORT"])
        assert ports["haproxy-metrics"] == local.observability.haproxy_metrics_port
        assert ports["metrics"] == local.observability.metrics_export_port
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert group["rayStartParams"]["metrics-export-port"] == str(local.observability.metrics_export_port)


def test_the_metrics_ports_of_the_deployment_file_reach_the_pods(tmp_path):
    """Another port in the file: the generated patch moves Ray's exporter and the pods' named ports."""
    raw = yaml.safe_load((PROJECT_ROOT / k8s.OVERLAYS["cpu-dev"]).read_text())
    raw["applications"][0]["args"]["observability"] = {"metrics_export_port": 9180, "haproxy_metrics_port": 9191}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(raw))
    ops = [op for op in yaml.safe_load(k8s.ports_patch(str(changed))) if op["op"] == "replace"]
    assert [op["value"] for op in ops if op["path"].endswith("/metrics-export-port")] == ["9180", "9180"]
    assert sorted(op["value"] for op in ops if op["path"].endswith("/containerPort")) == [9180, 9180, 9191, 9191]


def test_serve_config_v2_is_the_deployment_file(built):
    overlay, objs = built
    served = yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])
    local = load_deployment(PROJECT_ROOT / k8s.OVERLAYS[overlay])
    # The one difference a cluster makes: API keys are required there.
    args = served["applications"][0]["args"]
    assert args["router"].pop("api_keys") == {"enabled": True}
    if not args["router"]:
        del args["router"]
    assert served["applications"] == local.raw["applications"]
    assert parse_service(served["applications"][0]["args"]) == local.service
    assert served["http_options"]["host"] == "0.0.0.0"


def test_worker_group_follows_the_replica_counts(built):
    overlay, objs = built
    scaling = load_deployment(PROJECT_ROOT / k8s.OVERLAYS[overlay]).service.scaling
    group = rayservice(objs)["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits.get("nvidia.com/gpu", 0))
    if gpus_per_pod:
        per_pod = gpus_per_pod // scaling.replica_gpus
        assert group["minReplicas"] == math.ceil(scaling.min_replicas / per_pod)
        assert group["maxReplicas"] == math.ceil(scaling.max_replicas / per_pod)
    else:
        cpus = float(limits["cpu"])
        assert group["maxReplicas"] >= math.ceil(scaling.max_replicas * scaling.replica_cpus / cpus)


def test_cluster_shape(built):
    overlay, objs = built
    cluster = rayservice(objs)["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    served = parse_service(yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert served.scaling.replica_cpus > 0 or served.scaling.replica_gpus > 0  # so replicas avoid the head
    assert cluster["enableInTreeAutoscaling"] is True
    head_ports = {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {"serve", "metrics", "dashboard"} <= head_ports
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    container = worker["containers"][0]
    assert {"serve", "metrics"} <= {p["name"] for p in container["ports"]}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": "serve"}  # HAProxy's own
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    served = parse_service(yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert served.router.api_keys.enabled and served.router.api_keys.file.startswith(mounts["api-keys"] + "/")
    secret_volume = next(v for v in worker["volumes"] if v["name"] == "api-keys")["secret"]
    assert secret_volume["secretName"] == "mistral-ray-api-keys" and not secret_volume.get("optional")
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "mistral-ray-hf-token"
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mistral-ray-model-cache"


def test_changing_max_replicas_changes_the_cluster(tmp_path):
    # One place: edit the deployment file, regenerate, and the RayService's Serve config follows.
    dep = load_deployment(PROJECT_ROOT / "deployments" / "mistral-7b-instruct-v0.1.yaml")
    raw = dep.raw
    raw["applications"][0]["args"]["scaling"]["max_replicas"] = 7
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump(raw))
    served = yaml.safe_load(yaml.safe_dump(k8s.serve_config(load_deployment(path))))
    assert served["applications"][0]["args"]["scaling"]["max_replicas"] == 7
    opts = llm_deployment_options(parse_service(served["applications"][0]["args"]))
    assert opts["autoscaling_config"]["max_replicas"] == 7


def test_the_network_policy_opens_only_what_is_needed(built):
    _, objs = built
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "mistral-ray"}
    rules = policy["spec"]["ingress"]
    open_to_all = [r for r in rules if "from" not in r]
    assert [[p["port"] for p in r["ports"]] for r in open_to_all] == [["serve"]]  # only the OpenAI port
    by_source = {json.dumps(r["from"], sort_keys=True): sorted(p["port"] for p in r.get("ports", [])) for r in rules
                 if "from" in r}
    own = json.dumps([{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mistral-ray"}}}], sort_keys=True)
    assert by_source.pop(own) == []  # the cluster's own pods: every port (Ray's internal ones)
    monitoring = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                            sort_keys=True)
    assert by_source.pop(monitoring) == ["haproxy-metrics", "metrics"]
    (operator, ports), = by_source.items()
    assert ports == ["dashboard"] and json.loads(operator) == [{
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}]
    assert all(source.get("namespaceSelector") != {} for r in rules for source in r.get("from", []))
    # every port named is a port of the pods it guards (a named port that matches nothing opens nothing)
    cluster = rayservice(objs)["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    named = {p["name"] for pod in pods for p in pod["spec"]["containers"][0]["ports"]}
    assert {p["port"] for r in rules for p in r.get("ports", [])} <= named
