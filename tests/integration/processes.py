"""What tests that start `mistral-ray` as a user would share: the processes of its session, free ports."""

import os

import psutil

from mistral_ray.bench.targets import free_port


def session_processes(sid: int) -> list[psutil.Process]:
    """The live processes of session `sid` (a CLI started with start_new_session: Ray, vLLM, HAProxy)."""
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    return found


def free_haproxy_ports() -> dict[str, str]:
    """HAProxy's other ports, free: the session test cluster beside it holds the defaults."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())}
