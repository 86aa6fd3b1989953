"""Engine bugs are 500s, never the client's 400 (vLLM's serving layer answers a TypeError with 400)."""

import asyncio

import httpx
from fastapi import FastAPI

from mistral_ray.engine.vllm_engine import ENGINE_FAULTS, _fault_handler, _faults_are_500
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response


class Serving:
    """Stands in for vLLM's serving classes: the same create_error_response they use."""

    create_error_response = staticmethod(create_error_response)


def test_serving_errors_from_engine_bugs_are_500_and_client_errors_stay_400():
    serving = Serving()
    assert create_error_response(TypeError("x")).error.code == 400  # what vLLM does
    _faults_are_500(serving)
    for bug in (TypeError("unsupported operand"), KeyError("k"), AttributeError("a"), IndexError("i")):
        err = serving.create_error_response(bug).error
        assert (err.code, err.type) == (500, "InternalServerError")
    assert serving.create_error_response(ValueError("max_tokens must be at least 1")).error.code == 400
    assert serving.create_error_response("bad request", param="n").error.param == "n"


def test_engine_bugs_that_reach_the_app_are_500():
    app = FastAPI()

    @app.get("/boom")
    def boom():
        return 1 + "x"  # a TypeError from inside the engine's code

    for fault in ENGINE_FAULTS:
        app.add_exception_handler(fault, _fault_handler)

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            return await client.get("/boom")

    r = asyncio.run(go())
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
