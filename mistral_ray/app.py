"""The Serve application builder: `import_path: mistral_ray.app:build_app` in every deployment file."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from mistral_ray import replica, tiny_model
from mistral_ray.config import ServiceConfig, parse_service
from mistral_ray.router import app as router


def prepare(cfg: ServiceConfig) -> None:
    """Make the model available where the config says it is (laptops build the tiny one, no download)."""
    if cfg.model.build_tiny:
        tiny_model.ensure(cfg.model.resolved_source())


def build(cfg: ServiceConfig) -> Application:
    prepare(cfg)
    llm = replica.deployment(cfg).bind(cfg)
    return router.deployment(cfg).bind(llm, cfg)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `args` is the application's `args` block, a ServiceConfig."""
    return build(parse_service(args))
