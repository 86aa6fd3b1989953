"""The LLM autoscaling policy as a pure function of replica-reported stats."""

from types import SimpleNamespace

from mistral_ray.autoscaling import KV_USAGE, RUNNING, WAITING, LLMAutoscalingPolicy, desired_replicas


def stats(waiting, running, kv):
    return {WAITING: dict(enumerate(waiting)), RUNNING: dict(enumerate(running)), KV_USAGE: dict(enumerate(kv))}


def test_requests_drive_the_replica_count():
    assert desired_replicas(stats([4], [16], [0.1]), 16, 0.8) == 2  # 20 requests on a target of 16
    assert desired_replicas(stats([0, 0], [8, 8], [0.1, 0.1]), 16, 0.8) == 1
    assert desired_replicas(stats([0], [0], [0.0]), 16, 0.8) == 0  # idle: min_replicas decides


def test_kv_pressure_drives_it_when_requests_do_not():
    # 4 long conversations fill 1.5 caches' worth of KV: more replicas although few requests.
    assert desired_replicas(stats([0, 0], [2, 2], [0.75, 0.75]), 16, 0.8) == 2
    assert desired_replicas(stats([0, 0], [2, 2], [0.9, 0.9]), 16, 0.8) == 3


def test_requests_queued_before_any_replica_count_too():
    assert desired_replicas({}, 16, 0.8, queued_elsewhere=40) == 3  # cold start with a burst waiting


def test_policy_bounds_by_min_and_max_and_keeps_state():
    policy = LLMAutoscalingPolicy(target_ongoing_requests=2, target_kv_usage=0.8)
    ctx = SimpleNamespace(aggregated_metrics=stats([10], [10], [0.2]), total_num_requests=20,
                          capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=4, policy_state={})
    assert policy(ctx) == (4, {})  # 10 wanted, capped at max
    ctx.aggregated_metrics, ctx.total_num_requests = stats([0], [0], [0.0]), 0
    assert policy(ctx)[0] == 1
