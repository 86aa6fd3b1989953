"""The replica's route table: what it serves, and with which checks. Default deny: any other path
answers 404 (405 for a served path with another method), whatever vLLM's app adds in a later release.

`REFUSED` names every route vLLM 0.32's app registers for a generative model that is not served, with the
reason; tests/unit/test_routes.py builds vLLM's app and fails on a route in neither table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Route:
    label: str  # the metrics' `route` label
    kind: str  # generation: every check; json: key, size, JSON, model; read: key; probe: none (ours)

    @property
    def generation(self) -> bool:
        return self.kind == "generation"


ROUTES: dict[str, dict[str, Route]] = {
    "/v1/chat/completions": {"POST": Route("chat", "generation")},
    "/v1/completions": {"POST": Route("completions", "generation")},
    "/v1/responses": {"POST": Route("responses", "generation")},
    "/v1/messages": {"POST": Route("messages", "generation")},  # Anthropic's Messages API (its SDK)
    "/v1/messages/count_tokens": {"POST": Route("count_tokens", "json")},
    "/tokenize": {"POST": Route("tokenize", "json")},
    "/detokenize": {"POST": Route("detokenize", "json")},
    "/v1/models": {"GET": Route("models", "read")},
    "/version": {"GET": Route("version", "read")},
    "/health": {"GET": Route("health", "probe")},  # the replica is alive (ours, not vLLM's)
    "/ready": {"GET": Route("ready", "probe")},  # its engine answers (ours)
}
OTHER = Route("other", "refused")  # the label of everything refused by the table

# vLLM's routes we do not serve, and why. A served route gets every check; these would each need their own.
REFUSED = {
    "/openapi.json": "vLLM's API description lists routes this server refuses",
    "/docs": "the same, as a page", "/docs/oauth2-redirect": "the same", "/redoc": "the same",
    "/load": "vLLM's own load counter; routing and autoscaling read the replica's stats instead",
    "/kv_event_sources": "engine internals",
    "/metrics": "metrics go through Ray's exporter on each node (observability.engine_metrics)",
    "/ping": "SageMaker's health probe; /health and /ready are ours",
    "/invocations": "SageMaker's entry point: a second door to the generation routes served here",
    "/v1/chat/completions/batch": "vLLM-only batch of conversations (not OpenAI's API)",
    "/v1/responses/{response_id}": "stored responses (vLLM's store is off: per process, and not per key)",
    "/v1/responses/{response_id}/cancel": "background responses need the store",
    "/v1/systemone": "vLLM-only structured decisions, outside the OpenAI API",
    "/generative_scoring": "vLLM-only scoring by generation, outside the OpenAI API",
    "/scale_elastic_ep": "an operator action on the engine", "/is_scaling_elastic_ep": "the same",
    "/v1/chat/completions/render": "disaggregated serving's render step (engine internals)",
    "/v1/completions/render": "the same", "/v1/responses/render": "the same", "/v1/messages/render": "the same",
    "/v1/chat/completions/derender": "the same", "/v1/completions/derender": "the same",
    "/inference/v1/generate": "tokens in, tokens out with raw sampling parameters: bypasses the API's checks",
    "/inference/v1/abort_requests": "aborts any request by id",
}


def route_of(method: str, path: str) -> tuple[Route, Optional[int]]:
    """The route and, when it is not served, the status to refuse with (404 unknown path, 405 method)."""
    methods = ROUTES.get(path)
    if methods is None:
        return OTHER, 404
    route = methods.get(method)
    return (route, None) if route is not None else (OTHER, 405)
