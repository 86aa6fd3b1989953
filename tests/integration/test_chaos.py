"""Replica failure under load: 2 replicas serve a steady, bounded load of non-streamed requests and streams
(three the stream guard can migrate, one it cannot: it has a stop string); the replica serving the latter,
and if it comes to that one of the others, is killed. No non-streamed request fails (HAProxy sends the ones it
held to the other replica); every stream that can be migrated ends whole (continued on the survivor, counted
as migrated there); the other ends at once with OpenAI's error event and [DONE] (never a hang, never broken)
and is counted as the failure it is, in the series the error-ratio rule reads (Ray's per-request HTTP
counter, status 502), scraped every 15 s as the PodMonitors do, across the HAProxy reload the lost replica
causes; Serve replaces the replica, and the deployment is back to 2 replicas."""

import re
import threading
import time
from typing import NamedTuple, Optional

import httpx
import pytest

from mistral_ray.server.errors import REPLICA_HEADER
from tests.integration.streams import read_stream

pytestmark = pytest.mark.integration


def llm_replicas(app_name: str) -> dict[str, int]:
    from ray import serve

    from mistral_ray.options import LLM_DEPLOYMENT

    states = serve.status().applications[app_name].deployments[LLM_DEPLOYMENT].replica_states
    return {str(getattr(k, "value", k)): v for k, v in states.items()}


def server_aborts(app) -> float:
    """HAProxy's count of answers its replicas cut, for this app's backends."""
    port = app.deployment.service.observability.haproxy_metrics_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    name = app.deployment.app_name
    return sum(float(v) for v in re.findall(
        r'^haproxy_backend_server_aborts_total\{proxy="http-' + re.escape(name) + r'[^"]*"\} (\S+)$', text, re.M))


SCRAPE_S = 15  # the PodMonitors' interval
FIXED = 3  # the streamer whose requests cannot be migrated (a stop string); 0..2 can


class Stream(NamedTuple):
    replica: Optional[str]
    outcome: str
    migratable: bool
    start: float
    end: float
    pause: float  # its longest wait between two events (s)
    pause_end: float


def gaps(streams: list) -> str:
    pauses = sorted(s.pause for s in streams)
    return f"p50 {pauses[len(pauses) // 2]:.2f} s, max {pauses[-1]:.2f} s" if pauses else "-"


def migrations(app, outcome: str) -> float:
    """The replicas' count of cut streams that ended as `outcome` (mistral_ray_stream_migrations_total)."""
    port = app.deployment.service.observability.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    model = app.deployment.service.model.name
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_mistral_ray_stream_migrations_total{") and f'outcome="{outcome}"' in line
               and f'model="{model}"' in line)


def client_got(app, status: str) -> float:
    """Ray's per-request HTTP counter (what the error-ratio rule reads) for this app and status, from the
    node's metrics export port, as Prometheus scrapes it."""
    port = app.deployment.service.observability.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    name = re.escape(app.deployment.app_name)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_serve_num_http_requests_total{") and f'application="{name}"' in line
               and f'status_code="{status}"' in line)


def test_killing_a_replica_loses_no_request_and_counts_cut_streams(app, base_url, model_name):
    import ray

    app_name = app.deployment.app_name
    actors = {a["name"].rsplit("#", 1)[-1]: a for a in ray.util.list_named_actors(all_namespaces=True)
              if f"{app_name}#LLMServer#" in a["name"]}
    assert len(actors) == 2, actors
    results, streams, streaming_now, stop, killed_at = [], [], {}, threading.Event(), []
    aborts_before = server_aborts(app)
    scrapes = [client_got(app, "502")]
    migrated_before = migrations(app, "migrated")

    def user():
        with httpx.Client(timeout=300) as client:
            while not stop.is_set():
                r = client.post(f"{base_url}/v1/completions",
                                json={"model": model_name, "prompt": "chaos", "max_tokens": 24, "ignore_eos": True})
                results.append((time.monotonic(), r.status_code, r.headers.get(REPLICA_HEADER),
                                r.text[:200] if r.status_code != 200 else ""))

    def streamer(i):
        body = {"model": model_name, "prompt": "chaos", "max_tokens": 400, "ignore_eos": True, "stream": True}
        if i == FIXED:
            body["stop"] = ["never said"]  # a stop string: not continued exactly, so not migrated
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                pauses, start = [], time.monotonic()
                replica, outcome = read_stream(client, f"{base_url}/v1/completions", body,
                                               lambda replica: streaming_now.__setitem__(i, replica), pauses)
                streaming_now.pop(i, None)
                streams.append(Stream(replica, outcome, i != FIXED, start, time.monotonic(), *pauses[0]))

    threads = [threading.Thread(target=user) for _ in range(4)] + [
        threading.Thread(target=streamer, args=(i,)) for i in range(FIXED + 1)]
    for t in threads:
        t.start()
    time.sleep(5)
    # The replica of the stream that cannot be migrated, with a migratable one on it too if that comes.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = dict(streaming_now)
        if FIXED in now and any(r == now[FIXED] for i, r in now.items() if i != FIXED):
            break
        time.sleep(0.1)
    deadline = time.monotonic() + 30
    while FIXED not in streaming_now and time.monotonic() < deadline:
        time.sleep(0.1)
    victim = streaming_now[FIXED]
    ray.kill(ray.get_actor(actors[victim]["name"], namespace=actors[victim]["namespace"]), no_restart=True)
    killed_at.append(time.monotonic())
    # Keep the load on while Serve notices and HAProxy routes around the dead replica. HAProxy's own
    # counters start again at 0 when Serve reloads it with the new replica set: sampled every 15 s they
    # show what the old error-ratio rule saw.
    samples = []
    next_scrape = time.monotonic() + SCRAPE_S
    while time.monotonic() < killed_at[0] + 2 * SCRAPE_S:
        samples.append(server_aborts(app))
        if time.monotonic() >= next_scrape:
            scrapes.append(client_got(app, "502"))
            next_scrape += SCRAPE_S
        time.sleep(SCRAPE_S / 3)
    stop.set()
    for t in threads:
        t.join(timeout=150)
    time.sleep(3 * app.deployment.service.observability.metrics_report_interval_ms / 1000)
    scrapes.append(client_got(app, "502"))
    assert not any(t.is_alive() for t in threads), "a request hung after the replica died"
    after = [r for r in results if r[0] > killed_at[0]]
    failed = [r for r in results if r[1] != 200]
    hit = [s for s in streams if s.replica == victim and s.start < killed_at[0] < s.end]  # in flight at the kill
    migrated = [s for s in hit if s.migratable]
    cut = [s for s in streams if s.outcome == "error event"]
    broken = [s for s in streams if s.outcome not in ("done", "error event")]  # cut, or refused before streaming
    aborts = max(samples) - aborts_before
    counted = scrapes[-1] - scrapes[0]
    time.sleep(2)
    counted_migrated = migrations(app, "migrated") - migrated_before
    print(f"\nchaos: {len(results)} requests ({len(after)} after the kill), {len(failed)} failed; "
          f"{len(streams)} streams, {len(hit)} on the killed replica at the kill: {len(migrated)} migrated "
          f"(counted {counted_migrated:.0f}), client-visible gap {gaps(migrated)}; {len(cut)} cut "
          f"(error event + [DONE]), {len(broken)} broken; counted as 502 (scraped every {SCRAPE_S} s): "
          f"{counted:.0f}; HAProxy's own server aborts, sampled every {SCRAPE_S // 3} s: {aborts:.0f}")
    assert not failed, failed[:5]
    assert {r[2] for r in results if r[0] < killed_at[0]} == set(actors)  # both replicas served before
    assert len(after) >= 10 and victim not in {r[2] for r in after if r[0] > killed_at[0] + 1}  # the survivor took over
    assert all(s.outcome == "done" for s in streams if s.migratable), streams  # 0 cut, 0 broken among these
    assert [s for s in hit if not s.migratable] == cut and cut, streams  # the other: the error event
    assert not broken, broken
    assert counted_migrated == len(migrated), counted_migrated
    assert counted == len(cut), scrapes  # what the error-ratio rule and the error panel count
    assert all(a <= b for a, b in zip(scrapes, scrapes[1:])), scrapes  # survived the reload
    deadline = time.monotonic() + 420
    while llm_replicas(app_name).get("RUNNING") != 2:
        assert time.monotonic() < deadline, llm_replicas(app_name)
        time.sleep(2)
    print(f"chaos: back to 2 running replicas {time.monotonic() - killed_at[0]:.0f}s after the kill")
