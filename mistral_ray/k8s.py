"""From a deployment file to the RayService: its `serveConfigV2` and the data plane's environment of every
Ray pod (HAProxy, direct ingress), the one translation, so that local runs and clusters serve the same
application (a test fails if k8s/overlays/*/serve-config.yaml or data-plane.env drift)."""

from __future__ import annotations

import copy

import yaml

from mistral_ray.config import APP_IMPORT_PATH, PROJECT_ROOT, DeploymentFile, load_deployment
from mistral_ray.options import cluster_env

# Where the image (docker/Dockerfile, on rayproject/ray) installs console scripts: its Python's bin.
IMAGE_SCRIPTS = "/home/ray/anaconda3/bin"
# Which deployment file each overlay serves.
OVERLAYS = {
    "cpu-dev": "deployments/local-cpu.yaml",
    "gpu": "deployments/mistral-7b-instruct-v0.1.yaml",
}


def serve_config(dep: DeploymentFile) -> dict:
    """The deployment file as a cluster runs it: the same applications with API keys required; Serve
    listening on all of the pod's interfaces (KubeRay routes to the `serve` port), a proxy on every node."""
    raw = copy.deepcopy(dep.raw)
    for app in raw["applications"]:
        if app.get("import_path") == APP_IMPORT_PATH:
            # A cluster endpoint is never open: keys come from the mistral-ray-api-keys Secret, mounted
            # where router.api_keys.file points (the pod does not start without it).
            router = app.setdefault("args", {}).setdefault("router", {})
            router["api_keys"] = {**router.get("api_keys", {}), "enabled": True}
    raw["http_options"] = {**(raw.get("http_options") or {}), "host": "0.0.0.0", "port": 8000}
    raw["proxy_location"] = "EveryNode"
    return raw


def serve_config_yaml(deployment_file: str) -> str:
    dep = load_deployment(PROJECT_ROOT / deployment_file)
    header = (
        f"# Generated from {deployment_file} by `mistral-ray k8s serve-config {deployment_file}`.\n"
        "# Edit that file, not this one; a test fails if the two drift.\n"
    )
    return header + yaml.safe_dump(serve_config(dep), sort_keys=False)


def data_plane_env(deployment_file: str) -> str:
    """The Ray pods' environment (an env file for the overlay's `mistral-ray-data-plane` ConfigMap, which
    head and workers load with envFrom): every Ray process reads it at start."""
    env = cluster_env(load_deployment(PROJECT_ROOT / deployment_file).service, IMAGE_SCRIPTS)
    header = (f"# Generated from {deployment_file} by `mistral-ray k8s serve-config --write`; a test fails on "
              "drift.\n")
    return header + "".join(f"{key}={value}\n" for key, value in env.items())


# Where the base's RayService names the ports the observability section sets: each group's Ray start
# parameter and its container ports (by position in the base's lists, which tests/k8s checks by name).
_GROUPS = {"headGroupSpec": {"metrics": 4, "haproxy-metrics": 5},
           "workerGroupSpecs/0": {"metrics": 1, "haproxy-metrics": 2}}


def ports_patch(deployment_file: str) -> str:
    """A JSON patch of the RayService: the pods start Ray's exporter and open the container ports on the
    deployment file's `observability.metrics_export_port` / `haproxy_metrics_port` (the PodMonitors
    scrape the ports by name, so they follow)."""
    obs = load_deployment(PROJECT_ROOT / deployment_file).service.observability
    ports = {"metrics": obs.metrics_export_port, "haproxy-metrics": obs.haproxy_metrics_port}
    ops = []
    for group, index in _GROUPS.items():
        spec = f"/spec/rayClusterConfig/{group}"
        ops.append({"op": "replace", "path": f"{spec}/rayStartParams/metrics-export-port",
                    "value": str(obs.metrics_export_port)})
        for name, i in index.items():
            ops.append({"op": "test", "path": f"{spec}/template/spec/containers/0/ports/{i}/name", "value": name})
            ops.append({"op": "replace", "path": f"{spec}/template/spec/containers/0/ports/{i}/containerPort",
                        "value": ports[name]})
    header = (f"# Generated from {deployment_file} by `mistral-ray k8s serve-config --write`; a test fails on "
              "drift.\n")
    return header + yaml.safe_dump(ops, sort_keys=False)


def overlay_file(overlay: str, name: str = "serve-config.yaml"):
    return PROJECT_ROOT / "k8s" / "overlays" / overlay / name


def write_overlays() -> list:
    written = []
    for overlay, deployment_file in OVERLAYS.items():
        for name, text in (("serve-config.yaml", serve_config_yaml(deployment_file)),
                           ("data-plane.env", data_plane_env(deployment_file)),
                           ("ports.yaml", ports_patch(deployment_file))):
            path = overlay_file(overlay, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    return written
