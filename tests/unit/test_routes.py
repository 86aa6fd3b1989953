"""The route table against vLLM's own app: a route vLLM registers is either served (with its checks) or
refused with a reason, so a vLLM upgrade that adds a route fails here until someone decides."""

from mistral_ray.server.routes import REFUSED, ROUTES, route_of


def vllm_routes() -> set[str]:
    """Every path vLLM's OpenAI app registers for a generative model, as `vllm serve` builds it."""
    from vllm.entrypoints.launchers.app import build_app

    from mistral_ray.config import load_deployment
    from mistral_ray.engine.vllm_engine import server_args
    from mistral_ray.options import vllm_args
    from tests.conftest import LOCAL_CPU

    app = build_app(server_args(vllm_args(load_deployment(LOCAL_CPU).service)), supported_tasks=("generate",),
                    model_config=None)
    return {route.path for route in app.routes}


def test_every_vllm_route_is_served_or_refused():
    paths = vllm_routes()
    undecided = paths - set(ROUTES) - set(REFUSED)
    assert not undecided, f"vLLM serves routes the table does not decide: {sorted(undecided)}"
    assert not set(ROUTES) & set(REFUSED)
    # no stale entry: what we serve, vLLM has (/ready is our own), and what we refuse, vLLM still registers
    assert set(ROUTES) - paths == {"/ready"} and set(REFUSED) <= paths


def test_default_deny():
    assert route_of("POST", "/v1/chat/completions")[0].generation
    assert route_of("POST", "/invocations") == (route_of("GET", "/nowhere")[0], 404)
    assert route_of("GET", "/v1/chat/completions")[1] == 405
    assert route_of("POST", "/v1/models")[1] == 405
    assert all(route_of("GET", p)[1] == 404 for p in REFUSED if "{" not in p)


def test_every_generation_route_has_vllm_s_reading():
    from mistral_ray.engine.requests import READERS

    generation = {r.label for methods in ROUTES.values() for r in methods.values() if r.generation}
    assert generation == set(READERS)
