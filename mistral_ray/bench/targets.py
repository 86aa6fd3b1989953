"""Servers the benchmark starts and compares side by side, each in its own process group on loopback.

Specs: `ours:<policy>[:<replicas>]` (our stack from deployments/local-cpu.yaml with that routing policy),
`vllm` (bare `vllm serve` with the same engine arguments), `ray-serve-llm` (ray.serve.llm's
`build_openai_app` on the same model), or `<label>=<url>` for a server that is already running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from mistral_ray.config import PROJECT_ROOT, ServiceConfig, load_deployment

LOCAL_CPU = PROJECT_ROOT / "deployments" / "local-cpu.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Target:
    label: str
    base_url: str
    metrics_url: Optional[str] = None  # where the engines' Prometheus metrics are (prefix-cache hits)
    proc: Optional[subprocess.Popen] = None
    metrics_lag_s: float = 0.0  # how long a counter takes to show there

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)  # the process group: vLLM and Ray spawn children
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _spawn(cmd: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **(env or {})}, cwd=PROJECT_ROOT)


def _ours(label: str, policy: str, replicas: int, workdir: Path) -> Target:
    dep = load_deployment(LOCAL_CPU)
    raw = yaml.safe_load(LOCAL_CPU.read_text())
    args = dep.service.model_dump(mode="json")
    args["scaling"].update(min_replicas=replicas, max_replicas=replicas, initial_replicas=None)
    args["router"]["routing"]["policy"] = policy
    metrics_port, port = free_port(), free_port()
    args["observability"].update(metrics_export_port=metrics_port, metrics_report_interval_ms=1000)
    raw["applications"][0]["args"] = args
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    config = workdir / f"{label}.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _spawn([sys.executable, "-m", "mistral_ray.cli", "run", str(config)], workdir / f"{label}.log")
    return Target(label, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, 2.5)


def _vllm_args(cfg: ServiceConfig) -> list[str]:
    kw = cfg.engine_kwargs()
    args = [kw.pop("model"), "--served-model-name", *kw.pop("served_model_name")]
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def _vllm(label: str, workdir: Path) -> Target:
    cfg = load_deployment(LOCAL_CPU).service
    port = free_port()
    cmd = [sys.executable, "-m", "mistral_ray.engine.vllm_cli", "serve", *_vllm_args(cfg),
           "--host", "127.0.0.1", "--port", str(port)]
    proc = _spawn(cmd, workdir / f"{label}.log", cfg.replica_env())
    url = f"http://127.0.0.1:{port}"
    return Target(label, url, f"{url}/metrics", proc, 0.5)


def _ray_serve_llm(label: str, replicas: int, workdir: Path) -> Target:
    port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "mistral_ray.bench.serve_llm_target", str(LOCAL_CPU), str(port),
           str(metrics_port), str(replicas)]
    proc = _spawn(cmd, workdir / f"{label}.log")
    return Target(label, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics", proc, 2.5)


def start(spec: str, workdir: Path, replicas: int = 2, ready_timeout_s: float = 600) -> Target:
    """Start the target `spec` names and return once it answers a completion (else RuntimeError)."""
    if "=" in spec:
        label, url = spec.split("=", 1)
        return Target(label, url.rstrip("/"))
    kind, _, rest = spec.partition(":")
    if kind == "ours":
        policy, _, n = rest.partition(":")
        n_replicas = int(n or replicas)
        target = _ours(spec.replace(":", "-"), policy or "pow2", n_replicas, workdir)
    elif kind == "vllm":
        target = _vllm("vllm", workdir)
    elif kind == "ray-serve-llm":
        target = _ray_serve_llm("ray-serve-llm", int(rest or replicas), workdir)
    else:
        raise ValueError(f"unknown target {spec!r}: ours:<policy>[:<replicas>], vllm, ray-serve-llm, label=url")
    target.label = spec
    try:
        _wait(target, ready_timeout_s)
    except Exception:
        target.stop()
        raise
    return target


def _wait(target: Target, timeout_s: float, model: str = "tiny-mistral") -> None:
    """Ready means a one-token completion comes back: the same test for every kind of server."""
    import httpx

    deadline = time.monotonic() + timeout_s
    body = {"model": model, "prompt": "ready?", "max_tokens": 1}
    while time.monotonic() < deadline:
        if target.proc is not None and target.proc.poll() is not None:
            break
        try:
            if httpx.post(f"{target.base_url}/v1/completions", json=body, timeout=30).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"target {target.label} did not become ready within {timeout_s:.0f}s "
                       f"(exit code {target.proc.poll() if target.proc else None}); see its log in the work dir")
