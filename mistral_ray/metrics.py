"""Every metric mistral-ray itself records, declared once: name, type, labels and buckets.

They go through Ray's metrics pipeline (`ray.util.metrics`), so each Ray node's metrics export port — what
KubeRay's PodMonitor scrapes — serves them beside Ray Serve's and vLLM's. Ray prefixes every name with
`ray_` on export: `mistral_ray_requests_total` is scraped as `ray_mistral_ray_requests_total`. The engine's
own metrics are vLLM's (`vllm:*`, exported as `ray_vllm_*`); HAProxy's come from its own exporter
(`haproxy_*`); see docs/metrics.md.
"""

from __future__ import annotations

import time

from ray.util import metrics

from mistral_ray.server.migration import FAILED, NOT_POSSIBLE, OUTCOMES

# LLM latencies span 10 ms (a cached first token) to minutes (long generations): web-default buckets
# (5 ms .. 10 s) would put every long request in +Inf.
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
E2E_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640]
# |engine's cached prompt tokens - router's prediction|: 0 lands in the first bucket (misses are whole blocks).
KV_ERROR_BUCKETS = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 16384]
# A migrated stream's pause, cut to continuation's first event: a replica's death is noticed at once (its
# connection closes), then routing and the continuation's prefill.
MIGRATION_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
ROUTE_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5]

REJECT_REASONS = (
    "validation", "too_large", "model_not_found", "auth", "rate_limit", "overload", "fair_share", "timeout",
    "not_served"
)
# What became of a generation request of a known key, by tier: the refusals fair share and capacity decide.
TIER_OUTCOMES = ("admitted", "fair_share", "overload", "rate_limit")


class _Off:
    """Stands in for a metric when metrics are switched off in the config."""

    def inc(self, *args, **kwargs) -> None: ...
    def set(self, *args, **kwargs) -> None: ...
    def observe(self, *args, **kwargs) -> None: ...


def _declare(enabled: bool, kind, name: str, description: str, tags: tuple[str, ...], **kwargs):
    return kind(name, description=description, tag_keys=tags, **kwargs) if enabled else _Off()


class RequestMetrics:
    """What clients asked a replica for and what they experienced, recorded by the replica's gate."""

    def __init__(self, model: str, enabled: bool = True, key_labels: int = 50, key_ids: tuple[str, ...] = ()):
        self.model = model
        self.key_labels = key_labels
        # The key ids with a series of their own: the first `key_labels` of the key file, so every replica
        # labels the same keys; "none" (keys off) and "unknown" (refused) always.
        self._keys = {*key_ids[:key_labels], "none", "unknown"}
        self.requests = _declare(
            enabled, metrics.Counter, "mistral_ray_requests_total",
            "Requests answered, by route, model, HTTP status and API key id.", ("route", "model", "status", "key_id"),
        )
        self.in_flight = _declare(
            enabled, metrics.Gauge, "mistral_ray_requests_in_flight",
            "Requests a replica is handling now (admitted, not yet finished).", ("route", "model"),
        )
        self.ttft = _declare(
            enabled, metrics.Histogram, "mistral_ray_time_to_first_token_seconds",
            "Streamed generation requests: from request received by the replica to its first event sent.",
            ("route", "model"), boundaries=TTFT_BUCKETS,
        )
        self.e2e = _declare(
            enabled, metrics.Histogram, "mistral_ray_e2e_request_latency_seconds",
            "Generation requests answered 2xx: from request received by the replica to the last byte sent; "
            "stream=\"false\" is the latency of a unary answer.",
            ("route", "model", "stream"), boundaries=E2E_BUCKETS,
        )
        self.rejected = _declare(
            enabled, metrics.Counter, "mistral_ray_rejected_requests_total",
            "Requests refused before reaching the engine, by reason.", ("route", "model", "reason"),
        )
        self.tokens = _declare(
            enabled, metrics.Counter, "mistral_ray_tokens_total",
            "Prompt (in) and completion (out) tokens of finished requests, from vLLM's usage.",
            ("route", "model", "direction"),
        )
        self.max_replicas = _declare(
            enabled, metrics.Gauge, "mistral_ray_config_max_replicas",
            "scaling.max_replicas of the deployment, from the config (for 'pinned at max').",
            ("application", "deployment"),
        )
        self.min_replicas = _declare(
            enabled, metrics.Gauge, "mistral_ray_config_min_replicas",
            "scaling.min_replicas of the deployment, from the config (for 'replica down').",
            ("application", "deployment"),
        )
        self.kv_predictions = _declare(
            enabled, metrics.Counter, "mistral_ray_kv_predictions_total",
            "kv_aware: requests whose cached prompt tokens the router predicted, by how the engine's own count "
            "(usage.prompt_tokens_details.cached_tokens) compared: exact, under (the engine reused more), over.",
            ("route", "model", "outcome"),
        )
        self.kv_prediction_error = _declare(
            enabled, metrics.Histogram, "mistral_ray_kv_prediction_error_tokens",
            "kv_aware: |engine's cached prompt tokens - router's prediction| per request (0: exact).",
            ("route", "model"), boundaries=KV_ERROR_BUCKETS,
        )
        self.prompts_forwarded = _declare(
            enabled, metrics.Counter, "mistral_ray_prompt_tokens_forwarded_total",
            "kv_aware: chats whose router sent their prompt token ids ahead, by whether they were there when the "
            "request came (used: the engine did not tokenize the messages; missed: it did).",
            ("route", "model", "outcome"),
        )
        self.adapter_loads = _declare(
            enabled, metrics.Counter, "mistral_ray_adapter_loads_total",
            "LoRA adapter requests admitted while the replica's engine did not hold the adapter (it reads it in), "
            "by adapter, as the replica counts them (its last max_cpu_loras adapters, as vLLM's cache keeps them).",
            ("model",),
        )
        self.adapter_evictions = _declare(
            enabled, metrics.Counter, "mistral_ray_adapter_evictions_total",
            "LoRA adapters that left a replica's list of held adapters (least recently used) for another.", ("model",),
        )
        self.adapters_held = _declare(
            enabled, metrics.Gauge, "mistral_ray_adapter_held",
            "1 while a replica's engine holds the LoRA adapter (its last max_cpu_loras adapters), else 0.",
            ("model", "replica"),
        )
        self.migrations = _declare(
            enabled, metrics.Counter, "mistral_ray_stream_migrations_total",
            "Streams cut by a lost replica, by how the stream guard ended them: migrated (continued on this "
            "replica), failed (reason refused: this replica refused the continuation; limit: lost again past "
            "router.migration_limit), not_possible (reason: what the stream asked for, server/migration.py).",
            ("route", "model", "outcome", "reason"),
        )
        self.migration_wait = _declare(
            enabled, metrics.Histogram, "mistral_ray_stream_migration_wait_seconds",
            "Migrated streams: from the cut (as the stream guard saw it) to the continuation's first event.",
            ("route", "model"), boundaries=MIGRATION_BUCKETS,
        )
        self.tier_requests = _declare(
            enabled, metrics.Counter, "mistral_ray_tier_requests_total",
            "Generation requests of a known key by its tier (router.tenants.tiers; keys off: the default tier) "
            "and what became of them: admitted, or refused by fair share, capacity or rate limit.",
            ("model", "tier", "outcome"),
        )
        self.tier_queue = _declare(
            enabled, metrics.Histogram, "mistral_ray_tier_queue_seconds",
            "Generation requests by tier: time in the engine's queue (queued -> first scheduled, vLLM's clock).",
            ("model", "tier"), boundaries=TTFT_BUCKETS,
        )
        self.tier_ttft = _declare(
            enabled, metrics.Histogram, "mistral_ray_tier_time_to_first_token_seconds",
            "Streamed generation requests by tier: from request received by the replica to its first event sent.",
            ("model", "tier"), boundaries=TTFT_BUCKETS,
        )
        self.replica = ""  # the replica's id, for the adapters_held label
        self._in_flight: dict[str, int] = {}

    def configured(self, application: str, deployment: str, min_replicas: int, max_replicas: int) -> None:
        tags = {"application": application, "deployment": deployment}
        self.min_replicas.set(min_replicas, tags=tags)
        self.max_replicas.set(max_replicas, tags=tags)

    def started(self, route: str) -> None:
        n = self._in_flight.get(route, 0) + 1
        self._in_flight[route] = n
        self.in_flight.set(n, tags={"route": route, "model": self.model})

    # `model` below: the base model or the LoRA adapter a request named (the gate admits only those the
    # config lists, so the label set stays bounded); the base model where none was admitted.
    def finished(self, route: str, status: int | str, key_id: str, model: str | None = None,
                 counted: bool = True) -> None:
        n = self._in_flight.get(route, 1) - 1
        self._in_flight[route] = n
        self.in_flight.set(n, tags={"route": route, "model": self.model})
        if counted:
            self.requests.inc(tags={"route": route, "model": model or self.model, "status": str(status),
                                    "key_id": self.key_label(key_id)})

    def key_label(self, key_id: str) -> str:
        if not self.key_labels:
            return "all"
        return key_id if key_id in self._keys else "other"

    def first_token(self, route: str, seconds: float, model: str | None = None) -> None:
        self.ttft.observe(seconds, tags={"route": route, "model": model or self.model})

    def completed(self, route: str, stream: bool, seconds: float, model: str | None = None) -> None:
        self.e2e.observe(seconds, tags={"route": route, "model": model or self.model,
                                        "stream": "true" if stream else "false"})

    def reject(self, route: str, reason: str) -> None:
        assert reason in REJECT_REASONS, reason
        self.rejected.inc(tags={"route": route, "model": self.model, "reason": reason})

    def tier(self, tier: str, outcome: str) -> None:
        assert outcome in TIER_OUTCOMES, outcome
        self.tier_requests.inc(tags={"model": self.model, "tier": tier, "outcome": outcome})

    def tier_waited(self, tier: str, queued_s: float | None, first_token_s: float | None) -> None:
        tags = {"model": self.model, "tier": tier}
        if queued_s is not None:
            self.tier_queue.observe(queued_s, tags=tags)
        if first_token_s is not None:
            self.tier_ttft.observe(first_token_s, tags=tags)

    def kv_prediction(self, route: str, predicted: int, cached: int) -> None:
        """kv_aware: what the router predicted against what the engine reused for this request."""
        outcome = "exact" if predicted == cached else "under" if predicted < cached else "over"
        self.kv_predictions.inc(tags={"route": route, "model": self.model, "outcome": outcome})
        self.kv_prediction_error.observe(abs(cached - predicted), tags={"route": route, "model": self.model})

    def prompt_forwarded(self, route: str, used: bool) -> None:
        self.prompts_forwarded.inc(tags={"route": route, "model": self.model, "outcome": "used" if used else "missed"})

    def adapter_used(self, adapter: str, loaded: bool, evicted: list[str]) -> None:
        if loaded:
            self.adapter_loads.inc(tags={"model": adapter})
            self.adapters_held.set(1, tags={"model": adapter, "replica": self.replica})
        for name in evicted:
            self.adapter_evictions.inc(tags={"model": name})
            self.adapters_held.set(0, tags={"model": name, "replica": self.replica})

    def migration(self, route: str, outcome: str, reason: str, waited: float | None = None,
                  model: str | None = None) -> None:
        """A cut stream's ending (labels bounded: server/migration.py's OUTCOMES, NOT_POSSIBLE, FAILED)."""
        if outcome not in OUTCOMES or reason not in {"migrated": ("",), "failed": FAILED}.get(outcome, NOT_POSSIBLE):
            outcome, reason = "failed", "refused"
        tags = {"route": route, "model": model or self.model}
        self.migrations.inc(tags={**tags, "outcome": outcome, "reason": reason})
        if waited is not None:
            self.migration_wait.observe(waited, tags=tags)

    def count_tokens(self, route: str, prompt: int, completion: int, model: str | None = None) -> None:
        self.tokens.inc(prompt, tags={"route": route, "model": model or self.model, "direction": "in"})
        self.tokens.inc(completion, tags={"route": route, "model": model or self.model, "direction": "out"})


class RoutingMetrics:
    """The routing policy's decisions (recorded by the Serve request router that runs it)."""

    def __init__(self, application: str, policy: str, enabled: bool = True):
        self.tags = {"application": application, "policy": policy}
        self.decisions = _declare(
            enabled, metrics.Counter, "mistral_ray_routing_decisions_total",
            "Requests placed by the routing policy, by why: load, prefix (a replica holding the prompt's prefix), "
            "new_prefix (cached nowhere yet), session, overloaded (the favourite was skipped).",
            ("application", "policy", "decision"),
        )

        self.kv_blocks = _declare(
            enabled, metrics.Gauge, "mistral_ray_kv_index_blocks",
            "kv_aware: KV-cache blocks the router knows a replica's engine holds (from its KV events).",
            ("application", "policy", "replica"),
        )
        self.kv_events = _declare(
            enabled, metrics.Counter, "mistral_ray_kv_events_total",
            "kv_aware: KV-cache events applied to the router's index (stored, removed, cleared).",
            ("application", "policy"),
        )
        self.kv_resets = _declare(
            enabled, metrics.Counter, "mistral_ray_kv_index_resets_total",
            "kv_aware: times a replica's index started over (events lost beyond the engine's replay buffer, "
            "or more blocks than the engine has).", ("application", "policy"),
        )
        self.engine_loads = _declare(
            enabled, metrics.Counter, "mistral_ray_engine_load_reports_total",
            "kv_aware: load snapshots the router received from the replicas (their engines' step counts).",
            ("application", "policy"),
        )
        self._kv_seen: dict[str, tuple[float, int, int]] = {}  # replica -> (last update, events, resets counted)
        self._loads_counted = 0

    def decided(self, reason: str) -> None:
        self.decisions.inc(tags={**self.tags, "decision": reason})

    def engine_load_reports(self, total: int) -> None:
        """kv_aware: the feed's count of load snapshots so far (counted by its thread, added here)."""
        if total > self._loads_counted:
            self.engine_loads.inc(total - self._loads_counted, tags=self.tags)
        self._loads_counted = total

    def kv_forget(self, replica: str) -> None:
        if self._kv_seen.pop(replica, None) is not None:
            self.kv_blocks.set(0, tags={**self.tags, "replica": replica})

    def kv_index(self, replica: str, index, period_s: float = 1.0) -> None:
        """A replica's index size, and the events and resets since the last update, at most once per period
        (from the router's event loop: the feed's thread only counts)."""
        if index is None:
            return
        now = time.monotonic()
        last, events, resets = self._kv_seen.get(replica, (0.0, 0, 0))
        if now - last < period_s:
            return
        if index.events < events:  # a new index (the replica's feed reconnected): counts start over
            events = resets = 0
        self._kv_seen[replica] = (now, index.events, index.resets)
        self.kv_blocks.set(index.size(), tags={**self.tags, "replica": replica})
        if index.events > events:
            self.kv_events.inc(index.events - events, tags=self.tags)
        if index.resets > resets:
            self.kv_resets.inc(index.resets - resets, tags=self.tags)


class RouteLatency:
    """How long the ingress router takes to answer HAProxy's question (recorded by the ingress router)."""

    def __init__(self, application: str, policy: str, enabled: bool = True):
        self.tags = {"application": application, "policy": policy}
        self.latency = _declare(
            enabled, metrics.Histogram, "mistral_ray_routing_latency_seconds",
            "Time the ingress router takes to answer HAProxy (read the body, run the policy).",
            ("application", "policy"), boundaries=ROUTE_BUCKETS,
        )

    def answered(self, seconds: float) -> None:
        self.latency.observe(seconds, tags=self.tags)
