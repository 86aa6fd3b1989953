"""Routes `vllm serve` has beyond chat and completions, through HAProxy and the replica's gate, with the
official openai client where it speaks them: the Responses API, tokenize/detokenize, structured output,
a forced tool call."""

import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.integration

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Weather for a trip?"}]


def test_responses_api(client, model_name):
    r = client.responses.create(model=model_name, input="Say something.", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.output_text
    assert r.usage.output_tokens == 8 and r.usage.input_tokens > 0


def test_responses_api_streamed(client, model_name):
    events = list(client.responses.create(model=model_name, input="Say something.", max_output_tokens=8,
                                          temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas and events[-1].response.usage.output_tokens == 8


def test_tokenize_and_detokenize(base_url, model_name):
    with httpx.Client(base_url=base_url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"model": model_name, "prompt": "hello world"}).json()
        assert tokens["count"] == len(tokens["tokens"]) > 1
        text = http.post("/detokenize", json={"model": model_name, "tokens": tokens["tokens"]}).json()
        assert "hello world" in text["prompt"]
        r = http.post("/tokenize", json={"model": "gpt-4", "prompt": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def structured(client, model_name, **kwargs):
    return client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=300, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": WEATHER}}, **kwargs)


def test_structured_output(client, model_name):
    answer = json.loads(structured(client, model_name).choices[0].message.content)
    jsonschema.validate(answer, WEATHER)  # the random tiny model writes valid JSON only because it is forced


def test_structured_output_streamed(client, model_name):
    chunks = list(structured(client, model_name, stream=True))
    answer = json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    jsonschema.validate(answer, WEATHER)


def test_forced_tool_call(client, model_name):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                               "parameters": WEATHER}}]
    r = client.chat.completions.create(model=model_name, messages=ASK, max_tokens=300, temperature=0, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_unknown_tool_choice_is_a_client_error(client, model_name):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model_name, messages=ASK, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert set(exc.value.response.json()["error"]) == {"message", "type", "param", "code"}
