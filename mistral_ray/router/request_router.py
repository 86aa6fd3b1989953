"""Our routing policies plugged into Ray Serve's request-router extension point.

Serve keeps doing what it does well (replica discovery, dead-replica removal, per-replica `max_ongoing_requests`,
FIFO queueing and backoff while every replica is full); this class only ranks the candidates, using the policy
from `routing.py`, the load each replica reports (`LLMServer.record_routing_stats`) and Serve's own count of
requests it sent since (its queue-length cache), which is fresher between two reports.
"""

from __future__ import annotations

from typing import Any, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.routing import Load, Policy, RouteHint, make_policy


def _hint(pending: Optional[PendingRequest]) -> Optional[RouteHint]:
    """The RouteHint the ingress passed as `generate(route, body, hint)`."""
    if pending is None:
        return None
    for arg in list(pending.args[2:3]) + list(pending.kwargs.values()):
        if isinstance(arg, RouteHint):
            return arg
    return None


class LLMRequestRouter(FIFOMixin, RequestRouter):
    """`request_router_config.request_router_class` of the LLM deployment."""

    def initialize_state(self, policy: str = "pow2", imbalance: int = 8, kv_limit: float = 0.95,
                         index_blocks: int = 65536, **_: Any) -> None:
        self.policy: Policy = make_policy(policy, imbalance=imbalance, kv_limit=kv_limit, index_blocks=index_blocks)

    def _load(self, replica: RunningReplica) -> Load:
        stats = replica.routing_stats or {}
        reported = int(stats.get(WAITING, 0) + stats.get(RUNNING, 0))
        sent = self._replica_queue_len_cache.get(replica.replica_id) if self._use_replica_queue_len_cache else None
        return Load(replica.replica_id.unique_id, max(reported, sent or 0), float(stats.get(KV_USAGE, 0.0)))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = self.policy.rank(_hint(pending_request), [self._load(r) for r in candidate_replicas])
        return [[by_id[i] for i in rank if i in by_id] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.policy.routed(_hint(pending_request), replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {r.unique_id for r in self._replica_id_set} - {r.replica_id.unique_id for r in replicas}
        super().update_replicas(replicas)
        for replica in gone:
            self.policy.forget(replica)
