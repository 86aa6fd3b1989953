"""Our routing policies plugged into Ray Serve's request-router extension point.

Serve keeps replica discovery, dead-replica removal and (on the handle path) max_ongoing_requests and backoff;
this class ranks the candidates with the policy from `policies.py`. It runs in two places:

- the ingress router (`routing/ingress.py`), which HAProxy asks once per request: Serve takes the first
  replica of our ranking without sending anything (`_reserve=False`), so the pick is recorded here, and it
  counts as load on that replica until the replica's next report shows it arrived;
- Serve's Python proxy (no HAProxy, or a replica-less app's fallback): the request is sent through Serve,
  which tells us when it is sent and when it completes.

Load is what each replica reports (`LLMServer.record_routing_stats`, every `stats_period_s`: queued + running
requests, sliding-window-aware KV use, how many requests it received from each picker) plus what was sent its
way since, which the report cannot show yet. Under kv_aware the report is the replica's own snapshot instead,
pushed at every engine step (`kv_feed.EngineLoad`: the engine's running and waiting sequences and KV blocks in
use, `server/link.py`). (Not Serve's queue-length cache: probes and rejections overwrite
it, and after a replica loss and an overload burst it over-counted one replica for good: pow2 split 107/53.)
The overload check of the affinity policies compares these loads with each fall spread over
`load_average_s` (`policies.LoadAverage`): a replica whose batch just ended is not idle for long.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Optional

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.config import RoutingConfig
from mistral_ray.metrics import RoutingMetrics
from mistral_ray.routing.hint import RouteHint
from mistral_ray.routing.adapter_policy import AdapterAffinity
from mistral_ray.routing.policies import (ACTIVE, ADAPTERS, ARRIVALS, KV_EVENTS, SERVED, Load, LoadAverage,
                                          Policy, make_policy)


def _hint(pending: Optional[PendingRequest]) -> Optional[RouteHint]:
    """The RouteHint the ingress router passed as the routing argument; on the Serve-proxy path, the session
    header Serve's proxy read (the body is not read before routing there)."""
    if pending is None:
        return None
    for arg in list(pending.args[:1]) + list(pending.kwargs.values()):
        if isinstance(arg, RouteHint):
            return arg
    session = getattr(pending.metadata, "session_id", None)
    return RouteHint(session=session) if session else None


class LLMRequestRouter(FIFOMixin, RequestRouter):
    """`request_router_config.request_router_class` of the LLM deployment."""

    def initialize_state(self, metrics: bool = True, adapters: int = 0, **routing: Any) -> None:
        """`routing`: the config's `router.routing` section (request_router_kwargs); defaults live there.
        `metrics`: observability.request_metrics. `adapters`: engine.lora.max_loras (0: no LoRA adapters)."""
        cfg = RoutingConfig(**routing)
        self.metrics = RoutingMetrics(self._deployment_id.app_name, cfg.policy, enabled=metrics)
        self.feed = None
        if cfg.policy == "kv_aware":
            from mistral_ray.routing.kv_feed import KVFeed

            self.feed = KVFeed(cfg.index_blocks)
        self.policy: Policy = make_policy(
            cfg.policy, imbalance=cfg.imbalance, imbalance_ratio=cfg.imbalance_ratio, kv_limit=cfg.kv_limit,
            index_blocks=cfg.index_blocks, max_sessions=cfg.max_sessions, feed=self.feed)
        if adapters and cfg.adapter_affinity:
            self.policy = AdapterAffinity(self.policy, cfg.adapter_spread, cfg.adapter_window_s,
                                          placed_s=cfg.adapter_window_s, slots=int(adapters),
                                          fresh_s=max(1.0, 2 * cfg.stats_period_s))
        self.in_flight: Counter[str] = Counter()  # sent through Serve, not completed (proxy path)
        self.picks: dict[str, Counter[str]] = {}  # picker -> replica -> picks (ingress-router path)
        # Picks of the last few reports' time: a pick that never arrives (HAProxy sent it elsewhere after a
        # refused connection) stops counting once the replica has reported without it for that long.
        self.recent: dict[str, deque] = {}
        self.window_s = max(1.0, 4 * cfg.stats_period_s)
        self.average = LoadAverage(cfg.load_average_s)

    def _load(self, replica: RunningReplica, picker: Optional[str]) -> Load:
        stats = replica.routing_stats or {}
        rid = replica.replica_id.unique_id
        if self.feed is not None and stats.get(KV_EVENTS):
            source = stats[KV_EVENTS]
            self.feed.track(rid, source, source.get("blocks"))
            self.metrics.kv_index(rid, self.feed.indexes.get(rid))
            self.metrics.engine_load_reports(self.feed.load_reports)
        engine = self.feed.load(rid) if self.feed is not None else None
        if engine is not None:  # kv_aware: the engine's own counts, as of its last step (server/link.py)
            reported, arrivals, kv = engine.ongoing, engine.arrivals, engine.kv_usage
        else:  # Serve's stats path: the gate's counts, up to a stats period old
            reported, arrivals = int(stats.get(WAITING, 0) + stats.get(RUNNING, 0)), stats.get(ARRIVALS) or {}
            kv = float(stats.get(KV_USAGE, 0.0))
        unseen = 0
        if picker is not None:  # picked by us, not yet arrived when the replica last reported
            arrived = arrivals.get(picker, 0)
            picks = self.picks.setdefault(picker, Counter())
            # More arrived than we picked: HAProxy sent our picks for a lost replica here. Count from there,
            # or this replica's next picks would hide behind the surplus (seen: 116/44 after a replica loss).
            picks[rid] = max(picks[rid], arrived)
            unseen = min(picks[rid] - arrived, self._recent(rid))
        ongoing = max(reported + unseen, self.in_flight.get(rid, 0))
        average = self.average.update(rid, ongoing, time.monotonic())
        return Load(rid, ongoing, kv, average, frozenset(stats.get(ADAPTERS) or ()), frozenset(stats.get(SERVED) or ()),
                    frozenset(stats.get(ACTIVE) or ()))

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        hint = _hint(pending_request)
        picker = hint.picker if hint is not None else None
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        decision = self.policy.decide(hint, [self._load(r, picker) for r in candidate_replicas])
        chosen = [[by_id[i] for i in rank if i in by_id] for rank in decision.ranks]
        self.metrics.decided(decision.reason)
        if picker is not None and chosen and chosen[0]:  # Serve takes this one and sends nothing itself
            rid = chosen[0][0].replica_id.unique_id
            self.picks.setdefault(picker, Counter())[rid] += 1
            self.recent.setdefault(rid, deque()).append(time.monotonic())
            self.policy.routed(hint, rid)
        return chosen

    def _recent(self, replica: str) -> int:
        stamps = self.recent.get(replica)
        if not stamps:
            return 0
        horizon = time.monotonic() - self.window_s
        while stamps and stamps[0] < horizon:
            stamps.popleft()
        return len(stamps)

    # Serve calls on_send_request once per request sent (accepted or not) and on_request_completed once when
    # it ends, however it ends (a rejection cancels it), both on the router's event loop. Not called for
    # the ingress router's picks: Serve sends nothing there.
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
        hint = _hint(pending_request)
        if hint is None or hint.picker is None:  # picks were recorded when chosen
            self.policy.routed(hint, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        gone = {r.unique_id for r in self._replica_id_set} - {r.replica_id.unique_id for r in replicas}
        super().update_replicas(replicas)
        for replica in gone:
            self._forget(replica)

    def _forget(self, replica: str) -> None:
        self.policy.forget(replica)  # kv_aware's forgets the replica's KV index too
        self.metrics.kv_forget(replica)
        self.average.forget(replica)
        self.in_flight.pop(replica, None)
        self.recent.pop(replica, None)
        for counts in self.picks.values():
            counts.pop(replica, None)
