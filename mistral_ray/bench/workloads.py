"""Seeded, bounded workloads: what the benchmark sends.

- `random_prompts`: independent prompts of fixed token length (no shared prefixes), fixed output length.
- `ChatTrace`: many multi-turn chat sessions. Each turn resends the whole growing conversation (system
  prompt, earlier turns with the model's real answers, a new user message), and sessions share a few system
  prompts — the traffic where the replica holding a conversation's KV prefix answers fastest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

_WORDS = (Path(__file__).resolve().parents[1] / "data" / "corpus.txt").read_text().split()


def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(words))


@dataclass
class Call:
    """One request to send: route, JSON body, and where it belongs in a session (if any)."""

    route: str
    body: dict[str, Any]
    session: Optional[int] = None
    turn: int = 0


def random_prompts(model: str, n: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[Call]:
    rng = random.Random(seed)
    # Token ids from 3 up skip the special tokens; each request gets its own prompt (no prefix sharing).
    return [
        Call("completions", {"model": model, "prompt": [rng.randrange(3, vocab) for _ in range(input_len)],
                             "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
                             "stream_options": {"include_usage": True}})
        for _ in range(n)
    ]


def warmup_prompts(model: str, n: int) -> list[Call]:
    """A few short text completions before the measured levels. Text, not token ids: ray.serve.llm's
    PrefixCacheAffinityRouter (Ray 2.60) divides by a token-id prompt's text length, zero, and the request
    never returns (its random workload cannot be run for that reason)."""
    return [Call("completions", {"model": model, "prompt": f"warm up {i}", "max_tokens": 4, "stream": True,
                                 "stream_options": {"include_usage": True}}) for i in range(n)]


@dataclass
class ChatTrace:
    """`sessions` conversations of `turns` turns each; system prompts shared across sessions. The sizes
    are required: the bench's DEFAULTS (shown in `mistral-ray bench --help`) are their only home."""

    model: str
    sessions: int
    turns: int
    system_prompts: int
    system_words: int
    user_words: int
    output_len: int
    seed: int
    histories: dict[int, list[dict[str, str]]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        rng = random.Random(self.seed)
        systems = [_sentence(rng, self.system_words) for _ in range(self.system_prompts)]
        self._user = {(s, t): _sentence(rng, self.user_words) for s in range(self.sessions) for t in range(self.turns)}
        for s in range(self.sessions):
            self.histories[s] = [{"role": "system", "content": systems[s % self.system_prompts]}]

    @property
    def requests(self) -> int:
        return self.sessions * self.turns

    def call(self, session: int, turn: int) -> Call:
        """The next turn of a session: the conversation so far plus a new user message."""
        messages = self.histories[session] + [{"role": "user", "content": self._user[(session, turn)]}]
        body = {"model": self.model, "messages": messages, "max_tokens": self.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "user": f"session-{session}"}
        return Call("chat", body, session, turn)

    def answered(self, call: Call, text: str) -> None:
        """Record the model's answer so the next turn resends it, as a chat client does."""
        self.histories[call.session] = call.body["messages"] + [{"role": "assistant", "content": text}]
