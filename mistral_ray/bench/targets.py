"""Servers the benchmark starts and compares side by side, each in its own session (process group) on
loopback.

Specs: `ours:<policy>[:<replicas>]` (our stack from deployments/local-cpu.yaml with that routing policy, API
keys and metrics on), `vllm` (bare `vllm serve` with the same engine arguments), `ray-serve-llm[:<replicas>]`
(ray.serve.llm's `build_openai_app` on the same model), `ray-serve-llm:direct` (the same in its fastest mode:
direct streaming through HAProxy, one replica), `ray-serve-llm:prefix[:<replicas>]` (the same with its
`PrefixCacheAffinityRouter`), or `<label>=<url>` for a server that is already running. `engine` overrides
apply to every target the bench starts alike (e.g. a small KV cache for a KV-pressure run).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import json

import yaml

from mistral_ray.config import PROJECT_ROOT, ServiceConfig, load_deployment, parse_service
from mistral_ray.options import replica_env, vllm_args
from mistral_ray.ports import free_port
from mistral_ray.processes import die_with_parent

LOCAL_CPU = PROJECT_ROOT / "deployments" / "local-cpu.yaml"
BENCH_KEY = "sk-bench-0000000000000000"  # the API key `ours` targets require and every target is sent
# ray.serve.llm's fastest mode, as its docs and the Ray release notes name it.
DIRECT_STREAMING_ENV = {"RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def session_processes(sid: int) -> list:
    """The live processes of session `sid` (a command started with start_new_session: Ray, vLLM, HAProxy)."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


# What a process of a target does, from its command line (Ray sets an actor's to its class): first match.
PROCESS_KINDS = (("engine", ("VLLM::", "EngineCore")), ("replica", ("LLMServer", "LLMDeployment", " serve ")),
                 ("router", ("ServeReplica",)), ("haproxy", ("haproxy",)))


def process_kind(cmdline: str) -> str:
    """engine (vLLM's engine core and workers), replica (the process serving HTTP beside the engine),
    router (another Serve replica: our ingress router, ray.serve.llm's ingress), haproxy, or other (Ray's
    own processes, the launcher)."""
    for kind, marks in PROCESS_KINDS:
        if any(mark in cmdline for mark in marks):
            return kind
    return "other"


def cpu_ms_per_request(before: dict, after: dict, requests: int) -> Optional[dict[str, float]]:
    """CPU milliseconds per request by process kind (and `total`) between two `Target.cpu_s` readings. A
    process that ended in between is missed (HAProxy's reloaded workers); one that started counts whole."""
    if not after or requests <= 0:
        return None
    used: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        used[kind] = used.get(kind, 0.0) + seconds - before.get(pid, (kind, 0.0))[1]
    per = {kind: round(1000 * s / requests, 2) for kind, s in sorted(used.items())}
    per["total"] = round(sum(per.values()), 2)
    return per


def _local_ports() -> dict[str, str]:
    """HAProxy's and Serve's fallback ports for a cluster the bench starts: free ones, so a `make run` or
    a test cluster on the same machine is not in the way."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())}


@dataclass
class Target:
    label: str
    base_url: str
    metrics_url: Optional[str] = None  # where the engines' Prometheus metrics are (prefix-cache hits)
    proc: Optional[subprocess.Popen] = None
    metrics_lag_s: float = 0.0  # how long a counter takes to show there
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {BENCH_KEY}"})
    replicas: int = 1  # ours: ready once this many replicas answered (their replica header)

    def session(self) -> list:
        """Every live process of the target's session: the server, and for Ray targets the whole local
        cluster it started (HAProxy's reloaded workers too, which leave the server's process group)."""
        return session_processes(self.proc.pid)

    def _read(self, read) -> Optional[list]:
        """`read(process)` for each live process of the target's session that can be read (None: not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        import psutil

        found = []
        for p in self.session():
            try:
                found.append((p.pid, read(p)))
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def cpu_s(self) -> dict[int, tuple[str, float]]:
        """CPU seconds (user + system) each live process of the target's session has used, by pid, with its
        kind (`process_kind`)."""
        def read(p):
            times = p.cpu_times()
            return process_kind(" ".join(p.cmdline()) or p.name()), times.user + times.system

        return dict(self._read(read) or ())

    def memory_mb(self) -> Optional[dict[str, float]]:
        """RSS and PSS (shared pages split between the processes sharing them) of the target's session."""
        infos = self._read(lambda p: p.memory_full_info())
        if infos is None:
            return None
        rss = sum(info.rss for _, info in infos)
        pss = sum(getattr(info, "pss", info.rss) for _, info in infos)
        return {"rss": rss / 2**20, "pss": pss / 2**20}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the process group: vLLM and Ray spawn children
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for p in self.session():  # what left the group and outlived the server (HAProxy after a reload)
            p.kill()


def _spawn(cmd: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=PROJECT_ROOT,
                            # in the target's process, before exec: it gets SIGTERM when the bench dies
                            # (however it dies) and shuts its server down as on Ctrl-C
                            preexec_fn=die_with_parent)


def bench_service(engine: Optional[dict] = None, path: Path = LOCAL_CPU) -> ServiceConfig:
    """A deployment file's service (deployments/local-cpu.yaml) with the bench's engine overrides (`extra_args`
    merged)."""
    args = load_deployment(path).service.model_dump(mode="json")
    for key, value in (engine or {}).items():
        args["engine"][key] = {**args["engine"][key], **value} if key == "extra_args" else value
    return parse_service(args)


def _ours(label: str, policy: str, replicas: int, workdir: Path, engine: Optional[dict] = None,
          update: Optional[Callable[[dict], None]] = None, deployments: Optional[list] = None,
          keys: str = "") -> Target:
    """`update`: changes the app's args further (the LoRA bench); `deployments`: the file's overrides of them;
    `keys`: more key file lines (the tenants bench)."""
    raw = yaml.safe_load(LOCAL_CPU.read_text())
    args = bench_service(engine).model_dump(mode="json")
    args["scaling"].update(min_replicas=replicas, max_replicas=replicas, initial_replicas=None)
    args["router"]["routing"]["policy"] = policy
    if update is not None:
        update(args)
    keys_file = workdir / "api-keys"
    keys_file.write_text(f"bench:{BENCH_KEY}\n{keys}")
    args["router"]["api_keys"].update(enabled=True, file=str(keys_file))
    ports = _local_ports()
    metrics_port, port = free_port(), free_port()
    # Metrics pushed as the deployment file says (not faster: pushing costs CPU the engine would use).
    args["observability"].update(metrics_export_port=metrics_port,
                                 haproxy_metrics_port=int(ports.pop("RAY_SERVE_HAPROXY_METRICS_PORT")))
    lag_s = args["observability"]["metrics_report_interval_ms"] / 1000 + 1.5
    raw["applications"][0]["args"] = args
    if deployments:
        raw["applications"][0]["deployments"] = deployments
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    config = workdir / f"{label}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _spawn([sys.executable, "-m", "mistral_ray.cli", "run", str(config)], workdir / f"{label}.log", ports)
    return Target(label, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, lag_s)


def vllm_cli_args(cfg: ServiceConfig) -> list[str]:
    """`vllm serve` flags for the same arguments our replicas give vLLM."""
    kw = vllm_args(cfg)
    args = [kw.pop("model"), "--served-model-name", *kw.pop("served_model_name")]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def _vllm(label: str, workdir: Path, engine: Optional[dict] = None) -> Target:
    cfg = bench_service(engine)
    port = free_port()
    cmd = [sys.executable, "-m", "mistral_ray.engine.vllm_cli", "serve", *vllm_cli_args(cfg),
           "--host", "127.0.0.1", "--port", str(port)]
    proc = _spawn(cmd, workdir / f"{label}.log", replica_env(cfg))
    url = f"http://127.0.0.1:{port}"
    return Target(label, url, f"{url}/metrics", proc, 0.5)


def _ray_serve_llm(label: str, replicas: int, mode: str, workdir: Path, engine: Optional[dict] = None) -> Target:
    port, metrics_port = free_port(), free_port()
    direct = mode == "direct"
    cmd = [sys.executable, "-m", "mistral_ray.bench.serve_llm_target", str(LOCAL_CPU), str(port),
           str(metrics_port), str(replicas), mode, json.dumps(engine or {})]
    proc = _spawn(cmd, workdir / f"{label}.log", {**DIRECT_STREAMING_ENV, **_local_ports()} if direct else None)
    return Target(label, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, 2.5)


def ours_spec(rest: str) -> tuple[str, Optional[int], dict]:
    """`<policy>[:<replicas>[:<router field>=<value>,...]]` (what follows `ours:`): the policy, the replicas
    (None: the bench's --replicas), the router fields the deployment file's router section gets."""
    policy, _, more = rest.partition(":")
    n, _, router = more.partition(":")
    fields = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in router.split(",") if item)}
    return policy or "pow2", int(n) if n else None, fields


def start(spec: str, workdir: Path, replicas: int = 2, ready_timeout_s: float = 600,
          label: Optional[str] = None, engine: Optional[dict] = None) -> Target:
    """Start the target `spec` names and return once it answers a completion (else RuntimeError). `label`
    names its results and its files in `workdir` (default: the spec); `engine` overrides engine fields of
    the deployment file for every kind of target."""
    name, _, url = spec.partition("=")
    if url.startswith(("http://", "https://")):  # label=url (not ours:...:field=value)
        return Target(name, url.rstrip("/"))
    kind, _, rest = spec.partition(":")
    label = label or spec
    files = label.replace(":", "-").replace("#", "-")
    if kind == "ours":
        policy, n, fields = ours_spec(rest)
        update = (lambda args: args["router"].update(fields)) if fields else None
        target = _ours(files, policy, n or replicas, workdir, engine, update=update)
        target.replicas = n or replicas
    elif kind == "vllm":
        target = _vllm(files, workdir, engine)
    elif kind == "ray-serve-llm":
        mode, _, n = rest.partition(":")
        if mode.isdigit() or not mode:
            mode, n = "", mode
        if mode not in ("", "direct", "prefix"):
            raise ValueError(f"unknown ray-serve-llm mode {mode!r}: direct, prefix")
        # its direct streaming serves one replica per app
        target = _ray_serve_llm(files, 1 if mode == "direct" else int(n or replicas), mode, workdir, engine)
    else:
        raise ValueError(f"unknown target {spec!r}: ours:<policy>[:<replicas>[:<router field>=<value>,...]], vllm, ray-serve-llm[:<replicas>], "
                         "ray-serve-llm:direct, ray-serve-llm:prefix[:<replicas>], label=url")
    target.label = label
    try:
        _wait(target, ready_timeout_s)
    except BaseException:  # not ready, or the bench was interrupted while waiting: stop what was started
        target.stop()
        raise
    return target


def _wait(target: Target, timeout_s: float, model: str = "tiny-mistral", settle_s: float = 5.0) -> None:
    """Ready means a one-token completion comes back: the same test for every kind of server. Ours with
    several replicas is ready once each has answered and HAProxy has had `settle_s` to load them into its map
    (the test fixtures' rule): the app serves as soon as one replica is up, but its router and HAProxy learn
    of the others a moment later, and a level measured meanwhile sends its first requests to one replica (a
    pick for a replica missing from HAProxy's map goes elsewhere; the sticky chat sessions of an affinity
    policy stay where they started for the run: 63/33 on a uniform load before this wait)."""
    import httpx

    from mistral_ray.server.errors import REPLICA_HEADER

    deadline = time.monotonic() + timeout_s
    body = {"model": model, "prompt": "ready?", "max_tokens": 1}
    answered: set = set()
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.poll() is not None:
            break
        try:
            r = httpx.post(f"{target.base_url}/v1/completions", json=body, headers=target.headers, timeout=30)
            if r.status_code == 200:
                answered.add(r.headers.get(REPLICA_HEADER))
                if len(answered) >= target.replicas:
                    if target.replicas > 1:
                        time.sleep(settle_s)
                    return
                continue
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"target {target.label} did not become ready within {timeout_s:.0f}s "
                       f"(exit code {target.proc.poll() if target.proc else None}, {len(answered)} of "
                       f"{target.replicas} replicas answered); see its log in the work dir")
