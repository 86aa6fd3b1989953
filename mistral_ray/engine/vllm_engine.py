"""One vLLM AsyncLLM engine and vLLM's own OpenAI app for it, built as `vllm serve` builds them.

The replica serves that app behind our gate (`mistral_ray/server/`), which forwards only the routes of its
table. The only behaviour we change inside vLLM is at its renderer, which every generation route renders
its prompt through (chat, Anthropic messages, completions, the Responses API and its next turns): a prompt
beyond `max_prompt_tokens` is a 400, and so is prompt + completion tokens beyond the context, as OpenAI
answers, where vLLM would silently shorten the completion.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from http import HTTPStatus
from typing import Any, Optional

from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse
from vllm.config import KVEventsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.renderers.inputs.preprocess import extract_prompt_len
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.usage.usage_lib import UsageContext
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

from mistral_ray.engine.adapters import Adapters
from mistral_ray.engine.migration import not_migratable, parser_holds_text, printed, resume_prompts, track_outputs
from mistral_ray.engine.scheduling import prioritize
from mistral_ray.engine.requests import read
from mistral_ray.engine.step_stats import Listener, StepStats
from mistral_ray.routing.hint import PROBE_CHAT
from mistral_ray.server.generation import PROMPT_IDS_SCOPE, Generation

logger = logging.getLogger("ray.serve")
# Python's own bug exceptions: raised by vLLM's code, never by a client's input. vLLM answers TypeError with a
# 400 (and in a stream's error event); the checks before the engine refuse what clients can get wrong, so
# one of these means vLLM (or we) broke: a 500 that error-rate alerts see.
ENGINE_FAULTS = (TypeError, KeyError, AttributeError, IndexError)


def engine_fault_error(exc: BaseException) -> ErrorResponse:
    logger.error("engine fault: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return create_error_response(f"internal error in the engine: {type(exc).__name__}: {exc}",
                                 "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)


def _faults_are_500(serving: Any) -> None:
    """Make `serving.create_error_response` (also behind its stream error events) answer an engine fault
    with 500, not vLLM's 400."""
    inner = serving.create_error_response

    def create(message, *args, **kwargs):
        if isinstance(message, ENGINE_FAULTS):
            return engine_fault_error(message)
        return inner(message, *args, **kwargs)

    serving.create_error_response = create


async def _fault_handler(_: Request, exc: Exception) -> JSONResponse:
    err = engine_fault_error(exc)
    return JSONResponse(err.model_dump(), status_code=err.error.code)


def server_args(vllm_args: dict[str, Any]):
    """The argparse namespace `vllm serve` would build for these arguments."""
    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    unknown = sorted(key for key in vllm_args if not hasattr(args, key))
    if unknown:
        raise ValueError(f"unknown vLLM argument(s) {', '.join(unknown)} (engine.extra_args takes `vllm serve` "
                         "option names with _ for -)")
    for key, value in vllm_args.items():
        setattr(args, key, KVEventsConfig(**value) if key == "kv_events_config" and isinstance(value, dict) else value)
    args.disable_log_stats = False
    return args


def _completion_tokens(request: Any) -> tuple[Optional[int], str]:
    """What a rendered request asks the engine for, and the field (chat: max_completion_tokens first)."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = getattr(request, name, None)
        if value is not None:
            return value, name
    return None, "max_tokens"


def _engine_inputs(result: Any) -> list:
    if isinstance(result, tuple):  # render_chat: (conversation, engine inputs)
        return list(result[1])
    if isinstance(result, list):  # render_completion: one per prompt of a batch
        return result
    return [result.engine_input]  # render_responses: ResponsesRenderResult


def _reject_overlong(renderer: Any, model_config: Any, max_prompt_tokens: Optional[int]) -> None:
    """Make the renderer's `render_chat`, `render_completion` and `render_responses` reject every prompt
    beyond `max_prompt_tokens` and prompt + completion tokens beyond the context. The check runs on the
    rendered prompt, so nothing is tokenized twice."""
    limit = model_config.max_model_len

    def checked(render: str):
        inner = getattr(renderer, render)

        async def render_checked(request, *args, **kwargs):
            result = await inner(request, *args, **kwargs)
            if isinstance(result, ErrorResponse):
                return result
            wanted, wanted_param = _completion_tokens(request)
            param = "input" if render == "render_responses" else "prompt" if "completion" in render else "messages"
            for engine_input in _engine_inputs(result):
                prompt = extract_prompt_len(model_config, engine_input)
                if max_prompt_tokens is not None and prompt > max_prompt_tokens:
                    return renderer.create_error_response(
                        f"The prompt has {prompt} tokens; this server accepts at most {max_prompt_tokens}.",
                        param=param)
                if wanted is not None and prompt + wanted > limit:
                    return renderer.create_error_response(
                        f"This model's maximum context length is {limit} tokens. However, you requested "
                        f"{prompt + wanted} tokens ({prompt} in the prompt, {wanted} for the completion). "
                        "Please reduce the length of the prompt or of the completion.",
                        param=wanted_param)
            return result

        setattr(renderer, render, render_checked)

    for render in ("render_chat", "render_completion", "render_responses"):
        checked(render)


def _forwarded_prompt_ids(serving: Any) -> None:
    """Make `serving.create_chat_completion` run the prompt token ids the gate put in the request's scope
    (kv_aware: the ingress router tokenized the chat as this engine would, `server/link.py`) instead of
    rendering and tokenizing the messages again: vLLM's own reuse path for disaggregated serving
    (`kv_transfer_params.prompt_token_ids`, which the gate refuses from clients). vLLM still renders the
    messages when the request echoes them or has non-text parts."""
    inner = serving.create_chat_completion

    async def create(request, raw_request=None, *args, **kwargs):
        ids = raw_request.scope.get(PROMPT_IDS_SCOPE) if raw_request is not None else None
        if ids:
            request.kv_transfer_params = {"prompt_token_ids": ids}
        return await inner(request, raw_request, *args, **kwargs)

    serving.create_chat_completion = create


async def _render_probe(serving: Any, model: str) -> Optional[list[int]]:
    """The ids vLLM renders for `PROBE_CHAT`: a router sends this engine ids only if it renders them alike
    (the same template, tokenizer, content format and template defaults, whatever the config set)."""
    try:
        result = await serving.render_chat_request(ChatCompletionRequest(model=model, messages=list(PROBE_CHAT)))
        if isinstance(result, ErrorResponse):
            return None
        return list(result[1][0]["prompt_token_ids"])
    except Exception as exc:  # a template that cannot render it: no ids are sent to this engine
        logger.warning("kv_aware: the probe chat does not render (%s: %s); routers will not send ids",
                       type(exc).__name__, exc)
        return None


class VLLMEngine:
    """A started engine with its serving state. Built by `start`; the replica owns exactly one."""

    def __init__(self, llm: AsyncLLM, state: State, args, tasks: tuple, max_prompt_tokens: Optional[int] = None,
                 probe: Optional[list[int]] = None):
        self.llm, self.state, self.args, self.tasks = llm, state, args, tasks
        self.probe = probe
        self.adapters = Adapters(llm, state.openai_serving_models, llm.model_config.served_model_name)
        # One renderer serves every generation route (each serving holds this same object).
        _reject_overlong(state.online_renderer, llm.model_config, max_prompt_tokens)
        resume_prompts(state.online_renderer)  # after the limits: they judge the prompt the client sent
        track_outputs(llm)
        prioritize(llm)  # outermost: the priority is the gate's whatever vLLM's serving passes
        self.parser_holds_text = parser_holds_text(args)
        for name in ("openai_serving_chat", "openai_serving_completion", "openai_serving_responses",
                     "anthropic_serving_messages", "serving_tokenization"):
            if getattr(state, name, None) is not None:
                _faults_are_500(getattr(state, name))
        if getattr(state, "openai_serving_chat", None) is not None:
            _forwarded_prompt_ids(state.openai_serving_chat)

    @classmethod
    async def start(cls, vllm_args: dict[str, Any], ray_metrics: bool = False,
                    max_prompt_tokens: Optional[int] = None, on_step: Optional[Listener] = None) -> "VLLMEngine":
        """`on_step`: called with the scheduler's running and waiting requests and KV use at every step."""
        args = server_args(vllm_args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        loggers: list = [RayPrometheusStatLogger] if ray_metrics else []
        if on_step is not None:
            loggers.append(functools.partial(StepStats, listener=on_step))
        llm = AsyncLLM.from_vllm_config(
            vllm_config=vllm_config,
            usage_context=UsageContext.OPENAI_API_SERVER,
            enable_log_requests=False,
            disable_log_stats=False,
            # Ray's exporter instead of a per-process /metrics endpoint: Ray tags every sample with the
            # replica id, and each node's metrics port serves them all.
            # (Without it vLLM adds its own Prometheus logger.)
            stat_loggers=loggers or None,
        )
        state = State()
        tasks = tuple(await llm.get_supported_tasks())
        await init_app_state(llm, state, args, tasks)
        probe = None
        if args.kv_events_config is not None and getattr(state, "openai_serving_chat", None) is not None:
            probe = await _render_probe(state.openai_serving_chat, llm.model_config.served_model_name)
        return cls(llm, state, args, tasks, max_prompt_tokens, probe)

    def build_app(self):
        """vLLM's OpenAI app (FastAPI) sharing this engine's serving state."""
        app = build_app(self.args, supported_tasks=self.tasks, model_config=self.llm.model_config)
        app.state._state.update(self.state._state)
        for fault in ENGINE_FAULTS:  # those that reach the app's own handlers (TypeError: vLLM's 400)
            app.add_exception_handler(fault, _fault_handler)
        # vLLM's engine-error handler flips `state.server.should_exit` (uvicorn's flag in `vllm serve`); here
        # Serve's health check replaces a replica whose engine died, but the attribute must exist.
        app.state.server = types.SimpleNamespace()
        return app

    def read_request(self, route: str, payload: dict) -> Generation:
        """A generation request as this vLLM's request models read it (the gate's limits judge this)."""
        return read(route, payload)

    def not_migratable(self, route: str, payload: dict) -> Optional[str]:
        """Why a stream of this request could not be continued exactly on another replica (None: it can)."""
        return not_migratable(route, payload, self.parser_holds_text)

    def printed_ids(self, ids: tuple) -> tuple:
        """A continuation's ids without those of a character the client did not get yet (engine/migration.py)."""
        return printed(self.state.online_renderer.renderer.tokenizer, ids)

    async def set_adapters(self, wanted: dict[str, str]) -> dict[str, list[str]]:
        """Serve these LoRA adapters (name -> source) from now on (engine/adapters.py)."""
        return await self.adapters.apply(wanted)

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
            "kv_events": self.kv_events(),
            "adapters": sorted(self.adapters.names()),
            "max_loras": cfg.lora_config.max_loras if cfg.lora_config is not None else 0,
            # what a request that names no max_tokens gets (the model's generation config), within the context
            "default_max_tokens": model.get_diff_sampling_param().get("max_tokens"),
        }

    def kv_events(self) -> Optional[dict[str, Any]]:
        """Where this engine publishes its KV events (the addresses it bound), for the routers; None when off."""
        sources = self.llm.engine_core.get_kv_event_sources()
        if not sources:
            return None
        published = sources[min(sources)]
        return {"pub": published.endpoint, "replay": published.replay_endpoint, "topic": published.topic,
                "seed": os.environ.get("PYTHONHASHSEED"), "blocks": self.llm.vllm_config.cache_config.num_gpu_blocks,
                "probe": self.probe}

    async def check_health(self) -> None:
        await self.llm.check_health()

    def shutdown(self) -> None:
        self.llm.shutdown()
