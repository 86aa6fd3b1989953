"""The official `openai` client against the served app: every call a user makes, and every error."""

import json

import httpx
import openai
import pytest

from mistral_ray.server.errors import REPLICA_HEADER

pytestmark = pytest.mark.integration
CHAT = [{"role": "user", "content": "Explain attention in one sentence."}]


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_models_list(client, model_name, app):
    models = client.models.list()  # vLLM's own answer, as `vllm serve` gives it
    assert [m.id for m in models.data] == [model_name]
    assert models.data[0].max_model_len == app.deployment.service.engine.max_model_len


def test_chat(client, model_name):
    r = client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 12
    # The chat template ran: [INST] ... [/INST] around the user text, plus BOS.
    assert r.usage.prompt_tokens > len("Explain attention in one sentence.".split())


def test_chat_stream_matches_unary(client, model_name):
    kwargs = dict(model=model_name, messages=CHAT, max_tokens=16, temperature=0)
    unary = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) >= 8  # tokens arrive one by one, not as one blob
    assert text == unary
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_unary_and_stream(client, model_name):
    kwargs = dict(model=model_name, prompt="The quick brown fox", max_tokens=10, temperature=0)
    unary = client.completions.create(**kwargs)
    assert unary.usage.completion_tokens == 10
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == unary.choices[0].text


def test_stream_usage_option(client, model_name):
    chunks = list(client.completions.create(
        model=model_name, prompt="Ray", max_tokens=5, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[-1].usage.completion_tokens == 5


def test_n_choices(client, model_name):
    r = client.completions.create(model=model_name, prompt="Ray Serve", max_tokens=8, n=2, temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 16


def test_seeded_sampling_is_reproducible(client, model_name):
    def sample(seed):
        return client.completions.create(
            model=model_name, prompt="Once upon a time", max_tokens=24, temperature=1.0, seed=seed
        ).choices[0].text

    # Requests land on either replica: the seed, not the replica, decides the tokens.
    first = [sample(1234) for _ in range(4)]
    assert len(set(first)) == 1
    assert sample(99) != first[0]


def test_greedy_is_deterministic(client, model_name):
    outs = {
        client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=20, temperature=0)
        .choices[0].message.content
        for _ in range(4)
    }
    assert len(outs) == 1


def test_stop_sequences_and_logprobs(client, model_name):
    base = client.completions.create(model=model_name, prompt="Numbers:", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text[3:6]
    r = client.completions.create(
        model=model_name, prompt="Numbers:", max_tokens=12, temperature=0, stop=[stop], logprobs=2
    )
    assert r.choices[0].finish_reason == "stop" and stop not in r.choices[0].text
    assert len(r.choices[0].logprobs.top_logprobs[0]) == 2


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="gpt-4", messages=CHAT, max_tokens=4)
    err = error_of(exc.value)
    assert err["param"] == "model" and "gpt-4" in err["message"]


@pytest.mark.parametrize("max_tokens", [0, -1])
def test_non_positive_max_tokens_is_400(client, model_name, max_tokens):
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=model_name, prompt="hi", max_tokens=max_tokens)
    assert error_of(exc.value)["param"] == "max_tokens"


def test_prompt_plus_max_tokens_beyond_context_is_400(client, model_name, app):
    limit = app.deployment.service.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_name, messages=CHAT, max_tokens=limit - 5)
    err = error_of(exc.value)
    assert "maximum context length" in err["message"] and err["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as exc:  # the prompt alone is too long
        client.completions.create(model=model_name, prompt="attention " * (2 * limit), max_tokens=1)
    assert "maximum context length" in error_of(exc.value)["message"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "tiny-mistral", "messages": [',  # malformed JSON
        b'["not", "an", "object"]',
        b'{"model": "tiny-mistral", "messages": "hello"}',  # wrong type
        b'{"model": "tiny-mistral", "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}',
        b'{"model": "tiny-mistral", "messages": [{"role": "user", "content": "x"}], "temperature": -3}',
    ],
)
def test_bad_bodies_are_400(base_url, body):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_unknown_route_is_openai_404(base_url):
    r = httpx.get(f"{base_url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_health_and_ready(base_url):
    assert httpx.get(f"{base_url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{base_url}/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_still_serving_after_errors(client, model_name):
    r = client.completions.create(model=model_name, prompt="still here?", max_tokens=3)
    assert r.usage.completion_tokens == 3


def test_both_replicas_serve(client, model_name, app):
    assert app.deployment.service.scaling.min_replicas == 2
    seen = set()
    for _ in range(24):
        raw = client.completions.with_raw_response.create(model=model_name, prompt="hi", max_tokens=1)
        seen.add(raw.headers[REPLICA_HEADER])
    assert len(seen) == 2, seen


def test_stream_carries_replica_header(base_url, model_name):
    body = {"model": model_name, "prompt": "hi", "max_tokens": 2, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers[REPLICA_HEADER]
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["object"] == "text_completion"
