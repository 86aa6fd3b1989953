"""The router's prompt tokens, with the tiny model's own tokenizer; what it cannot tell exactly is None."""

import time

import pytest

from mistral_ray import tiny_model
from mistral_ray.config import PROJECT_ROOT
from mistral_ray.routing.hint import hint_from_body
from mistral_ray.routing.tokens import PromptTokens

SOURCE = PROJECT_ROOT / ".state" / "models" / "tiny-mistral"


@pytest.fixture(scope="module")
def tokens():
    tiny_model.ensure(str(SOURCE))
    t = PromptTokens(str(SOURCE))
    t._load()  # what the loading thread does, here at once
    return t


def test_chat_is_the_template_without_added_specials(tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SOURCE))
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    expected = tok(tok.apply_chat_template([*messages[:2], {"role": "user", "content": "a\nb"}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert tokens.of("chat", {"messages": messages}) == tuple(expected)


def test_completion_text_adds_specials_and_token_prompts_pass(tokens):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(SOURCE))
    assert tokens.of("completions", {"prompt": "hello"}) == tuple(tok("hello")["input_ids"])
    assert tokens.of("completions", {"prompt": [5, 6, 7]}) == (5, 6, 7)


@pytest.mark.parametrize("route,payload", [
    ("chat", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "cache_salt": "s"}),
    ("completions", {"prompt": ["a", "b"]}),
    ("responses", {"input": "x"}),
])
def test_what_it_cannot_tell_is_none(tokens, route, payload):
    assert tokens.of(route, payload) is None


def test_a_missing_tokenizer_is_retried_later_never_waited_for(tmp_path):
    missing = PromptTokens(str(tmp_path / "nowhere"), retry_s=3600)
    assert missing.of("completions", {"prompt": "x"}) is None  # the load runs in its thread
    deadline = time.monotonic() + 30
    while missing._loading and time.monotonic() < deadline:
        time.sleep(0.05)
    assert missing._next_try > time.monotonic() and missing.of("completions", {"prompt": "x"}) is None


def test_models_vllm_tokenizes_otherwise_get_no_tokens(tmp_path):
    (tmp_path / "tekken.json").write_text("{}")
    assert not PromptTokens(str(tmp_path)).exact()
    assert not PromptTokens(str(SOURCE), tokenizer_mode="mistral").exact()
    assert not PromptTokens(str(SOURCE), tokenizer_mode="slow").exact()
    assert not PromptTokens(str(SOURCE), chat_template="/not/on/this/node.jinja").exact()
    assert PromptTokens(str(SOURCE)).exact()


def test_developer_is_system_and_request_options_are_honoured(tokens):
    dev = tokens.of("chat", {"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "x"}]})
    sys_ = tokens.of("chat", {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]})
    assert dev == sys_
    assert tokens.of("completions", {"prompt": "x", "truncate_prompt_tokens": 3}) is None
    assert tokens.of("completions", {"prompt": "x", "prompt_logprobs": 1}) is None
    with_specials = tokens.of("completions", {"prompt": "hello"})
    assert tokens.of("completions", {"prompt": "hello", "add_special_tokens": False}) == with_specials[1:]


def test_hint_carries_tokens_and_survives_a_failing_tokenizer(tokens):
    body = b'{"model": "m", "prompt": "hello"}'
    assert hint_from_body(body, None, 64, 8, tokenize=tokens.of).tokens == tokens.of("completions", {"prompt": "hello"})

    def broken(route, payload):
        raise ValueError("template error")

    hint = hint_from_body(body, None, 64, 8, tokenize=broken)
    assert hint.tokens == () and hint.prefix == ()  # prompt shorter than a block; no crash
