"""The gate holds on every route, for every encoding vLLM accepts: an app of its own with API keys on and
small limits (max_n 2, max_tokens 32, max_prompt_tokens 100, 40 requests/min), driven by httpx and the
official openai client. Each case here was served by the old gate (its allow-list of three paths and its
checks on raw JSON types)."""

import threading
import time

import json
from collections import Counter

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistral_ray.server.routes import REFUSED
from tests.integration.conftest import keyed_app

pytestmark = pytest.mark.integration

NAME = "gate"
KEYS = {"sizes": "sk-gate-sizes-00001", "rate": "sk-gate-rate-000002", "fuzz": "sk-gate-fuzz-000003",
        "forge": "sk-gate-forge-00004"}
LIMITS = dict(max_n=2, max_tokens=32, max_prompt_tokens=100, requests_per_minute=40)
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def gated(app, tmp_path_factory):
    with keyed_app(app, NAME, KEYS, tmp_path_factory.mktemp("keys"), limits=LIMITS) as served:
        yield served


def post(url, path, body, key="sizes"):
    headers = {"Authorization": f"Bearer {KEYS[key]}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def refused(r, status, param=None):
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_numbers_sent_as_strings_or_floats_are_judged_as_vllm_reads_them(gated):
    url, model = gated
    refused(post(url, "/v1/chat/completions", {"model": model, "messages": USER, "n": "5", "max_tokens": 2}),
            400, "n")
    refused(post(url, "/v1/completions", {"model": model, "prompt": "x", "n": 5.0, "max_tokens": 2}), 400, "n")
    refused(post(url, "/v1/chat/completions", {"model": model, "messages": USER, "max_tokens": "1000"}),
            400, "max_tokens")
    refused(post(url, "/v1/responses", {"model": model, "input": "x", "max_output_tokens": "33"}),
            400, "max_output_tokens")
    ok = post(url, "/v1/completions", {"model": model, "prompt": "x", "n": "2", "max_tokens": "3"})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2  # within the limits, however encoded


def test_max_tokens_is_a_cap_when_absent(gated):
    url, model = gated
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS["sizes"], max_retries=0, timeout=120)
    r = client.chat.completions.create(model=model, messages=USER, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 32 and r.choices[0].finish_reason == "length"
    r = client.responses.create(model=model, input="Say something.", extra_body={"ignore_eos": True})
    assert r.usage.output_tokens == 32


def test_every_generation_route_has_the_prompt_limit(gated):
    url, model = gated
    words = "word " * 400
    refused(post(url, "/v1/responses", {"model": model, "input": words, "max_output_tokens": 4}), 400, "input")
    refused(post(url, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": words}],
                                               "max_tokens": 4}), 400, "messages")
    refused(post(url, "/v1/messages", {"model": model, "max_tokens": 4,
                                       "messages": [{"role": "user", "content": words}]}), 400)
    # a batch: every prompt is judged, not the first
    refused(post(url, "/v1/completions", {"model": model, "prompt": ["short", words], "max_tokens": 4}), 400, "prompt")


def test_anthropic_messages_are_served_with_every_check(gated):
    url, model = gated
    r = post(url, "/v1/messages", {"model": model, "max_tokens": 5,
                                   "messages": [{"role": "user", "content": "Hello"}]})
    assert r.status_code == 200 and r.json()["type"] == "message" and r.json()["usage"]["output_tokens"] == 5
    refused(post(url, "/v1/messages", {"model": model, "max_tokens": "500", "messages": USER}), 400, "max_tokens")
    refused(post(url, "/v1/messages", {"model": model, "max_tokens": 5, "messages": USER}, key=None), 401)
    assert post(url, "/v1/messages/count_tokens", {"model": model, "messages": USER}).status_code == 200


def test_routes_outside_the_table_are_404_with_a_valid_key(gated):
    url, model = gated
    body = {"model": model, "prompt": "x", "n": 50, "messages": USER, "max_tokens": 2}
    refused(post(url, "/invocations", body), 404)
    for path in REFUSED:
        path = path.replace("{response_id}", "resp_1")
        for method in ("GET", "POST"):
            r = httpx.request(method, f"{url}{path}", json=body, timeout=30,
                              headers={"Authorization": f"Bearer {KEYS['sizes']}"})
            assert r.status_code in (404, 405), (method, path, r.status_code)
            assert r.json()["error"]["type"] in ("not_found_error", "invalid_request_error")


def test_probes_are_open_and_nothing_else_is(gated):
    url, _ = gated
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
    refused(httpx.get(f"{url}/version", timeout=10), 401)
    assert httpx.get(f"{url}/ping", timeout=10).status_code == 404
    assert httpx.get(f"{url}/version", headers={"Authorization": f"Bearer {KEYS['sizes']}"}, timeout=10
                     ).status_code == 200


def test_a_websocket_is_refused(gated):
    url, _ = gated
    r = httpx.get(f"{url}/v1/realtime", timeout=10, headers={
        "Authorization": f"Bearer {KEYS['sizes']}", "Connection": "Upgrade", "Upgrade": "websocket",
        "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code != 101 and r.status_code >= 400


def test_one_key_s_rate_holds_across_every_route(gated):
    url, model = gated
    routes = [("/v1/messages", {"model": model, "max_tokens": 1, "messages": USER}),
              ("/invocations", {"model": model, "prompt": "x", "max_tokens": 1}),
              ("/v1/chat/completions/batch", {"model": model, "messages": [USER], "max_tokens": 1}),
              ("/v1/chat/completions", {"model": model, "messages": USER, "max_tokens": 1}),
              ("/v1/completions", {"model": model, "prompt": "x", "max_tokens": 1}),
              ("/v1/responses", {"model": model, "input": "x", "max_output_tokens": 1})]
    statuses, lock = [], threading.Lock()

    def send(i):
        path, body = routes[i % len(routes)]
        status = post(url, path, body, key="rate").status_code
        with lock:
            statuses.append((path, status))

    start = time.monotonic()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(55)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(statuses) == 55
    assert all(s == 404 for p, s in statuses if p in ("/invocations", "/v1/chat/completions/batch"))
    served = [p for p, s in statuses if s == 200]
    assert {p for p in served} == {"/v1/messages", "/v1/chat/completions", "/v1/completions", "/v1/responses"}
    while len(served) < 80 and post(url, "/v1/completions", routes[4][1], key="rate").status_code == 200:
        served.append("/v1/completions")
    # A bucket of 40 for every route together, refilled at 40/min while the requests ran.
    assert 40 <= len(served) <= 40 + int((time.monotonic() - start) / 1.5) + 1, len(served)


def test_a_client_cannot_forge_the_retry_id_that_makes_a_request_free(gated):
    url, model = gated
    body = {"model": model, "prompt": "x", "max_tokens": 1}
    start, served = time.monotonic(), 0
    while served < 90:  # each id sent twice, as a retry would be: HAProxy replaces it, so each is charged
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=60, headers={
            "Authorization": f"Bearer {KEYS['forge']}", "x-mistral-ray-request-id": f"forged-{served // 2}"})
        if r.status_code != 200:
            break
        served += 1
    assert r.status_code == 429
    assert 40 <= served <= 40 + int((time.monotonic() - start) / 1.5) + 1, served


def test_responses_beyond_the_context_are_400_on_the_session_app(base_url, model_name):
    r = httpx.post(f"{base_url}/v1/responses", json={"model": model_name, "input": "word " * 100,
                                                     "max_output_tokens": 2040}, timeout=60)
    err = refused(r, 400, "max_output_tokens")
    assert "maximum context length is 2048" in err["message"]


def confused(limit: int):
    """An integer field's value in every encoding pydantic's lax mode reads as a number, within or beyond
    `limit`, and junk beside."""
    n = st.integers(min_value=-2, max_value=limit * 40)
    return st.one_of(n, n.map(str), n.map(float), n.map(lambda v: f" {v} "), st.booleans(), st.none(),
                     st.lists(n, max_size=3), st.just("1e3"), st.just(10**30), st.just(str(10**30)))


PROMPTS = st.one_of(st.just("x"), st.lists(st.just("y"), min_size=1, max_size=80),
                    st.lists(st.integers(0, 100), min_size=1, max_size=5),
                    st.lists(st.lists(st.integers(0, 100), min_size=1, max_size=3), min_size=1, max_size=40))
FIELDS = {"n": confused(2), "max_tokens": confused(32), "max_completion_tokens": confused(32),
          "max_output_tokens": confused(32), "stream": st.one_of(st.booleans(), st.just("true"), st.just(1)),
          "ignore_eos": st.just(True), "prompt": PROMPTS}
BASE = {"/v1/chat/completions": {"messages": USER}, "/v1/completions": {"prompt": "x"},
        "/v1/responses": {"input": "x"}, "/v1/messages": {"messages": USER, "max_tokens": 4},
        "/v1/messages/count_tokens": {"messages": USER}, "/tokenize": {"prompt": "x"},
        "/detokenize": {"tokens": [1, 2]}}


@st.composite
def confused_request(draw):
    path = draw(st.sampled_from(sorted(BASE)))
    body = {**BASE[path], **{f: draw(FIELDS[f]) for f in draw(st.lists(st.sampled_from(sorted(FIELDS)),
                                                                        min_size=1, max_size=4, unique=True))}}
    return path, body


def prompts_of(path: str, body: dict) -> int:
    """How many prompts vLLM runs for this body: a completions batch has one per entry."""
    prompt = body.get("prompt") if path == "/v1/completions" else None
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def within_limits(path: str, body: dict, answer: str) -> None:
    """A 2xx answer (JSON or SSE) runs no more sequences than n <= 2 per prompt and no more than 32
    completion tokens per sequence."""
    events = [json.loads(line[6:]) for line in answer.splitlines() if line.startswith("data: {")] or \
        [json.loads(answer)]
    usage = next((e.get("usage") or e.get("response", {}).get("usage") for e in reversed(events)
                  if e.get("usage") or (e.get("response") or {}).get("usage")), None) or {}
    sequences = 2 * prompts_of(path, body)
    choices = {c.get("index", 0) for e in events for c in e.get("choices") or []}
    assert len(choices) <= sequences, (len(choices), sequences)
    assert usage.get("completion_tokens", usage.get("output_tokens", 0)) <= 32 * max(1, len(choices)), usage
    chunks = Counter(c.get("index", 0) for e in events if len(events) > 1 for c in e.get("choices") or [])
    assert all(count <= 32 + 2 for count in chunks.values()), chunks  # a stream: a chunk per token (+ role, end)


def test_type_confused_bodies_on_every_served_route(gated):
    url, model = gated
    seen = Counter()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=confused_request())
    def fuzz(request):
        path, body = request
        r = httpx.post(f"{url}{path}", json={"model": model, **body}, timeout=120,
                       headers={"Authorization": f"Bearer {KEYS['fuzz']}"})
        seen[(path, r.status_code)] += 1
        assert r.status_code < 500, (path, body, r.status_code, r.text[:300])
        if r.status_code < 300 and path in ("/v1/chat/completions", "/v1/completions", "/v1/responses",
                                            "/v1/messages"):
            within_limits(path, body, r.text)
        elif r.status_code >= 400:
            assert r.json()["error"]["message"]

    fuzz()
    print(f"\nfuzz on every route: {dict(sorted(seen.items()))}")
    assert post(url, "/v1/completions", {"model": model, "prompt": "alive?", "max_tokens": 2}).status_code == 200
