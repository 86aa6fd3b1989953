"""A client that disconnects mid-stream frees its engine slot: the abort travels router -> replica -> vLLM."""

import re
import time

import httpx
import pytest

pytestmark = pytest.mark.integration


def running_requests(app, model: str) -> float:
    """vLLM's running requests summed over the model's replicas (-1 until the gauge is first exported).
    Only this model's series: other tests' apps (autoscaling's, scaled to zero) leave series of their own."""
    port = app.deployment.service.observability.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    values = re.findall(r'^ray_vllm_num_requests_running\{[^}]*model_name="' + re.escape(model)
                        + r'"[^}]*\} ([0-9.e+-]+)$', text, re.M)
    return sum(float(v) for v in values) if values else -1


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def test_disconnect_aborts_generation(app, base_url, model_name):
    body = {"model": model_name, "prompt": "Once", "max_tokens": 1500, "stream": True,
            "ignore_eos": True, "temperature": 0}
    streams = []
    for _ in range(3):
        client = httpx.Client(timeout=60)
        response = client.send(client.build_request("POST", f"{base_url}/v1/completions", json=body), stream=True)
        streams.append((client, response, response.iter_lines()))
    # Read like a live client for a while (1500 tokens would take far longer): all three are generating.
    seen_running = 0.0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and seen_running < 3:
        for _, _, lines in streams:
            for _ in range(20):
                assert next(lines) != "data: [DONE]"
        seen_running = max(seen_running, running_requests(app, model_name))
    assert seen_running >= 3, f"the engines showed {seen_running} running requests, expected 3"
    started = time.monotonic()
    for client, response, _ in streams:
        response.close()
        client.close()
    assert wait_for(lambda: running_requests(app, model_name) == 0, 15), "requests kept running after the clients left"
    print(f"\nengine running requests back to 0 in {time.monotonic() - started:.1f}s after disconnect")
