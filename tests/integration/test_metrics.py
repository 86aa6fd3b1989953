"""Every dashboard panel shows data against a real Prometheus scraping the real app after real traffic.

A renamed or missing metric leaves its panel empty, and this test fails naming the panel.
"""

import time

import httpx
import pytest

from mistral_ray import monitoring
from tests.conftest import IN_CI
from tests.integration.conftest import free_port
from tests.monitoring.test_rules_and_dashboard import panel_queries

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prometheus(app, tmp_path_factory):
    if monitoring.shutil.which("prometheus") is None and not IN_CI:
        pytest.skip("prometheus missing: `make prometheus` installs it")
    port = free_port()
    obs = app.deployment.service.observability
    proc = monitoring.start_prometheus(
        obs.metrics_export_port, obs.haproxy_metrics_port, port=port,
        data_dir=tmp_path_factory.mktemp("prometheus"), scrape_interval="1s",
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                if httpx.get(f"{url}/-/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def drive_traffic(client, base_url, model_name):
    system = "You are a helpful assistant. " * 20  # shared prefix: prefix-cache hits
    for i in range(6):
        client.chat.completions.create(
            model=model_name, max_tokens=8,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
        )
        list(client.completions.create(model=model_name, prompt=f"stream {i}", max_tokens=8, stream=True))
    for body in [b"{not json", b'{"model": "nope", "prompt": "x"}', b'{"model": "%s", "prompt": "x", "max_tokens": 0}' % model_name.encode()]:
        assert httpx.post(f"{base_url}/v1/completions", content=body).status_code in (400, 404)


def query(prom: str, expr: str) -> list:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_every_panel_has_data(prometheus, client, base_url, model_name):
    drive_traffic(client, base_url, model_name)
    # The session app routes by pow2: kv_aware's series are read in test_kv_routing.py (its own app).
    queries = panel_queries(range_interval="1m", cluster=monitoring.LOCAL_CLUSTER, every_policy=False)
    empty = list(queries)
    deadline = time.monotonic() + 90
    while empty and time.monotonic() < deadline:
        time.sleep(3)
        empty = [(title, expr) for title, expr in empty if not query(prometheus, expr)]
    assert not empty, "panels without data:\n" + "\n".join(f"- {t}: {e}" for t, e in empty)


def test_engine_metrics_carry_model_and_replica(prometheus):
    # The session app's engines (other tests add apps with their own model names, and a replica killed by
    # the chaos test leaves its last sample behind until Prometheus marks it stale).
    series = query(prometheus, 'ray_vllm_num_requests_running{ray_io_cluster="local", model_name="tiny-mistral"}')
    replicas = {s["metric"]["ReplicaId"] for s in series}
    assert len(replicas) >= 2 and all(s["metric"]["ReplicaId"] for s in series)
    tokens = query(prometheus, "sum by (direction) (ray_mistral_ray_tokens_total)")
    assert {s["metric"]["direction"] for s in tokens} == {"in", "out"}
    assert all(float(s["value"][1]) > 0 for s in tokens)
    rejected = query(prometheus, "sum by (reason) (ray_mistral_ray_rejected_requests_total)")
    assert {s["metric"]["reason"] for s in rejected} >= {"validation", "model_not_found"}


def test_recording_rules_evaluate(prometheus):
    deadline = time.monotonic() + 60
    rule = 'mistral_ray:llm_replicas_healthy:sum{application="mistral"}'  # the session app (others come and go)
    while time.monotonic() < deadline and not query(prometheus, rule):
        time.sleep(2)
    healthy = query(prometheus, rule)
    assert healthy and float(healthy[0]["value"][1]) == 2
