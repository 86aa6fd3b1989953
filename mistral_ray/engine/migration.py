"""Mid-stream migration inside the engine layer (the replica's side is `server/migration.py`): which
requests a continuation can reproduce exactly, the token ids behind each event of a tracked stream, and a
continuation's prompt (the rendered prompt, then the ids its first part made)."""

from __future__ import annotations

from typing import Any, Optional

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from mistral_ray.server.migration import RESUMED, TRACKED


def _sampled(request: Any) -> bool:
    return request.temperature is None or request.temperature > 0


def not_migratable(route: str, payload: dict, parser_holds_text: bool = False) -> Optional[str]:
    """None if a continuation of this streamed request gives the client what the uncut stream would, else
    why not (server/migration.py's NOT_POSSIBLE). What cannot be continued exactly: more than one sequence
    (n, best_of, beam search, a batch of prompts), per-token logprobs (the first part's are not the
    continuation's to give), echo, tool calls and reasoning (a parser's state is the first part's),
    structured output (the grammar would start again), stop strings (vLLM holds back text that may begin
    one, and a stop string across the two parts would not be seen), a seed with sampling (the continuation
    cannot replay the random stream), frequency/presence penalties and bad words (they count output
    tokens: the first part's would be prompt; so does repetition detection), per-chunk usage, prompt
    truncation. `parser_holds_text`: the engine's chat parser holds content back (a reasoning parser, or a
    tool parser that streams through vLLM's parser engine, as `mistral` does, even for a request without
    tools): the ids of text it held would be marked as the client's."""
    if route == "chat":
        r: Any = ChatCompletionRequest.model_validate(payload)
        if r.tools and r.tool_choice != "none":
            return "tools"
        if parser_holds_text:
            return "parser"
        if r.logprobs or r.top_logprobs:
            return "logprobs"
    elif route == "completions":
        r = CompletionRequest.model_validate(payload)
        if not isinstance(r.prompt, str) and not (r.prompt and isinstance(r.prompt[0], int)):
            return "n"  # a batch of prompts: one choice each
        if r.logprobs is not None:
            return "logprobs"
    else:
        return "route"
    if (r.n or 1) > 1 or (getattr(r, "best_of", None) or 1) > 1 or getattr(r, "use_beam_search", False):
        return "n" if not getattr(r, "use_beam_search", False) else "beam_search"
    if r.prompt_logprobs is not None:
        return "logprobs"
    if getattr(r, "echo", False):
        return "echo"
    fmt = getattr(r, "response_format", None)
    if (fmt is not None and getattr(fmt, "type", "text") != "text") or getattr(r, "structured_outputs", None):
        return "structured_output"
    if r.stop:
        return "stop_strings"
    if r.seed is not None and _sampled(r):
        return "seeded_sampling"
    if r.frequency_penalty or r.presence_penalty:
        return "penalties"
    if getattr(r, "bad_words", None):
        return "bad_words"
    if r.stream_options is not None and r.stream_options.continuous_usage_stats:
        return "continuous_usage"
    if r.truncate_prompt_tokens is not None:
        return "prompt_truncation"
    if getattr(r, "repetition_detection", None) is not None:
        return "penalties"
    return None


def parser_holds_text(args: Any) -> bool:
    """Whether the chat serving's parser may hold content back from a stream (see not_migratable)."""
    if getattr(args, "reasoning_parser", None):
        return True
    name = getattr(args, "tool_call_parser", None)
    if not name:
        return False
    from vllm.tool_parsers import ToolParserManager

    return bool(getattr(ToolParserManager.get_tool_parser(name), "engine_based_streaming", True))


def printed(tokenizer: Any, ids: tuple) -> tuple:
    """The ids without those of a trailing incomplete character: an event may carry the ids of bytes the
    detokenizer still held (no text yet), and a prompt ending in them would make the continuation's
    detokenizer print its whole prompt. The continuation makes them again."""
    out = list(ids)
    for _ in range(4):  # a UTF-8 character is at most 4 bytes
        if not out or not tokenizer.decode(out[-8:]).endswith("\ufffd"):
            break
        out.pop()
    return tuple(out)


def track_outputs(llm: Any) -> None:
    """Make `llm.generate` hand each output's new token ids to the tracked stream it serves (the gate sets
    TRACKED around vLLM's app; vLLM's serving calls generate inside it)."""
    inner = llm.generate

    def generate(*args, **kwargs):
        tracked = TRACKED.get()
        outputs = inner(*args, **kwargs)
        return outputs if tracked is None else _tracked(outputs, tracked)

    llm.generate = generate


async def _tracked(outputs, tracked):
    try:
        async for out in outputs:
            for seq in out.outputs[:1]:  # a tracked stream has one sequence
                tracked.pending.extend(seq.token_ids)
                tracked.finished = tracked.finished or seq.finish_reason is not None
            yield out
    finally:
        await outputs.aclose()


def resume_prompts(renderer: Any) -> None:
    """Make the renderer's `render_chat` and `render_completion` put a continuation's first-part ids
    (RESUMED, set by the gate) after the prompt they rendered, after its limits were checked on the
    request as the client sent it (the completion tokens left shrink by as many)."""

    def appending(render: str):
        inner = getattr(renderer, render)

        async def render_resumed(request, *args, **kwargs):
            result = await inner(request, *args, **kwargs)
            ids = RESUMED.get()
            if ids and not hasattr(result, "error"):
                inputs = result[1] if isinstance(result, tuple) else result
                for engine_input in inputs:
                    engine_input["prompt_token_ids"] = [*engine_input["prompt_token_ids"], *ids]
                    engine_input.pop("prompt", None)  # its text is the rendered prompt's only
            return result

        setattr(renderer, render, render_resumed)

    for render in ("render_chat", "render_completion"):
        appending(render)
