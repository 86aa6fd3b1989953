"""Reading a generation request with vLLM's own request models, as its routes will read it.

The gate judges limits (`n`, completion tokens, prompts, `stream`) on this reading, not on the raw JSON:
vLLM's pydantic models coerce `"5"` and `5.0` to 5 and `"true"` to True, so a check on the raw types would
pass what the engine then runs. A body vLLM's model refuses is refused here with the same message, before
the engine is asked.
"""

from __future__ import annotations

from typing import Any, Callable

from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.exceptions import VLLMClientError

from mistral_ray.routing.hint import prompt_text
from mistral_ray.server.generation import Generation, Unreadable


def _include_usage(request: Any) -> bool:
    options = getattr(request, "stream_options", None)
    return bool(options is not None and options.include_usage)


def _one_prompt(route: str, payload: dict) -> dict:
    return {"prompt_chars": (len(prompt_text(route, payload)),), "prompt_ids": ()}


def _chat(payload: dict) -> Generation:
    r = ChatCompletionRequest.model_validate(payload)
    # vLLM's chat serving takes max_completion_tokens when given, else the deprecated max_tokens.
    param = "max_completion_tokens" if r.max_completion_tokens is not None else "max_tokens"
    return Generation(stream=bool(r.stream), n=r.n or 1, max_tokens=getattr(r, param), max_tokens_param=param,
                      include_usage=_include_usage(r), **_one_prompt("chat", payload))


def _completions(payload: dict) -> Generation:
    r = CompletionRequest.model_validate(payload)
    prompt = r.prompt
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]  # one prompt of token ids
    else:
        prompts = list(prompt or [])  # a batch of strings or of token-id lists
    given = "max_tokens" in r.model_fields_set
    return Generation(stream=bool(r.stream), n=r.n, include_usage=_include_usage(r),
                      prompt_chars=tuple(len(p) for p in prompts if isinstance(p, str)),
                      prompt_ids=tuple(len(p) for p in prompts if not isinstance(p, str)),
                      max_tokens=r.max_tokens if given else None, max_tokens_param="max_tokens",
                      default_max_tokens=CompletionRequest.model_fields["max_tokens"].default)


def _responses(payload: dict) -> Generation:
    r = ResponsesRequest.model_validate(payload)
    return Generation(stream=bool(r.stream), n=1, max_tokens=r.max_output_tokens,
                      max_tokens_param="max_output_tokens", **_one_prompt("responses", payload))


def _messages(payload: dict) -> Generation:
    r = AnthropicMessagesRequest.model_validate(payload)
    return Generation(stream=bool(r.stream), n=1, max_tokens=r.max_tokens, max_tokens_param="max_tokens",
                      **_one_prompt("messages", payload))


READERS: dict[str, Callable[[dict], Generation]] = {
    "chat": _chat, "completions": _completions, "responses": _responses, "messages": _messages}


def read(route: str, payload: dict) -> Generation:
    """The request as vLLM's model for `route` reads it; raises pydantic's ValidationError, or Unreadable
    for vLLM's own validators' errors, where vLLM would answer 400."""
    try:
        return READERS[route](payload)
    except VLLMClientError as exc:
        raise Unreadable(str(exc.args[0]) if exc.args else str(exc), getattr(exc, "parameter", None)) from None
