"""Mid-stream migration on real engines: the replica serving a greedy stream is killed mid-answer and the
stream guard continues it on the other replica. The client (the official openai client) reads one stream
whose text is token for token the text of the same request served without a kill, with one id, one role
delta, the right finish reason and usage summing both parts; the surviving replica counts the migration.
A stream that cannot be continued exactly (n > 1) ends with OpenAI's error event, and is counted as such."""

import threading
import time

import httpx
import pytest

from mistral_ray.server.errors import REPLICA_HEADER
from tests.integration.test_chaos import llm_replicas, migrations

pytestmark = pytest.mark.integration

KILL_AFTER = 12  # content events the client reads before its replica is killed


def _actors(app) -> dict:
    import ray

    name = app.deployment.app_name
    return {a["name"].rsplit("#", 1)[-1]: a for a in ray.util.list_named_actors(all_namespaces=True)
            if f"{name}#LLMServer#" in a["name"]}


def _kill(actor: dict) -> None:
    import ray

    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


def _two_running(app, timeout_s: float = 420) -> None:
    deadline = time.monotonic() + timeout_s
    while llm_replicas(app.deployment.app_name).get("RUNNING") != 2 or len(_actors(app)) != 2:
        assert time.monotonic() < deadline, llm_replicas(app.deployment.app_name)
        time.sleep(2)


def _read(client, route: str, body: dict, kill=None) -> dict:
    """The stream as the openai client gives it: text, ids, role deltas, finish reasons, usage, replica."""
    create = client.chat.completions if route == "chat" else client.completions
    raw = create.with_raw_response.create(**body, stream=True, stream_options={"include_usage": True})
    replica = raw.headers.get(REPLICA_HEADER)
    out = {"replica": replica, "text": "", "ids": set(), "roles": 0, "finish": [], "usage": None, "events": 0}
    for chunk in raw.parse():
        out["ids"].add(chunk.id)
        if chunk.usage is not None:
            out["usage"] = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens)
        for choice in chunk.choices:
            piece = choice.delta.content if route == "chat" else choice.text
            if route == "chat" and choice.delta.role:
                out["roles"] += 1
            out["text"] += piece or ""
            if choice.finish_reason:
                out["finish"].append(choice.finish_reason)
            out["events"] += 1
            if kill is not None and out["events"] == KILL_AFTER:
                kill(replica)
    return out


def _counted(app, outcome: str, before: float, timeout_s: float = 30) -> float:
    deadline = time.monotonic() + timeout_s
    while (now := migrations(app, outcome)) <= before and time.monotonic() < deadline:
        time.sleep(1)
    return now


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_greedy_stream_whose_replica_dies_reads_as_if_it_had_not(app, client, model_name, route):
    _two_running(app)
    body = {"model": model_name, "max_tokens": 160, "temperature": 0, "extra_body": {"ignore_eos": True}}
    body.update({"messages": [{"role": "user", "content": "Tell me about the sliding window."}]} if route == "chat"
                else {"prompt": "The sliding window of Mistral"})
    reference = _read(client, route, body)
    assert len(reference["text"]) > 0 and reference["usage"][1] == 160
    actors, killed = _actors(app), []
    before = migrations(app, "migrated")

    def kill(replica):
        killed.append((replica, time.monotonic()))
        _kill(actors[replica])

    migrated = _read(client, route, body, kill=kill)
    print(f"\nmigration ({route}): killed {killed[0][0]} after {KILL_AFTER} events; "
          f"{migrated['events']} events, text equal: {migrated['text'] == reference['text']}")
    assert killed and killed[0][0] == migrated["replica"]
    assert migrated["text"] == reference["text"]  # token for token: nothing repeated, nothing lost
    assert len(migrated["ids"]) == 1 and migrated["roles"] == (1 if route == "chat" else 0)
    assert migrated["finish"] == reference["finish"] == ["length"]
    assert migrated["usage"] == reference["usage"]  # both parts, the first part's tokens as completion
    assert _counted(app, "migrated", before) == before + 1  # the survivor counted it
    _two_running(app)  # Serve replaced the killed replica


def test_a_stream_that_cannot_be_continued_ends_with_the_error_event(app, base_url, model_name):
    _two_running(app)
    actors = _actors(app)
    before = migrations(app, "not_possible")
    body = {"model": model_name, "prompt": "two at once", "max_tokens": 300, "ignore_eos": True, "stream": True,
            "n": 2}
    events, lost, killed, last = 0, False, threading.Event(), None
    with httpx.Client(timeout=120) as http, http.stream("POST", f"{base_url}/v1/completions", json=body) as r:
        assert r.headers.get("x-mistral-ray-migrate") is None  # the replica's word to the guard only
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events += 1
                lost |= '"replica_lost"' in line
                if events == KILL_AFTER and not killed.is_set():
                    killed.set()
                    _kill(actors[r.headers[REPLICA_HEADER]])
            assert not line.startswith(":")  # no mark reaches a client
            last = line or last
        assert last == "data: [DONE]"
    assert lost  # OpenAI's error event, then [DONE]
    assert _counted(app, "not_possible", before) == before + 1
    _two_running(app)
