"""The Serve RequestRouter subclass (real Serve base class, stand-in replicas): what load it feeds the policy."""

import asyncio
from collections import Counter
from types import SimpleNamespace

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING
from mistral_ray.routing.hint import RouteHint, prefix_blocks
from mistral_ray.routing.policies import ARRIVALS
from mistral_ray.routing.request_router import LLMRequestRouter

DEPLOYMENT = DeploymentID(name="llm", app_name="mistral")


def replica(name, waiting=0, running=0, kv=0.0, arrivals=None):
    # What the router reads of a RunningReplica: its id, reported stats, and a queue-length probe.
    async def get_queue_len(*, deadline_s):
        return waiting + running
    return SimpleNamespace(replica_id=ReplicaID(name, DEPLOYMENT), get_queue_len=get_queue_len,
                           routing_stats={WAITING: waiting, RUNNING: running, KV_USAGE: kv, ARRIVALS: arrivals or {}})


def router(policy="pow2", **routing):
    r = LLMRequestRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN, use_replica_queue_len_cache=True)
    r.initialize_state(policy=policy, imbalance=8, metrics=False, **routing)
    return r


def first_choices(r, replicas, n, hint=None):
    async def run():
        picks = Counter()
        for _ in range(n):
            pending = None if hint is None else SimpleNamespace(args=[hint], kwargs={}, metadata=None)
            picks[(await r.choose_replicas(replicas, pending))[0][0].replica_id.unique_id] += 1
        return picks
    return asyncio.run(run())


def test_ingress_router_picks_count_until_the_replica_reports_them():
    # HAProxy's questions: Serve takes our first choice and sends nothing, so the picks are the load.
    r, pick = router(), RouteHint(picker="router-1")
    a, b = replica("a"), replica("b")
    counts = first_choices(r, [a, b], 40, pick)
    assert counts == {"a": 20, "b": 20}  # with stale reports of 0, each pick makes its replica heavier
    # Reports that include our picks (arrivals) replace our count with what the replica says it holds.
    a2 = replica("a", running=20, arrivals={"router-1": 20})
    b2 = replica("b", running=0, arrivals={"router-1": 20})
    assert first_choices(r, [a2, b2], 10, pick) == {"b": 10}
    assert r.picks["router-1"] == {"a": 20, "b": 30}


def test_requests_redispatched_here_do_not_hide_later_picks():
    # HAProxy sent 6 of our picks for a lost replica to `a`: a reports more arrivals than we picked for it.
    r, pick = router(), RouteHint(picker="router-1")
    a, b = replica("a", arrivals={"router-1": 26}), replica("b", arrivals={"router-1": 20})
    r.picks["router-1"] = Counter({"a": 20, "b": 20})
    assert first_choices(r, [a, b], 40, pick) == {"a": 20, "b": 20}  # not all to `a` until it catches up


def test_picks_that_never_arrive_stop_counting():
    # Requests HAProxy sent elsewhere (a refused connection) never arrive: after the window, the reports win.
    r, pick = router(), RouteHint(picker="router-1")
    a, b = replica("a"), replica("b")
    first_choices(r, [a, b], 40, pick)
    a_lost = replica("a", arrivals={"router-1": 0})  # none of a's 20 picks arrived
    b_idle = replica("b", running=3, arrivals={"router-1": 20})
    assert first_choices(r, [a_lost, b_idle], 4, pick) == {"b": 4}  # within the window: a looks busy
    r.window_s = 0.0  # the window has passed
    assert first_choices(r, [a_lost, b_idle], 4, pick) == {"a": 4}


def test_a_replica_whose_batch_just_ended_does_not_draw_conversations_away():
    # 16 conversations on each replica; the other replica's batch of answers ends and its report shows 1 in
    # flight before its next turns arrive. A follow-up stays with its prefix; judged on the loads of the
    # moment it left.
    pick = RouteHint(prefix=prefix_blocks("F" * 256, 64, 64), picker="router-1")

    def where_the_follow_up_goes(window_s):
        r = router("prefix_affinity", load_average_s=window_s)  # a long window: no test timing involved
        home = first(first_choices(r, [replica("a", running=16), replica("b", running=16)], 1, pick))
        other = "b" if home == "a" else "a"
        seen = {"router-1": 1}
        after = [replica(home, running=18, arrivals=seen), replica(other, running=1)]
        return home, first(first_choices(r, after, 1, pick))

    home, chosen = where_the_follow_up_goes(60.0)
    assert chosen == home
    home, chosen = where_the_follow_up_goes(0.0)
    assert chosen != home


def first(counts):
    (name,) = counts
    return name


def test_session_header_read_by_serves_proxy_keeps_a_session_on_its_replica():
    r, a, b = router("session"), replica("a"), replica("b")

    async def run():
        homes = set()
        for _ in range(10):
            pending = SimpleNamespace(args=[], kwargs={}, metadata=SimpleNamespace(session_id="alice"))
            chosen = (await r.choose_replicas([a, b], pending))[0][0].replica_id
            r.on_request_routed(pending, chosen, None)
            homes.add(chosen.unique_id)
        return homes
    assert len(asyncio.run(run())) == 1


def test_own_in_flight_requests_count_between_stats_reports():
    r, a, b = router(), replica("a"), replica("b")
    for _ in range(5):
        r.on_send_request(a.replica_id)  # stats still say both idle: a report is up to 0.5 s old
    assert first_choices(r, [a, b], 50) == {"b": 50}
    for i in range(5):
        r.on_request_completed(a.replica_id, f"req-{i}")
    assert not r.in_flight
    assert set(first_choices(r, [a, b], 50)) == {"a", "b"}


def test_reported_load_wins_when_higher_than_ours():
    r, a, b = router(), replica("a", waiting=3, running=4), replica("b", running=1)
    r.on_send_request(b.replica_id)
    assert first_choices(r, [a, b], 50) == {"b": 50}


def test_serve_queue_length_cache_does_not_skew_the_balance():
    # Serve's cache can keep an over-count of one replica (seen after a replica loss and an 800-request
    # burst: a uniform load then split 107/53). Our load ignores it.
    r, a, b = router(), replica("a"), replica("b")
    r._replica_queue_len_cache.update(a.replica_id, 40)
    counts = first_choices(r, [a, b], 400)
    assert abs(counts["a"] - counts["b"]) < 80, counts


def test_completion_without_send_and_removed_replicas_leave_no_count():
    r, a, b = router(), replica("a"), replica("b")
    r.on_request_completed(a.replica_id, "never-sent")  # a send that failed before it went out
    assert not r.in_flight

    async def run():  # update_replicas probes new replicas' queue lengths on the running loop
        r.update_replicas([a, b])
        r.on_send_request(b.replica_id)
        r.update_replicas([a])
        await asyncio.sleep(0)
    asyncio.run(run())
    assert "b" not in r.in_flight


def test_the_ingress_router_reads_no_more_than_haproxy_sends():
    import asyncio

    from mistral_ray.routing.ingress import _read

    def receiver(chunks):
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

        async def receive():
            return messages.pop(0)

        return receive

    assert asyncio.run(_read(receiver([b"a" * 600, b"b" * 400]), 1024)) == b"a" * 600 + b"b" * 400
    assert asyncio.run(_read(receiver([b"a" * 600, b"b" * 600, b"never read"]), 1024)) is None
