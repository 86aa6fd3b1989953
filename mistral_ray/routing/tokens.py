"""A prompt's token ids in the ingress router, as the engine will see them (for `kv_aware`).

vLLM 0.32's OpenAI app renders a chat with the tokenizer's chat template (or `engine.chat_template`) to
text and tokenizes that without adding special tokens (the template writes them); a completion's text
prompt is tokenized with them; a token-id prompt is taken as it is. The same here with the model's own
Hugging Face tokenizer, loaded on first use (on a cluster the model may be built or fetched after the
router starts: a failed load is retried after `retry_s`). What this cannot reproduce exactly (tools,
multimodal parts, a cache_salt, several prompts, request-level tokenization options) gets no tokens, and
the policy falls back to the text prefix; so does a model vLLM tokenizes with Mistral's own tokenizer
(`tokenizer_mode: mistral`, or `auto` on a checkpoint with `tekken.json` / `tokenizer.model.v*`) or the slow
one. The tokenizer loads in a thread of its own (it may read the hub): routing never waits for it.
`tests/integration/test_kv_routing.py` measures the agreement with the engine's own count.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("ray.serve")


def _content(value: Any) -> Optional[str]:
    """A message's content as vLLM's "string" content format renders it (text parts joined by newlines)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                       isinstance(p.get("text"), str) for p in value):
        return "\n".join(p["text"] for p in value)
    return None  # images, audio, unknown parts: not ours to render


class PromptTokens:
    def __init__(self, source: str, chat_template: Optional[str] = None, retry_s: float = 30.0,
                 tokenizer_mode: str = "auto", revision: Optional[str] = None):
        self.source, self.retry_s, self.mode, self.revision = source, retry_s, tokenizer_mode, revision
        self.template = chat_template
        if chat_template and Path(chat_template).is_file():
            self.template = Path(chat_template).read_text()
        elif chat_template and "{" not in chat_template:  # a path that is not on this node: not the template
            self.mode = "unknown-template"
        self._tokenizer = None
        self._next_try = 0.0
        self._loading = False
        self._agreed: dict[tuple, bool] = {}  # an engine's probe ids -> whether ours are the same

    def agrees(self, probe: Optional[list]) -> bool:
        """Whether a replica whose engine rendered `hint.PROBE_CHAT` to `probe` renders chats as we do."""
        if not probe:
            return False
        key = tuple(probe)
        if key not in self._agreed:
            from mistral_ray.routing.hint import PROBE_CHAT

            mine = self.of("chat", {"messages": list(PROBE_CHAT)})
            if mine is None:  # no tokenizer yet: ask again next time
                return False
            self._agreed[key] = mine == key
            if mine != key:
                logger.warning("kv_aware: this router renders the probe chat unlike the engine (%d vs %d ids); "
                               "prompt ids are not sent to it", len(mine), len(key))
        return self._agreed[key]

    def preload(self) -> None:
        """Start loading now (in its thread), not on the first request: until it is in, kv_aware routes by the
        text prefix (a bench that started right after the app saw half its requests routed so)."""
        self._loaded()

    def exact(self) -> bool:
        """Whether vLLM tokenizes this model as we can (the HF fast tokenizer)."""
        if self.mode != "auto" and self.mode != "hf":
            return False
        path = Path(self.source)
        return not (self.mode == "auto" and path.is_dir() and
                    ((path / "tekken.json").exists() or any(path.glob("tokenizer.model.v*"))))

    def _load(self) -> None:
        try:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.source, revision=self.revision)
        except Exception as exc:  # not there yet (built by a replica), or no access: retry later
            self._next_try = time.monotonic() + self.retry_s
            logger.warning("kv_aware: no tokenizer from %s yet (%s: %s); routing by text prefix",
                           self.source, type(exc).__name__, exc)
        finally:
            self._loading = False

    def _loaded(self):
        if self._tokenizer is None and not self._loading and time.monotonic() >= self._next_try and self.exact():
            self._loading = True
            threading.Thread(target=self._load, name="mistral-ray-tokenizer", daemon=True).start()
        return self._tokenizer

    def of(self, route: str, payload: dict[str, Any]) -> Optional[tuple[int, ...]]:
        """The prompt's token ids, or None when they cannot be told exactly."""
        if payload.get("cache_salt") is not None or payload.get("truncate_prompt_tokens") is not None:
            return None  # a salt changes every block hash; a truncation changes the prompt
        if payload.get("prompt_logprobs") is not None:
            return None  # vLLM computes such prompts without its prefix cache
        tokenizer = self._loaded()
        if tokenizer is None:
            return None
        if route == "completions":
            prompt = payload.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=payload.get("add_special_tokens", True) is not False)["input_ids"]
            elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
                ids = prompt
            else:
                return None
        elif route == "chat":
            if payload.get("tools") or payload.get("documents"):
                return None
            messages = []
            for m in payload.get("messages") or ():
                content = _content(m.get("content")) if isinstance(m, dict) else None
                if content is None or set(m) - {"role", "content", "name"}:
                    return None
                role = "system" if m.get("role") == "developer" else m.get("role")  # as vLLM's renderer does
                messages.append({**m, "role": role, "content": content})
            if not messages:
                return None
            text = tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False,
                add_generation_prompt=payload.get("add_generation_prompt", True),
                continue_final_message=payload.get("continue_final_message", False),
                **(payload.get("chat_template_kwargs") or {}))
            ids = tokenizer(text, add_special_tokens=payload.get("add_special_tokens") is True)["input_ids"]
        else:
            return None
        return tuple(ids)
