"""Our routing policies plugged into Ray Serve's request-router extension point.

Serve keeps doing what it does well (replica discovery, dead-replica removal, per-replica `max_ongoing_requests`,
FIFO queueing and backoff while every replica is full); this class only ranks the candidates, using the policy
from `routing.py`, the load each replica reports (`LLMServer.record_routing_stats`) and this router's own count
of requests in flight to each replica, which is fresher between two reports. (Not Serve's queue-length cache:
it is overwritten by probes and rejections, and after a replica loss and an overload burst it was seen to
over-count one replica for good, and pow2 split a uniform load 107/53.)
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.config import RoutingConfig
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

    def initialize_state(self, **routing: Any) -> None:
        """`routing`: the config's `router.routing` section (request_router_kwargs); defaults live there."""
        cfg = RoutingConfig(**routing)
        self.policy: Policy = make_policy(cfg.policy, imbalance=cfg.imbalance, kv_limit=cfg.kv_limit,
                                          index_blocks=cfg.index_blocks)
        self.in_flight: Counter[str] = Counter()  # requests this router sent that have not completed

    def _load(self, replica: RunningReplica) -> Load:
        stats = replica.routing_stats or {}
        reported = int(stats.get(WAITING, 0) + stats.get(RUNNING, 0))
        ours = self.in_flight.get(replica.replica_id.unique_id, 0)
        return Load(replica.replica_id.unique_id, max(reported, ours), float(stats.get(KV_USAGE, 0.0)))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranks = self.policy.rank(_hint(pending_request), [self._load(r) for r in candidate_replicas])
        return [[by_id[i] for i in rank if i in by_id] for rank in ranks]

    # Serve calls on_send_request once per request sent (accepted or not) and on_request_completed once when
    # it ends, however it ends (a rejection cancels it), both on the router's event loop.
    def on_send_request(self, replica_id: ReplicaID) -> None:
        super().on_send_request(replica_id)
        self.in_flight[replica_id.unique_id] += 1

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        super().on_request_completed(replica_id, internal_request_id)
        key = replica_id.unique_id
        if self.in_flight[key] <= 1:  # a send that failed before it went out completes without a send
            self.in_flight.pop(key, None)
        else:
            self.in_flight[key] -= 1

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
            self.in_flight.pop(replica, None)
