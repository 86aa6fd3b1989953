"""The Serve application builder: `import_path: mistral_ray.app:build_app` in every deployment file.

With HAProxy (the Ray cluster's environment, see options.cluster_env): the LLM deployment is the ingress,
and the ingress router is attached for HAProxy to ask. Without: the LLM deployment is the ingress behind
Serve's Python proxy, which runs our request router itself.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from mistral_ray.config import ServiceConfig, parse_service
from mistral_ray.routing import ingress
from mistral_ray.server import quota, replica


def build(cfg: ServiceConfig) -> Application:
    # The model is made available by each replica on its own node (see replica.start_vllm), not here:
    # on a cluster the builder runs on the head, which hosts no engine.
    r = cfg.router
    # The bank remembers charged request ids for HAProxy's retries as long as a request may take, twice.
    # With keys, a key file line may carry the key's own limits (read by the replicas, not here).
    bank = (quota.deployment(cfg).bind(r.limits, r.retries, 2 * r.request_timeout_s)
            if r.limits.rate_limited or r.api_keys.enabled else None)
    llm = replica.deployment(cfg).bind(cfg, bank)
    if replica.haproxy_serves():
        return llm._with_ingress_request_router(ingress.deployment(cfg).bind(llm, cfg))
    return llm


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` is the application's `args` block, a ServiceConfig."""
    return build(parse_service(args))
