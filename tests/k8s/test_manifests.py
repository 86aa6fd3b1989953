"""The kustomize overlays build, every object validates, and the cluster serves what deployments/ says."""

import math

import pytest
import yaml

from mistral_ray import k8s
from mistral_ray.config import PROJECT_ROOT, load_deployment, parse_service
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
    assert {"RayService", "Service", "PodDisruptionBudget", "PodMonitor", "PrometheusRule"} <= set(kinds)
    assert "Secret" not in kinds  # secrets are referenced, never shipped
    for obj in objs:
        validate(obj)


def test_overlay_file_is_generated_from_the_deployment_file(built):
    overlay, _ = built
    generated = k8s.serve_config_yaml(k8s.OVERLAYS[overlay])
    assert k8s.overlay_file(overlay).read_text() == generated, "run: mistral-ray k8s serve-config --write"


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
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert cluster["enableInTreeAutoscaling"] is True
    head_ports = {p["name"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {"serve", "metrics", "dashboard"} <= head_ports
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    container = worker["containers"][0]
    assert {"serve", "metrics"} <= {p["name"] for p in container["ports"]}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
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
    opts = parse_service(served["applications"][0]["args"]).llm_deployment_options()
    assert opts["autoscaling_config"]["max_replicas"] == 7
