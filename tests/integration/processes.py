"""What tests that start `mistral-ray` as a user would share: the processes of its session, free ports."""

from mistral_ray.bench.targets import session_processes  # noqa: F401 (shared with the tests)
from mistral_ray.ports import free_port


def free_haproxy_ports() -> dict[str, str]:
    """HAProxy's other ports, free: the session test cluster beside it holds the defaults."""
    return {"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port())}
