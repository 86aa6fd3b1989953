"""Starting and stopping a local Ray cluster with our Serve app: what `make run` and the tests share."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

import httpx

from mistral_ray import local_cluster
from mistral_ray.config import DeploymentFile
from mistral_ray.local_cluster import LocalCluster
from mistral_ray.options import node_env


@dataclass
class Running:
    """A served application on a Ray cluster this process started."""

    deployment: DeploymentFile
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    startup_s: float
    cluster: Optional[LocalCluster] = None  # with worker nodes: the head and workers this process runs
    gcs_address: str = ""  # where a driver joins this cluster (`mistral-ray deploy`)


_cluster: Optional[LocalCluster] = None
_started: list = []  # the processes this process's Ray start created (GCS, raylets, ...): what stop() sweeps
_gcs: Optional[tuple[str, int]] = None  # the head's GCS (host, port)
SWEEP_GRACE_S = 5  # after Ray's own shutdown, how long its processes get to exit before they are killed
SIGNAL_SETTLE_S = 0.5  # a signal sent to the whole process group reaches Ray's processes too: time to see it


class StartError(RuntimeError):
    """The app cannot start as configured (a port it needs is taken): one line for the user."""


def check_ports(dep: DeploymentFile, port: int) -> None:
    """Fail before Ray starts if a port the app will listen on is taken, naming it and its holder."""
    from mistral_ray import processes

    obs = dep.service.observability
    wanted = [(dep.http.host, port, "http_options.port")]
    if dep.service.router.haproxy:
        wanted.append((dep.http.host, obs.haproxy_metrics_port, "observability.haproxy_metrics_port"))
    wanted.append((dep.http.host, obs.metrics_export_port, "observability.metrics_export_port"))
    if dep.service.router.haproxy:  # HAProxy's stats page, on loopback (8404: Ray's default; not importing
        # Serve for it, which reads the cluster's environment once, before start() has set it)
        wanted.append(("127.0.0.1", int(os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", "8404")),
                       "RAY_SERVE_HAPROXY_STATS_PORT"))
    for host, number, field in wanted:
        try:
            busy = processes.taken(host, number)
        except OSError as exc:
            raise StartError(f"{host}:{number} ({field}) cannot be listened on: {exc.strerror}") from None
        if busy:
            who = processes.holder(host, number)
            raise StartError(f"{host}:{number} ({field}) is already in use{' by ' + who if who else ''}; "
                             "stop that process or choose another port")


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
    global _cluster, _gcs
    # Before Ray starts and before this process imports Serve: every Ray process reads these at import.
    os.environ.update(node_env(dep) if env is None else env)
    import ray
    from ray import serve

    import psutil

    t0 = time.monotonic()
    port = port or dep.http.port
    obs = dep.service.observability
    before = {p.pid for p in psutil.Process().children()}
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
    _started[:] = [p for p in psutil.Process().children() if p.pid not in before]
    host, _, gcs_port = ray.get_runtime_context().gcs_address.rpartition(":")
    _gcs = (host.strip("[]"), int(gcs_port))
    # Several nodes on one machine cannot all bind the HTTP port: one HAProxy, on the head, as in the
    # RayService's head-only ingress. One node: the file's choice.
    # The file's http_options as Serve reads them (timeouts, root path, ...), on the port asked for.
    serve.start(http_options={**(dep.raw.get("http_options") or {}), "host": dep.http.host, "port": port},
                proxy_location="HeadOnly" if workers else dep.raw.get("proxy_location", "EveryNode"))
    budget = ready_timeout_s or dep.service.scaling.start_timeout_s
    deploy(dep, budget)
    base = f"http://{dep.http.host}:{port}{dep.route_prefix.rstrip('/')}"
    wait_ready(base, max(30.0, budget - (time.monotonic() - t0)))
    return Running(dep, base, time.monotonic() - t0, _cluster, ray.get_runtime_context().gcs_address)


def deploy(dep: DeploymentFile, timeout_s: float = 600) -> None:
    """Deploy the file's application as `serve deploy` does: Serve builds it from `import_path` and `args` and
    applies the file's `deployments` overrides (the LLM deployment's `user_config`: its adapters). Deployed
    again with only a `user_config` changed, the replicas reconfigure in place; a change of `args` restarts
    them. The cluster's other applications deployed this way stay (a `serve deploy` file would list them all).
    Returns once Serve has applied it (not once it answers); raises StartError when Serve could not."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    client = _get_global_client()
    details = client.get_serve_details()
    # The other apps deployed from config, as deployed (not those being deleted, nor those `serve.run` put there)
    apps = [ServeApplicationSchema.model_validate(app["deployed_app_config"])
            for name, app in (details.get("applications") or {}).items()
            if name != dep.app_name and app.get("deployed_app_config") and app.get("source") == "declarative"
            and app.get("status") != "DELETING"]
    try:
        apps.append(ServeApplicationSchema.model_validate(application(dep)))
    except ValueError as exc:  # pydantic's ValidationError: a `deployments` entry Serve cannot read
        raise StartError(f"{dep.path}: Serve cannot read the application: {exc}") from None
    client.deploy_apps(ServeDeploySchema(applications=apps, target_capacity=details.get("target_capacity")))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(dep.app_name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise StartError(f"Serve could not deploy {dep.app_name!r}: {status.message}")
        if status is not None and status.status == "RUNNING" and _settled(status):
            return
        time.sleep(0.5)
    raise TimeoutError(f"application {dep.app_name!r} not running within {timeout_s:.0f}s")


def application(dep: DeploymentFile) -> dict:
    """The file's application as Serve's config schema reads it, with the args and the LLM deployment's
    user_config as validated (and as the caller may have changed them: the CLI's options, tests)."""
    from mistral_ray.config import APP_IMPORT_PATH, LLM_DEPLOYMENT

    app = dict(next(a for a in dep.raw["applications"] if a.get("import_path") == APP_IMPORT_PATH))
    deployments = [d for d in app.get("deployments") or [] if d.get("name") != LLM_DEPLOYMENT]
    llm = next((d for d in app.get("deployments") or [] if d.get("name") == LLM_DEPLOYMENT), {})
    deployments.append({**llm, "name": LLM_DEPLOYMENT, "user_config": dep.live.model_dump(mode="json")})
    return {**app, "name": dep.app_name, "route_prefix": dep.route_prefix,
            "args": dep.service.model_dump(mode="json"), "deployments": deployments}


def _settled(status) -> bool:
    """Every deployment of the app runs the version just deployed (an autoscaler may be changing its count)."""
    return all(d.status in ("HEALTHY", "UPSCALING", "DOWNSCALING") for d in status.deployments.values())


def stop(app: Optional[str] = None, again: Optional[Callable[[], bool]] = None) -> None:
    """Tear down Serve and the Ray cluster this process started, then make sure no process of it is left
    (HAProxy's reloaded workers and vLLM's EngineCore leave their parents' process groups).

    `app`: first delete that application the way Serve scales a replica down: HAProxy stops sending it
    requests, each replica finishes the ones it has (up to `scaling.drain_timeout_s`), then its engine
    shuts down; an idle app is gone in about `router.deregister_s`. A KeyboardInterrupt (Ctrl-C again)
    ends the wait, and Serve's graceful shutdown is skipped too: Ray goes at once. From there on signals
    are ignored until the teardown (bounded) is done: one arriving mid-way would leave processes behind.
    `again()` says whether that second signal came before this function took the signals (the caller kept it).
    """
    import ray
    from ray import serve

    from mistral_ray import processes

    global _cluster, _gcs
    started = processes.tree(_started)
    graceful = True
    lost = bool(app) and _gcs_gone()  # before the signals are taken: a second one meanwhile goes to `again`
    previous = _on_signals(signal.SIG_IGN) if app else {}
    if lost:
        # SIGTERM to the whole process group (`kill -TERM -<pgid>`, systemd's default, the bench): Ray's GCS
        # and raylets got it too and are stopping, so Serve cannot drain anything; every call to the GCS would
        # wait out its 60 s reconnect timeout, spinning a core (measured: 65 s to stop).
        print("mistral-ray: Ray's own processes were stopped too; nothing to drain", flush=True)
        app, graceful = None, False
    try:
        if app and ray.is_initialized():
            _on_signals(signal.default_int_handler)  # Ctrl-C (or SIGTERM) again: stop waiting
            try:
                if again is not None and again():  # it came before this handler: as if it came now
                    raise KeyboardInterrupt
                serve.delete(app, _blocking=True)
            except KeyboardInterrupt:
                graceful = False
                print("mistral-ray: stopping now", flush=True)
            finally:
                _on_signals(signal.SIG_IGN)
        # What the drain started meanwhile (HAProxy reloads) goes too.
        started += [p for p in processes.tree(_started) if p not in started]
        if lost:  # what is left of them goes now: Ray's shutdown would wait for each (11 s here)
            processes.sweep(started, 0)
        if ray.is_initialized():
            try:
                if graceful:
                    serve.shutdown()
            finally:
                ray.shutdown()
    finally:
        if _cluster is not None:
            _cluster.shutdown()
            _cluster = None
        killed = processes.sweep(started, SWEEP_GRACE_S)
        _started.clear()
        _gcs = None
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if killed:
            print(f"mistral-ray: killed {len(killed)} process(es) left after Ray's shutdown: {', '.join(killed)}",
                  flush=True)


def _gcs_gone() -> bool:
    """Whether the head's GCS has stopped serving (SIGNAL_SETTLE_S after the signal). A GCS that got SIGTERM
    closes its port at once but may take a minute to exit, so its port is asked, not its process."""
    import socket

    if not _gcs:
        return False
    time.sleep(SIGNAL_SETTLE_S)
    try:
        socket.create_connection(_gcs, timeout=1).close()
    except OSError:  # refused (or no answer): it is stopping
        return True
    return False


def _on_signals(handler) -> dict:
    """Handle SIGINT and SIGTERM with `handler` (only the main thread can); return the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
