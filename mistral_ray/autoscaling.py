"""The Serve autoscaling policy of the LLM deployment: a pure function of what the replicas report.

An LLM replica saturates on two things HTTP in-flight counts miss: requests waiting for a slot in the engine's
batch, and KV-cache memory. Each replica reports both (`LLMServer.record_autoscaling_stats`: waiting,
running, sliding-window-aware KV use); the policy asks for enough replicas to bring both under their targets.
Serve applies min/max, upscale/downscale delays and the cold-start fast path (0 -> 1 on the first request)
around it. Serve pickles this module by value into its controller, so it imports nothing of ours.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

WAITING, RUNNING, KV_USAGE = "waiting", "running", "kv_usage"


def desired_replicas(
    per_replica: Mapping[str, Mapping[Any, float]],
    target_ongoing_requests: float,
    target_kv_usage: float,
    queued_elsewhere: Optional[float] = None,
) -> int:
    """Replicas needed so that queued + running requests per replica stay under `target_ongoing_requests`
    and KV use per replica under `target_kv_usage`. `per_replica` maps stat -> replica -> value (averaged over
    Serve's look-back window). `queued_elsewhere` are Serve's own count of requests (which includes those
    still waiting in handles for a replica with room, invisible to the replicas): the larger count wins.
    Zero load asks for zero replicas; Serve's min_replicas and downscale delays decide what happens."""
    requests = sum(per_replica.get(WAITING, {}).values()) + sum(per_replica.get(RUNNING, {}).values())
    requests = max(requests, queued_elsewhere or 0.0)
    kv_total = sum(per_replica.get(KV_USAGE, {}).values())
    by_requests = math.ceil(requests / target_ongoing_requests - 1e-9)
    by_kv = math.ceil(kv_total / target_kv_usage - 1e-9)
    return max(by_requests, by_kv)


class LLMAutoscalingPolicy:
    """`autoscaling_config.policy.policy_function`; Serve builds it once with `policy_kwargs`."""

    def __init__(self, target_ongoing_requests: float, target_kv_usage: float):
        self.target_ongoing_requests = target_ongoing_requests
        self.target_kv_usage = target_kv_usage

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        stats = ctx.aggregated_metrics or {}
        wanted = desired_replicas(
            stats, self.target_ongoing_requests, self.target_kv_usage, queued_elsewhere=ctx.total_num_requests,
        )
        bounded = max(ctx.capacity_adjusted_min_replicas, min(ctx.capacity_adjusted_max_replicas, wanted))
        return bounded, dict(ctx.policy_state or {})
