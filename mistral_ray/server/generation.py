"""A generation request as the engine will run it: what the gate's limits, quota and load judge.

The engine layer builds it from vLLM's own request models (`engine/requests.py`), so a number sent as "5" or
5.0 is read here exactly as vLLM reads it; this module only holds the result (no vllm import).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Where the gate puts a chat's prompt token ids that an ingress router computed (kv_aware) in the request's
# ASGI scope, for the engine to run instead of tokenizing the messages again (server/link.py).
PROMPT_IDS_SCOPE = "mistral_ray.prompt_token_ids"


@dataclass(frozen=True)
class Generation:
    stream: bool
    n: int  # sequences per prompt
    prompt_chars: tuple[int, ...]  # per prompt: its characters (a token-id prompt counts as `prompt_tokens`)
    prompt_ids: tuple[int, ...]  # per prompt given as token ids: how many
    max_tokens: Optional[int]  # completion tokens asked for, as the engine reads them; None: not given
    max_tokens_param: str  # the field that sets it on this route (named in errors)
    default_max_tokens: Optional[int] = None  # the route's own default when not given (completions: 16)
    include_usage: bool = False  # a stream whose client asked for the usage chunk

    @property
    def prompts(self) -> int:
        return len(self.prompt_chars) + len(self.prompt_ids)

    def prompt_tokens(self, chars_per_token: float) -> int:
        """Estimated prompt tokens of all prompts (exact for token ids): before the engine tokenizes."""
        return int(sum(self.prompt_chars) / chars_per_token) + sum(self.prompt_ids)

    def completion_budget(self, limit: Optional[int], context: int) -> int:
        """Completion tokens one sequence may produce: what was asked (or the route's default, or the
        rest of the context), never more than the operator's limit, which the engine also enforces."""
        asked = self.max_tokens if self.max_tokens is not None else self.default_max_tokens
        budget = asked if asked is not None else (limit or context)
        return max(0, min(budget, limit) if limit else budget)


class Unreadable(ValueError):
    """A body the engine's request model refuses (vLLM's own 4xx), with the field it names."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param
