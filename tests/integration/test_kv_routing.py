"""kv_aware on real engines, through HAProxy and the ingress router: each replica's vLLM publishes its KV
events, the router indexes them and predicts, per request, the prompt tokens the chosen engine will reuse;
the replica compares that with the engine's own count (usage.prompt_tokens_details.cached_tokens).

The app: 2 replicas whose KV cache holds 64 blocks of 32 tokens (2,048 tokens each) against a multi-turn chat
trace of about 16,000 prompt tokens, every prompt longer than the tiny model's 64-token window: blocks are
evicted all the time, and the sliding-window rule (two cached blocks before the hit's end suffice) decides
what is reusable."""

import asyncio
import time
from collections import Counter

import httpx
import pytest

from mistral_ray.bench import chat_trace
from mistral_ray.bench.load import drive
from mistral_ray.server.errors import REPLICA_HEADER
from tests.integration.conftest import deploy, extra_app
from tests.integration.test_routing import hits_and_queries

pytestmark = pytest.mark.integration
NAME = "kvaware"


@pytest.fixture(scope="module")
def kv_app(app):
    from ray import serve

    service = extra_app(app, NAME, router={"routing": {"policy": "kv_aware"}},
                        engine={"block_size": 32, "max_model_len": 1024, "extra_args": {"num_gpu_blocks_override": 64}})
    url = deploy(app, NAME, service)
    seen, deadline = set(), time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:  # both replicas in HAProxy's map (see test_routing)
        r = httpx.post(f"{url}/v1/completions", json={"model": service.model.name, "prompt": f"warm {len(seen)}",
                                                       "max_tokens": 1}, timeout=60)
        seen.add(r.headers.get(REPLICA_HEADER))
    # The router loads its tokenizer in a thread and subscribes to each replica's events as their reports
    # come in: until both are there it routes as prefix_affinity. Wait for its first prediction.
    deadline = time.monotonic() + 90
    while not _series(app, "ray_mistral_ray_kv_predictions_total", service.model.name):
        assert time.monotonic() < deadline, "no kv_aware prediction within 90 s"
        httpx.post(f"{url}/v1/chat/completions", json={"model": service.model.name, "max_tokens": 1,
                                                        "messages": [{"role": "user", "content": "warm " * 40}]},
                   timeout=60)
        time.sleep(1)
    time.sleep(2)
    try:
        yield url, service.model.name
    finally:
        serve.delete(NAME)


def _series(app, name: str, model: str) -> Counter:
    """Samples of one of our metrics for this app's model, summed by their `outcome`/`decision` label."""
    port = app.deployment.service.observability.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    found: Counter = Counter()
    for line in text.splitlines():
        if not line.startswith(name + "{") or (model and f'model="{model}"' not in line):
            continue
        labels = line[line.index("{") + 1:line.rindex("}")]
        label = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
        found[(label.get("outcome") or label.get("decision") or label.get("replica") or "").strip('"')] += float(
            line.rsplit(" ", 1)[1])
    return found


def test_predicted_cached_tokens_match_the_engines(app, kv_app):
    url, model = kv_app
    before = _series(app, "ray_mistral_ray_kv_predictions_total", model)
    hits0, queries0 = hits_and_queries(app, model)
    trace = chat_trace(model, sessions=16, turns=4, system_words=30, user_words=60, output_len=24, seed=5)
    replies, _ = asyncio.run(drive(url, trace, concurrency=4, progress=False))
    assert len(replies) == 64 and all(r.ok for r in replies), [r.error for r in replies if not r.ok][:3]
    time.sleep(4)  # two metrics report intervals
    after = _series(app, "ray_mistral_ray_kv_predictions_total", model)
    outcomes = {k: after[k] - before[k] for k in ("exact", "under", "over")}
    total = sum(outcomes.values())
    decisions = _series(app, "ray_mistral_ray_routing_decisions_total", "")
    hits, queries = hits_and_queries(app, model)
    held = _series(app, "ray_mistral_ray_kv_index_blocks", "")
    print(f"\nkv_aware, 64 chat turns on 2 replicas of 64 x 32-token blocks: predictions {outcomes}, "
          f"replicas {sorted(Counter(r.replica for r in replies).values())}, decisions {dict(decisions)}, "
          f"engine hit rate {(hits - hits0) / (queries - queries0):.1%} of {queries - queries0:.0f} prompt tokens, "
          f"index blocks {sorted(held.values())}")
    assert queries - queries0 > 4 * 2 * 64 * 32  # the prompts are several times what both caches hold
    assert hits > hits0  # and the engines did reuse: the exact predictions are not all zeros
    assert held and max(held.values()) <= 64  # each index is bounded by its engine's blocks
    assert total >= 0.9 * len(replies), outcomes  # nearly every request predicted (the first ones: no index yet)
    assert outcomes["exact"] >= 0.95 * total, outcomes
    assert decisions["kv"] > 0, decisions


def test_routers_read_the_engines_load_and_send_chats_ids_ahead(app, kv_app):
    """The routers rank on the engines' own step counts (their load snapshots arrive), and a plain chat's
    token ids reach the engine ahead of it, with the answer the engine gives when it tokenizes itself."""
    url, model = kv_app
    before = _series(app, "ray_mistral_ray_prompt_tokens_forwarded_total", model)
    chat = {"model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "system", "content": "answer in one line"}, {"role": "user", "content": ""}]}
    pairs = []
    for i in range(6):
        body = {**chat, "messages": [chat["messages"][0], {"role": "user", "content": f"question {i}: " + "why " * 30}]}
        # a cache_salt is a field the router does not render: that chat is tokenized by the engine
        own = httpx.post(f"{url}/v1/chat/completions", json={**body, "cache_salt": f"s{i}"}, timeout=60).json()
        sent = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
        pairs.append((own, sent))
    time.sleep(4)  # two metrics report intervals
    after = _series(app, "ray_mistral_ray_prompt_tokens_forwarded_total", model)
    used = after["used"] - before["used"]
    reports = sum(_series(app, "ray_mistral_ray_engine_load_reports_total", "").values())
    print(f"\nids sent ahead and used: {used:.0f} of 6 plain chats (missed {after['missed'] - before['missed']:.0f}); "
          f"engine load snapshots received by the routers: {reports:.0f}")
    for own, sent in pairs:
        assert sent["usage"]["prompt_tokens"] == own["usage"]["prompt_tokens"]
        assert sent["choices"][0]["message"]["content"] == own["choices"][0]["message"]["content"]
    assert used >= 5, (before, after)  # the first chat to a replica may find the router's pipe not up yet
    assert reports > 0
    from ray import serve

    from mistral_ray.options import LLM_DEPLOYMENT

    handle = serve.get_deployment_handle(LLM_DEPLOYMENT, app_name=NAME)
    handle._init(_run_router_in_separate_loop=True)
    links = [handle.info.remote().result(timeout_s=60)["router_link"] for _ in range(6)]
    print(f"replicas' links: {links}")
    # the engine's own step counts reached the link (not only heartbeats of an idle gate)
    assert any(link["engine_steps"] > 0 and link["most_running"] > 0 for link in links)


def test_window_hits_at_block_size_32_give_the_reference_tokens(app, kv_app):
    """The sliding-window rule at the block size it is tested with: a prompt of three windows (six 32-token
    blocks) served cold, then again from the engine's cache (vLLM reuses it by the window rule), both equal
    to HF transformers' greedy tokens with the window; without the window the reference differs."""
    from tests.integration.test_model_fidelity import NEW_TOKENS, hf_greedy, load_hf_model

    url, model = kv_app
    hf, tok = load_hf_model(app.deployment.service.model.resolved_source())
    window = hf.config.sliding_window
    text = " ".join(open(__file__).read().split())
    prompt_ids = tok(text)["input_ids"][: 3 * window]
    body = {"model": model, "prompt": prompt_ids, "max_tokens": NEW_TOKENS, "temperature": 0,
            "return_token_ids": True, "ignore_eos": True}
    cold, warm = (httpx.post(f"{url}/v1/completions", json=body, timeout=120).json() for _ in range(2))
    windowed = hf_greedy(hf, prompt_ids, window)
    cached = (warm["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")
    print(f"\nblock size 32: second pass reused {cached} of {len(prompt_ids)} prompt tokens")
    assert cold["choices"][0]["token_ids"] == windowed
    assert warm["choices"][0]["token_ids"] == windowed
    assert cached and cached >= 4 * 32  # a window-rule hit (the two blocks before the end suffice)
    assert hf_greedy(hf, prompt_ids, None) != windowed, "the window did not matter for this prompt"
