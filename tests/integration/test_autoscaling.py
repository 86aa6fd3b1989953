"""Autoscaling on replica-reported load (tiny model, CPU), on an app allowed 0..2 replicas:
a request to a deployment scaled to zero waits (bounded) while a replica starts, instead of failing (HAProxy
sends it to Serve's fallback proxy, which holds it through the cold start); a bounded step of load takes it
from 1 to 2 replicas and back to 1 after the load stops; idle, it goes back to zero."""

import threading
import time

import httpx
import pytest

from tests.integration.conftest import deploy, extra_app

pytestmark = pytest.mark.integration

NAME = "autoscale"
SCALING = dict(min_replicas=0, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=2,
               downscale_delay_s=8, downscale_to_zero_delay_s=40, look_back_period_s=3, metrics_interval_s=0.5)


def llm_state():
    from ray import serve

    from mistral_ray.options import LLM_DEPLOYMENT

    app = serve.status().applications.get(NAME)
    if app is None or LLM_DEPLOYMENT not in app.deployments:
        return None, {}
    d = app.deployments[LLM_DEPLOYMENT]
    return str(getattr(d.status, "value", d.status)), {str(getattr(k, "value", k)): v
                                                        for k, v in d.replica_states.items()}


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, replicas = llm_state()
        if predicate(status, replicas):
            return status, replicas
        time.sleep(0.5)
    raise AssertionError(f"{what} not reached within {timeout_s}s: {llm_state()}")


@pytest.fixture(scope="module")
def scaled_app(app):
    from ray import serve

    service = extra_app(app, NAME, scaling=SCALING)
    url = deploy(app, NAME, service, wait=False)
    try:
        yield url, service.model.name
    finally:
        serve.delete(NAME)


def test_request_to_a_deployment_at_zero_waits_for_a_replica(app, scaled_app):
    url, model = scaled_app
    deadline = time.monotonic() + 300
    while True:  # HAProxy routes the app's prefix (to the fallback proxy alone: min_replicas 0)
        try:
            if f"/{NAME}" in httpx.get(f"{app.base_url}/-/routes", timeout=5).json():
                break
        except (httpx.HTTPError, ValueError):
            pass
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert llm_state()[1].get("RUNNING", 0) == 0
    t0 = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": "cold", "max_tokens": 4}, timeout=400)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    print(f"\nscale from zero: the first request waited {time.monotonic() - t0:.1f}s for a replica and succeeded")
    assert llm_state()[1].get("RUNNING") == 1


def test_step_of_load_scales_1_to_2_and_back(scaled_app):
    url, model = scaled_app
    wait_for(lambda s, r: r.get("RUNNING") == 1 and s == "HEALTHY", 420, "1 running replica")
    stop = threading.Event()
    sent = []

    def user():
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                body = {"model": model, "prompt": "load " * 8, "max_tokens": 200, "ignore_eos": True}
                sent.append(client.post(f"{url}/v1/completions", json=body).status_code)

    t0 = time.monotonic()
    users = [threading.Thread(target=user) for _ in range(6)]  # 6 in flight on a target of 2 per replica
    for u in users:
        u.start()
    timeline = {"load start": 0.0}
    try:
        wait_for(lambda s, r: s == "UPSCALING" or r.get("STARTING", 0) + r.get("RUNNING", 0) >= 2, 120, "upscale")
        timeline["decision (2 replicas wanted)"] = time.monotonic() - t0
        wait_for(lambda s, r: r.get("RUNNING") == 2, 420, "2 running replicas")
        timeline["second replica ready"] = time.monotonic() - t0
    finally:
        stop.set()
        for u in users:
            u.join()
    timeline["load stop"] = time.monotonic() - t0
    wait_for(lambda s, r: s == "DOWNSCALING" or r.get("RUNNING") == 1, 120, "downscale decision")
    timeline["decision (1 replica wanted)"] = time.monotonic() - t0
    wait_for(lambda s, r: r.get("RUNNING") == 1 and sum(r.values()) == 1, 180, "back to 1 replica")
    timeline["back to 1 replica"] = time.monotonic() - t0
    print("\nautoscaling timeline (s since load start):")
    for event, at in timeline.items():
        print(f"  {at:7.1f}  {event}")
    assert set(sent) == {200}, sent  # nothing failed while replicas came and went


def test_idle_deployment_scales_to_zero(scaled_app):
    t0 = time.monotonic()
    wait_for(lambda s, r: sum(r.values()) == 0, 180, "zero replicas")
    print(f"\nscaled to zero {time.monotonic() - t0:.0f}s after the previous test (downscale_to_zero_delay_s 40)")
