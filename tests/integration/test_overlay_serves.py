"""The cpu-dev overlay's serveConfigV2, exactly as kustomize renders it for the RayService, serves on a
real Ray cluster: the cluster config is not a paper config."""

import openai
import pytest
import yaml

from mistral_ray import launcher
from mistral_ray.app import build_app
from mistral_ray.config import PROJECT_ROOT
from tests.k8s.schemas import kustomize

pytestmark = pytest.mark.integration


def test_cpu_dev_serve_config_serves(app, base_url):
    from ray import serve

    objs = kustomize(PROJECT_ROOT / "k8s" / "overlays" / "cpu-dev")
    rayservice = next(o for o in objs if o["kind"] == "RayService")
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "mistral_ray.app:build_app"
    # What KubeRay does with it: build the application from import_path + args and run it (here beside
    # the test app, under its own name and route prefix, on the same local cluster).
    serve.run(build_app(application["args"]), name="cpu-dev", route_prefix="/cpu-dev", blocking=False)
    try:
        launcher.wait_ready(f"{base_url}/cpu-dev", timeout_s=300)
        client = openai.OpenAI(base_url=f"{base_url}/cpu-dev/v1", api_key="unused", max_retries=0)
        model = application["args"]["model"]["name"]
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
        assert r.usage.completion_tokens == 5
        assert [m.id for m in client.models.list().data] == [model]
    finally:
        serve.delete("cpu-dev")
