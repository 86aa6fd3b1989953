"""The served model really is Mistral: its engine runs GQA and applies the sliding window.

The window test compares the served greedy tokens with HF transformers' MistralForCausalLM on the same
checkpoint for a prompt longer than twice the window; a reference with the window removed must differ,
which proves that both sides apply it (and that the prompt is long enough for it to matter).
"""

import pytest

pytestmark = pytest.mark.integration
NEW_TOKENS = 48


def test_engine_reports_gqa_and_window(llm_handle):
    info = llm_handle.info.remote().result(timeout_s=60)
    assert info["num_attention_heads"] == 8
    assert info["num_kv_heads"] == 2  # 4 query heads share each KV head, as in Mistral 7B
    assert info["head_dim"] == 32 and info["sliding_window"] == 64
    assert info["prefix_caching"] is True and info["num_kv_blocks"] > 0


def load_hf_model(path: str):
    """The checkpoint in HF transformers' own Mistral implementation (eager attention, float32)."""
    import torch
    from transformers import AutoTokenizer, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_model(app):
    return load_hf_model(app.deployment.service.model.resolved_source())


def hf_greedy(model, prompt_ids, sliding_window):
    """Greedy tokens by a whole forward pass per token (no cache: HF's masks alone decide what each token
    sees). EOS may be picked, as vLLM picks it with `ignore_eos` (which only does not stop there); HF's
    `generate(min_new_tokens=...)` would forbid it and pick the runner-up instead."""
    import torch

    model.config.sliding_window = sliding_window
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_sliding_window_matches_transformers(client, model_name, hf_model, llm_handle):
    model, tok = hf_model
    window = llm_handle.info.remote().result(timeout_s=60)["sliding_window"]
    text = " ".join(open(__file__).read().split())  # any long text
    prompt_ids = tok(text)["input_ids"][: 3 * window]
    assert len(prompt_ids) >= 2 * window

    r = client.completions.create(
        model=model_name, prompt=prompt_ids, max_tokens=NEW_TOKENS, temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    served = r.choices[0].token_ids
    assert len(served) == NEW_TOKENS

    windowed = hf_greedy(model, prompt_ids, window)
    unwindowed = hf_greedy(model, prompt_ids, None)
    assert served == windowed
    assert unwindowed != windowed, "the window did not matter for this prompt; the test proves nothing"


def test_planner_matches_vllm_kv_capacity(llm_handle, app):
    from mistral_ray import planner

    info = llm_handle.info.remote().result(timeout_s=60)
    cfg = app.deployment.service
    shape = planner.ModelShape.from_hf_config(cfg.model.resolved_source())
    p = planner.plan(shape, context_len=2048, target_concurrency=1, dtype=info["dtype"],
                     kv_budget_gib=cfg.engine.cpu_kvcache_space_gib, block_size=info["block_size"])
    assert p.kv_tokens_per_replica == info["num_kv_blocks"] * info["block_size"]
