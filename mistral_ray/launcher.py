"""Starting and stopping a local Ray cluster with our Serve app: what `make run` and the tests share."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import httpx

from mistral_ray import local_cluster
from mistral_ray.config import DeploymentFile
from mistral_ray.local_cluster import LocalCluster
from mistral_ray.options import cluster_env


@dataclass
class Running:
    """A served application on a Ray cluster this process started."""

    deployment: DeploymentFile
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    startup_s: float
    cluster: Optional[LocalCluster] = None  # with worker nodes: the head and workers this process runs


_cluster: Optional[LocalCluster] = None


def wait_ready(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/ready", timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{base_url}/ready did not answer 200 within {timeout_s:.0f}s (last: {last})")


def start(dep: DeploymentFile, port: int | None = None, ready_timeout_s: Optional[float] = None,
          env: Optional[dict[str, str]] = None, workers: int = 0) -> Running:
    """Start Ray (local, owned by this process) with the data plane's environment, Serve and the app;
    return once it answers. `env`: the cluster environment to use instead of the config's (tests add
    per-machine ports). `workers` > 0: a head without replicas and that many worker nodes (RayService's
    shape); 0: one node that does everything."""
    global _cluster
    # Before Ray starts and before this process imports Serve: every Ray process reads these at import.
    os.environ.update(cluster_env(dep.service) if env is None else env)
    import ray
    from ray import serve

    from mistral_ray.app import build

    t0 = time.monotonic()
    port = port or dep.http.port
    obs = dep.service.observability
    if not ray.is_initialized() and workers:
        _cluster = local_cluster.start(obs, workers)
        ray.init(address=_cluster.address, namespace="mistral-ray", log_to_driver=False)
    elif not ray.is_initialized():
        ray.init(
            namespace="mistral-ray",
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=obs.metrics_export_port,
            _system_config={"metrics_report_interval_ms": obs.metrics_report_interval_ms},
        )
    # Several nodes on one machine cannot all bind the HTTP port: one HAProxy, on the head, as in the
    # RayService's head-only ingress. One node: the file's choice.
    serve.start(http_options={"host": dep.http.host, "port": port},
                proxy_location="HeadOnly" if workers else dep.raw.get("proxy_location", "EveryNode"))
    serve.run(build(dep.service), name=dep.app_name, route_prefix=dep.route_prefix, blocking=False)
    base = f"http://{dep.http.host}:{port}{dep.route_prefix.rstrip('/')}"
    wait_ready(base, ready_timeout_s or dep.service.scaling.start_timeout_s)
    return Running(dep, base, time.monotonic() - t0, _cluster)


def stop() -> None:
    """Tear down Serve and the Ray cluster this process started (no Ray processes are left behind)."""
    import ray
    from ray import serve

    global _cluster
    try:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        if _cluster is not None:
            _cluster.shutdown()
            _cluster = None
