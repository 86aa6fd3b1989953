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


def test_cpu_dev_serve_config_serves(app, base_url, tmp_path):
    from ray import serve

    objs = kustomize(PROJECT_ROOT / "k8s" / "overlays" / "cpu-dev")
    rayservice = next(o for o in objs if o["kind"] == "RayService")
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    (application,) = serve_config["applications"]
    assert application["import_path"] == "mistral_ray.app:build_app"
    # On the cluster the keys file is the mounted Secret; here a file with the same format.
    keys = application["args"]["router"]["api_keys"]
    assert keys["enabled"] is True
    keys_file = tmp_path / "keys"
    keys_file.write_text("ci-team:sk-test-0123456789\n")
    keys["file"] = str(keys_file)
    # What KubeRay does with it: build the application from import_path + args and run it (here beside
    # the test app, under its own name and route prefix, on the same local cluster).
    serve.run(build_app(application["args"]), name="cpu-dev", route_prefix="/cpu-dev", blocking=False)
    try:
        launcher.wait_ready(f"{base_url}/cpu-dev", timeout_s=300)
        model = application["args"]["model"]["name"]
        for wrong in ["unused", "sk-test-012345678"]:
            intruder = openai.OpenAI(base_url=f"{base_url}/cpu-dev/v1", api_key=wrong, max_retries=0)
            with pytest.raises(openai.AuthenticationError) as exc:
                intruder.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
            assert exc.value.response.json()["error"]["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                intruder.models.list()
        client = openai.OpenAI(base_url=f"{base_url}/cpu-dev/v1", api_key="sk-test-0123456789", max_retries=0)
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=5
        )
        assert r.usage.completion_tokens == 5
        assert [m.id for m in client.models.list().data] == [model]
    finally:
        serve.delete("cpu-dev")
