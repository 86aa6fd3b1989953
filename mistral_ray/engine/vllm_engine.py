"""One vLLM AsyncLLM engine plus vLLM's own OpenAI serving layer, as `vllm serve` builds them.

We reuse vLLM's protocol models and serving classes (chat templates, stop, n, seed, logprobs, usage) and
only adapt their results to our hop: a status and either a JSON body or the SSE text chunks vLLM yields.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Optional, Union

from pydantic import ValidationError
from starlette.datastructures import State
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.generate.base.protocol import StreamOptions
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.exceptions import VLLMClientError
from vllm.usage.usage_lib import UsageContext
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

from mistral_ray.protocol import error_json

logger = logging.getLogger("ray.serve")
Body = Union[str, AsyncIterator[str]]
OnUsage = Callable[[int, int], None]
ROUTES = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


def _server_args(engine_kwargs: dict[str, Any]):
    """The argparse namespace `vllm serve` would build for these engine arguments."""
    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    for key, value in engine_kwargs.items():
        if not hasattr(args, key):
            raise ValueError(f"unknown vLLM engine argument {key!r}")
        setattr(args, key, value)
    args.disable_log_stats = False
    return args


def _validation_message(exc: ValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    return f"{param}: {err['msg']}" if param else err["msg"], param


def _reject_overlong(serving: Any, render: str, max_prompt_tokens: Optional[int]) -> None:
    """Make `serving.<render>` reject prompt + max_tokens beyond the context, as OpenAI does, and prompts
    beyond `max_prompt_tokens` (the operator's limit).

    vLLM silently clamps max_tokens to the room left in the context; clients written against OpenAI expect
    a 400 instead of a shorter answer. The check runs on the rendered prompt, so nothing is tokenized twice.
    """
    inner = getattr(serving, render)
    limit = serving.model_config.max_model_len

    async def checked(request, *args, **kwargs):
        result = await inner(request, *args, **kwargs)
        if isinstance(result, ErrorResponse):
            return result
        wanted = getattr(request, "max_completion_tokens", None) or request.max_tokens
        inputs = result[1] if isinstance(result, tuple) else result
        for engine_input in inputs:
            prompt = serving._extract_prompt_len(engine_input)
            if max_prompt_tokens is not None and prompt > max_prompt_tokens:
                return serving.create_error_response(
                    f"The prompt has {prompt} tokens; this server accepts at most {max_prompt_tokens}.",
                    param="messages" if "chat" in render else "prompt",
                )
            if wanted is not None and prompt + wanted > limit:
                return serving.create_error_response(
                    f"This model's maximum context length is {limit} tokens. However, you requested "
                    f"{prompt + wanted} tokens ({prompt} in the prompt, {wanted} for the completion). "
                    "Please reduce the length of the prompt or of max_tokens.",
                    param="max_tokens",
                )
        return result

    setattr(serving, render, checked)


async def _with_usage(chunks: AsyncIterator[str], on_usage: OnUsage, forward_usage: bool) -> AsyncIterator[str]:
    """Pass chunks through untouched, except the usage-only chunk: parsed (the only chunk we decode) and
    forwarded only if the client asked for it."""
    async for chunk in chunks:
        if chunk.startswith('data: {') and '"choices":[]' in chunk and '"usage":{' in chunk:
            usage = json.loads(chunk[6:])["usage"]
            on_usage(usage["prompt_tokens"], usage.get("completion_tokens") or 0)
            if not forward_usage:
                continue
        yield chunk


class VLLMEngine:
    """A started engine. Built by `start`; the replica owns exactly one."""

    def __init__(self, llm: AsyncLLM, state: State, max_prompt_tokens: Optional[int] = None):
        self.llm = llm
        self._handlers = {
            "chat": state.openai_serving_chat.create_chat_completion,
            "completions": state.openai_serving_completion.create_completion,
        }
        self._serving = {"chat": state.openai_serving_chat, "completions": state.openai_serving_completion}
        _reject_overlong(state.openai_serving_chat, "render_chat_request", max_prompt_tokens)
        _reject_overlong(state.openai_serving_completion, "render_completion_request", max_prompt_tokens)

    @classmethod
    async def start(cls, engine_kwargs: dict[str, Any], ray_metrics: bool = False,
                    max_prompt_tokens: Optional[int] = None) -> "VLLMEngine":
        args = _server_args(engine_kwargs)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        llm = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=False,
            disable_log_stats=False,
            # Ray's exporter instead of a per-process /metrics endpoint: Serve replicas have no port of
            # their own, and Ray tags every sample with the replica id.
            stat_loggers=[RayPrometheusStatLogger] if ray_metrics else None,
        )
        state = State()
        await init_app_state(llm, state, args, await llm.get_supported_tasks())
        return cls(llm, state, max_prompt_tokens)

    async def handle(self, route: str, body: bytes, on_usage: Optional[OnUsage] = None) -> tuple[int, Body]:
        """Run one OpenAI request; returns (status, JSON text) or (200, SSE chunk stream). `on_usage`
        gets (prompt tokens, completion tokens) once the request has finished."""
        try:
            request = ROUTES[route].model_validate_json(body)
        except ValidationError as exc:
            message, param = _validation_message(exc)
            return 400, error_json(400, message, param)
        except VLLMClientError as exc:  # vLLM's own model validators raise these, and pydantic lets them through
            return 400, error_json(400, str(exc), getattr(exc, "parameter", None))
        client_wants_usage = bool(request.stream and request.stream_options and request.stream_options.include_usage)
        if request.stream and on_usage and not client_wants_usage:
            # Ask vLLM for its final usage chunk, read it, and do not pass it on (see _with_usage).
            request.stream_options = StreamOptions(include_usage=True)
        try:
            result = await self._handlers[route](request, None)
        except (ValueError, VLLMClientError) as exc:
            result = self._serving[route].create_error_response(exc)
        except (TypeError, KeyError, AttributeError, IndexError) as exc:
            # A request shape vLLM's models accept but its rendering cannot handle: the client's input, not
            # the engine, is at fault. Logged with its traceback so a real bug stays visible.
            logger.warning("request rejected by vLLM's serving layer", exc_info=True)
            return 400, error_json(400, f"the request could not be processed: {type(exc).__name__}: {exc}")
        if isinstance(result, ErrorResponse):
            err = result.error
            return err.code, error_json(err.code, err.message, err.param)
        if hasattr(result, "model_dump_json"):
            if on_usage and result.usage:
                on_usage(result.usage.prompt_tokens, result.usage.completion_tokens or 0)
            return 200, result.model_dump_json()
        return 200, _with_usage(result, on_usage, client_wants_usage) if on_usage else result

    def info(self) -> dict[str, Any]:
        """What the engine actually runs with, as vLLM resolved it (not what we asked for)."""
        cfg = self.llm.vllm_config
        model, cache = cfg.model_config, cfg.cache_config
        return {
            "model": model.model,
            "dtype": str(model.dtype).removeprefix("torch."),
            "max_model_len": model.max_model_len,
            "num_attention_heads": model.get_num_attention_heads(cfg.parallel_config),
            "num_kv_heads": model.get_num_kv_heads(cfg.parallel_config),
            "head_dim": model.get_head_size(),
            "num_layers": model.get_num_layers(cfg.parallel_config),
            "sliding_window": model.get_sliding_window(),
            "block_size": cache.block_size,
            "num_kv_blocks": cache.num_gpu_blocks,
            "prefix_caching": cache.enable_prefix_caching,
        }

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
