"""Overload: a burst far beyond capacity. The excess gets 503 with Retry-After and an OpenAI body at once,
memory of the serving processes (HAProxy, the ingress routers, the replicas that hold the requests) stays
bounded, and every accepted request completes."""

import asyncio
import json
import threading
import time

import httpx
import psutil
import pytest

pytestmark = pytest.mark.integration

BURST = 800
RSS_GROWTH_BOUND_MB = 300


def serving_processes(app_name: str) -> list[psutil.Process]:
    """This app's replicas and ingress routers, and this cluster's HAProxy (a child of its manager actor)."""
    procs = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"ServeReplica:{app_name}:" in cmd:
            procs.append(p)
        elif "HAProxyManager" in cmd:
            procs += [p, *p.children(recursive=True)]
    return procs


def rss_mb(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            total += p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return total


async def burst(base_url: str, model: str):
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        async def one(i):
            r = await client.post("/v1/completions", json={"model": model, "prompt": f"burst {i}", "max_tokens": 8,
                                                          "ignore_eos": True})
            return r.status_code, r.headers.get("retry-after"), r.text

        return await asyncio.gather(*(one(i) for i in range(BURST)))


def test_burst_beyond_capacity_is_shed_with_retry_after(app, base_url, model_name):
    procs = serving_processes(app.deployment.app_name)
    assert any("haproxy" in p.name() for p in procs) and len(procs) >= 4, procs
    before = rss_mb(procs)
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(rss_mb(procs))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.monotonic()
    try:
        answers = asyncio.run(burst(base_url, model_name))
    finally:
        done.set()
        sampler.join()
    took = time.monotonic() - t0
    by_status = {}
    for status, _, _ in answers:
        by_status[status] = by_status.get(status, 0) + 1
    growth = max(peak) - before
    print(f"\noverload: {BURST} at once in {took:.1f}s -> {by_status}; serving processes' RSS {before:.0f} MB, "
          f"peak +{growth:.0f} MB")
    not_json = [(status, text[:120]) for status, _, text in answers if not text.startswith("{")]
    assert not not_json, not_json  # every answer is an OpenAI body
    assert set(by_status) <= {200, 503}, by_status
    assert by_status.get(503, 0) > 0 and by_status.get(200, 0) > 0
    for status, retry_after, text in answers:
        body = json.loads(text)
        if status == 503:
            assert retry_after is not None and int(retry_after) >= 1
            assert body["error"]["code"] == "overloaded" and body["error"]["type"] == "service_unavailable_error"
        else:
            assert body["usage"]["completion_tokens"] == 8  # accepted means completed
    assert growth < RSS_GROWTH_BOUND_MB
