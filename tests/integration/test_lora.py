"""LoRA adapters on real engines, through HAProxy with the openai client: each adapter is a `model`, listed
with its parent; its greedy answer is the merged weights' answer; the adapter list changes by deploying the
LLM deployment's user_config again, in place (same replicas), and a removed adapter's running request ends
as if nothing happened."""

import threading

import openai
import pytest

from mistral_ray import launcher
from mistral_ray.config import AdaptersConfig, parse_service
from mistral_ray.options import LLM_DEPLOYMENT
from mistral_ray.server.errors import REPLICA_HEADER

NAME = "lora"
NEW_TOKENS = 16


KEYS = {"team-a": "sk-team-a-0123456789", "team-b": "sk-team-b-0123456789"}


def _adapters(root, *names, **sources):
    """AdaptersConfig of tiny adapters under `root` (built by the replicas), plus `sources` as given, plus
    `ft-b`, team-b's own (an allow-list of one key)."""
    adapters = {n: {"source": str(root / n), "build_tiny": True} for n in names}
    adapters.update({n: {"source": s} for n, s in sources.items()})
    adapters["ft-b"] = {"source": str(root / "ft-b"), "build_tiny": True, "keys": ["team-b"]}
    return AdaptersConfig.model_validate({"adapters": adapters})


def _client(url, key_id):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[key_id], max_retries=0, timeout=120)


def _as(client, key_id):
    """The same app's client with another key."""
    return _client(str(client.base_url).rstrip("/").removesuffix("/v1"), key_id)


def _replica_ids() -> set[str]:
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()["applications"][NAME]["deployments"][LLM_DEPLOYMENT]
    return {r["replica_id"] for r in details["replicas"] if r["state"] == "RUNNING"}


@pytest.fixture(scope="module")
def lora(app, tmp_path_factory):
    """An app beside the session app: LoRA on (2 slots), adapters ft-1 and ft-2 and team-b's ft-b, API keys
    on (the tests call as team-a unless they say otherwise); deleted after."""
    from ray import serve

    root = tmp_path_factory.mktemp("adapters")
    keys = root / "keys"
    keys.write_text("".join(f"{kid}:{key}\n" for kid, key in KEYS.items()))
    args = app.deployment.service.model_dump()
    args["router"]["api_keys"] = {"enabled": True, "file": str(keys)}
    args["model"]["name"] = f"tiny-mistral-{NAME}"
    args["scaling"]["replica_cpus"] = 0.1
    args["engine"]["lora"] = {"max_loras": 2, "max_lora_rank": 8}
    dep = app.deployment.model_copy(update={"app_name": NAME, "route_prefix": f"/{NAME}",
                                            "service": parse_service(args), "live": _adapters(root, "ft-1", "ft-2")})
    launcher.deploy(dep, timeout_s=420)
    url = f"{app.base_url}/{NAME}"
    launcher.wait_ready(url, timeout_s=120)
    try:
        yield dep, root, _client(url, "team-a")
    finally:
        serve.delete(NAME)


def _greedy(client, model, prompt, n=NEW_TOKENS):
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    return r.choices[0].token_ids


def test_models_lists_the_base_and_its_adapters(lora):
    dep, _, client = lora
    base = dep.service.model.name
    for _ in range(4):  # each request goes to one of the two replicas: every one lists the same
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {base, "ft-1", "ft-2"}  # not team-b's own
        assert cards["ft-1"].parent == base and cards["ft-2"].parent == base
    assert {m.id for m in _as(client, "team-b").models.list().data} == {base, "ft-1", "ft-2", "ft-b"}


def test_each_adapter_answers_as_itself(lora):
    dep, _, client = lora
    prompt = "The quick brown fox jumps over the lazy dog"
    answers = {m: _greedy(client, m, prompt) for m in (dep.service.model.name, "ft-1", "ft-2")}
    assert len({tuple(a) for a in answers.values()}) == 3, answers
    assert _greedy(client, "ft-1", prompt) == answers["ft-1"]  # from either replica, loaded or not
    chat = client.chat.completions.create(model="ft-2", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "ft-2" and chat.choices[0].message.content is not None


def test_unknown_and_not_allowed_adapters_are_404(lora):
    _, _, client = lora
    for name in ("ft-9", "ft-b"):  # ft-b exists, for team-b only: team-a cannot tell it from a missing one
        with pytest.raises(openai.NotFoundError) as err:
            client.completions.create(model=name, prompt="hi", max_tokens=2)
        assert err.value.body["code"] == "model_not_found" and name in err.value.body["message"]
    assert len(_greedy(_as(client, "team-b"), "ft-b", "hello")) == NEW_TOKENS


def test_adapter_answers_as_its_merged_weights(lora):
    """ft-1 served by vLLM's LoRA kernels gives the greedy tokens of transformers' Mistral with W + a/r B@A."""
    from mistral_ray import tiny_adapters
    from tests.integration.test_model_fidelity import hf_greedy, load_hf_model

    dep, _, client = lora
    model, tok = load_hf_model(dep.service.model.resolved_source())
    window = model.config.sliding_window
    prompt_ids = tok(" ".join(open(__file__).read().split()))["input_ids"][:100]
    base = hf_greedy(model, prompt_ids, window)
    tiny_adapters.merged(model, "ft-1")
    assert _greedy(client, "ft-1", prompt_ids, len(base)) == hf_greedy(model, prompt_ids, window)
    assert hf_greedy(model, prompt_ids, window) != base, "the adapter did not change the answer: proves nothing"


def test_an_adapters_requests_go_to_the_replica_holding_it(lora):
    """Base requests spread by load; ft-1 and ft-2, a quarter of the traffic each, stay on one replica each
    (the one that loaded it first), as the adapter policy's share rule says."""
    dep, _, client = lora
    seen: dict[str, list] = {}
    for _ in range(12):
        for model in (dep.service.model.name, dep.service.model.name, "ft-1", "ft-2"):
            r = client.completions.with_raw_response.create(model=model, prompt="route me", max_tokens=2)
            seen.setdefault(model, []).append(r.headers[REPLICA_HEADER])
    assert len(set(seen["ft-1"])) == 1 and len(set(seen["ft-2"])) == 1, seen
    assert len(set(seen[dep.service.model.name])) == 2, seen  # the base model uses both


def test_metrics_carry_the_adapter(lora, app):
    """The requests above, by adapter, on the node's metrics port (pushed every second in this session)."""
    import time

    import httpx

    port = app.deployment.service.observability.metrics_export_port
    wanted = ('mistral_ray_adapter_loads_total{', 'model="ft-1"')
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        loads = [l for l in text.splitlines() if l.startswith("ray_" + wanted[0]) and wanted[1] in l]
        done = [l for l in text.splitlines() if l.startswith("ray_mistral_ray_requests_total{")
                and 'model="ft-2"' in l and 'status="200"' in l]
        if loads and done:
            break
        time.sleep(1)
    assert loads and float(loads[0].rsplit(" ", 1)[1]) >= 1, "no adapter load counted for ft-1"
    assert done, "no request counted under the adapter's name"


def test_a_deploy_changes_adapters_in_place(lora):
    """ft-1 out, ft-3 in, two bad adapters (no directory; no weights): same replicas; ft-1's running stream
    ends whole; ft-3 answers; the bad ones are not served and nothing else is lost."""
    dep, root, client = lora
    before = _replica_ids()
    assert len(before) == 2
    result, first = {}, threading.Event()

    def stream():
        chunks = client.completions.create(model="ft-1", prompt="Once upon a time", max_tokens=1000,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True},
                                           stream_options={"include_usage": True})
        text, finish, usage = [], None, None
        for c in chunks:
            first.set()
            if c.choices:
                text.append(c.choices[0].text)
                finish = c.choices[0].finish_reason or finish
            usage = c.usage or usage
        result.update(text="".join(text), finish=finish, tokens=usage and usage.completion_tokens)

    running = threading.Thread(target=stream)
    running.start()
    assert first.wait(60)
    hollow = root / "hollow"  # a config vLLM's checks pass, and no weights: the engine's load fails
    hollow.mkdir(exist_ok=True)
    (hollow / "adapter_config.json").write_text((root / "ft-1" / "adapter_config.json").read_text())
    live = _adapters(root, "ft-2", "ft-3", broken=str(root / "missing"), hollow=str(hollow))
    launcher.deploy(dep.model_copy(update={"live": live}), timeout_s=180)
    assert running.is_alive(), "the stream ended before ft-1 was removed: the test proves nothing"
    running.join(180)
    assert result.get("finish") == "length" and result["tokens"] == 1000, result

    base = dep.service.model.name
    for _ in range(4):
        assert {m.id for m in client.models.list().data} == {base, "ft-2", "ft-3"}
    for gone in ("ft-1", "broken", "hollow"):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model=gone, prompt="hi", max_tokens=2)
    assert len(_greedy(client, "ft-3", "hello")) == NEW_TOKENS
    assert _replica_ids() == before  # reconfigured, not restarted
