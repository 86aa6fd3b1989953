"""A prompt's token ids in the ingress router, as the engine will see them (for `kv_aware`).

vLLM 0.32's OpenAI app renders a chat with the tokenizer's chat template (or `engine.chat_template`) to
text and tokenizes that without adding special tokens (the template writes them); a completion's text
prompt is tokenized with them; a token-id prompt is taken as it is. The same here with the model's own
Hugging Face tokenizer, loaded on first use (on a cluster the model may be built or fetched after the
router starts: a failed load is retried after `retry_s`). What this cannot reproduce exactly (tools,
multimodal parts, a cache_salt, several prompts) gets no tokens, and the policy falls back to the text
prefix; `tests/integration/test_kv_routing.py` measures the agreement with the engine's own count.
"""

from __future__ import annotations

import logging
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
    def __init__(self, source: str, chat_template: Optional[str] = None, retry_s: float = 30.0):
        self.source, self.retry_s = source, retry_s
        self.template = chat_template
        if chat_template and Path(chat_template).is_file():
            self.template = Path(chat_template).read_text()
        self._tokenizer = None
        self._next_try = 0.0

    def _loaded(self):
        if self._tokenizer is None and time.monotonic() >= self._next_try:
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.source)
            except Exception as exc:  # not there yet (built by a replica), or no access: retry later
                self._next_try = time.monotonic() + self.retry_s
                logger.warning("kv_aware: no tokenizer from %s yet (%s: %s); routing by text prefix",
                               self.source, type(exc).__name__, exc)
        return self._tokenizer

    def of(self, route: str, payload: dict[str, Any]) -> Optional[tuple[int, ...]]:
        """The prompt's token ids, or None when they cannot be told exactly."""
        if payload.get("cache_salt") is not None:
            return None  # a salt changes every block hash: the index cannot match it
        tokenizer = self._loaded()
        if tokenizer is None:
            return None
        if route == "completions":
            prompt = payload.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
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
                messages.append({**m, "content": content})
            if not messages:
                return None
            text = tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False,
                add_generation_prompt=payload.get("add_generation_prompt", True),
                continue_final_message=payload.get("continue_final_message", False),
                **(payload.get("chat_template_kwargs") or {}))
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            return None
        return tuple(ids)
