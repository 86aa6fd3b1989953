"""The Serve application builder: `import_path: mistral_ray.app:build_app` in every deployment file."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from mistral_ray import replica
from mistral_ray.config import ServiceConfig, parse_service
from mistral_ray.router import app as router


def build(cfg: ServiceConfig) -> Application:
    # The model is made available by each replica on its own node (see replica.start_vllm), not here:
    # on a cluster the builder runs on the head, which hosts no engine.
    llm = replica.deployment(cfg).bind(cfg)
    return router.deployment(cfg).bind(llm, cfg)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` is the application's `args` block, a ServiceConfig."""
    return build(parse_service(args))
