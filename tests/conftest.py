import os
import shutil

import pytest

from mistral_ray.ports import free_port
from mistral_ray.config import PROJECT_ROOT, load_deployment, parse_service
from mistral_ray.options import node_env

# Tests that validate manifests against ../shared/k8s-schemas may skip on a user's checkout, never in CI.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
LOCAL_CPU = PROJECT_ROOT / "deployments" / "local-cpu.yaml"


def _session_deployment():
    """deployments/local-cpu.yaml with the replica count changed the way a user would (in its args), its
    metrics on free ports, pushed every second so the metrics tests need not wait long."""
    dep = load_deployment(LOCAL_CPU)
    args = dep.service.model_dump()
    args["scaling"].update(min_replicas=2, max_replicas=2)
    args["observability"].update(metrics_export_port=free_port(), haproxy_metrics_port=free_port(),
                                 metrics_report_interval_ms=1000)
    return dep.model_copy(update={"service": parse_service(args)})


SESSION_DEPLOYMENT = _session_deployment()
# The integration tier's Ray cluster, as `mistral-ray run` would set it up for the session app, plus: the
# body for the ingress router (one test app routes by prefix), and this machine's other HAProxy and fallback
# proxy ports free (a developer's `make run` may hold the defaults). Set here, before any test module
# imports Ray Serve: every process, this one included, reads it at import.
CLUSTER_ENV = {
    **node_env(SESSION_DEPLOYMENT),
    "RAY_SERVE_INGRESS_REQUEST_ROUTER_FORWARD_BODY": "1",
    "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
}
os.environ.update(CLUSTER_ENV)


def pytest_collection_modifyitems(config, items):
    if shutil.which("nvidia-smi"):
        return
    skip_gpu = pytest.mark.skip(reason="needs an NVIDIA GPU (none on this machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip_gpu)
