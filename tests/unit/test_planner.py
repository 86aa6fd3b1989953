"""The capacity planner's arithmetic, checked against numbers computed by hand for Mistral 7B."""

import json

import pytest

from mistral_ray import planner
from mistral_ray.config import PROJECT_ROOT, load_deployment

GIB = 1024**3
MISTRAL_7B_CONFIG = {  # config.json of mistralai/Mistral-7B-v0.1
    "hidden_size": 4096, "intermediate_size": 14336, "vocab_size": 32000, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
}


def test_kv_bytes_per_token_mistral_7b():
    shape = planner.PRESETS["mistral-7b-v0.1"]
    # 2 (K, V) x 32 layers x 8 KV heads x 128 head_dim x 2 bytes (bf16) = 131072 = 128 KiB
    assert planner.kv_bytes_per_token(shape, "bfloat16") == 128 * 1024
    assert planner.kv_bytes_per_token(shape, "float32") == 256 * 1024


def test_32k_sequence_with_and_without_window():
    shape = planner.PRESETS["mistral-7b-v0.1"]
    per_token = planner.kv_bytes_per_token(shape, "bfloat16")
    full = planner.kv_tokens_per_seq(32768, None, 16) * per_token
    windowed = planner.kv_tokens_per_seq(32768, 4096, 16) * per_token
    assert full == 4 * GIB
    assert windowed == pytest.approx(0.5 * GIB, rel=0.01)  # W + one block: 4112 tokens
    assert planner.kv_tokens_per_seq(1000, 4096, 16) == 1008  # shorter than the window: whole blocks


def test_plan_on_an_80gb_gpu():
    p = planner.plan(planner.PRESETS["mistral-7b-v0.1"], context_len=32768, target_concurrency=200,
                     gpu_memory_gib=80, gpu_memory_utilization=0.9, overhead_gib=1.5)
    weights = 7.24e9 * 2 / GIB
    budget = 80 * 0.9 - weights - 1.5
    assert p.kv_budget_gib == pytest.approx(budget, abs=0.01)
    tokens = int(budget * GIB // (128 * 1024)) // 16 * 16
    assert p.kv_tokens_per_replica == tokens
    assert p.max_seqs_per_replica == tokens // 4112
    assert p.max_seqs_per_replica_without_window == tokens // 32768
    assert p.replicas == -(-200 // p.max_seqs_per_replica) and p.gpu_workers == p.replicas


def test_no_window_model_and_tensor_parallel():
    p = planner.plan(planner.PRESETS["mistral-7b-v0.3"], context_len=32768, target_concurrency=10,
                     gpu_memory_gib=24, tensor_parallel_size=2, gpus_per_worker=4)
    assert p.max_seqs_per_replica == p.max_seqs_per_replica_without_window
    assert p.gpu_workers == -(-p.replicas * 2 // 4)


def test_model_too_big_is_an_error():
    with pytest.raises(ValueError, match="does not fit"):
        planner.plan(planner.PRESETS["mistral-7b-v0.1"], 4096, 1, gpu_memory_gib=12)


def test_param_count_from_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MISTRAL_7B_CONFIG))
    shape = planner.ModelShape.from_hf_config(tmp_path)
    assert shape.num_params == pytest.approx(7.24e9, rel=0.005)
    assert (shape.num_kv_heads, shape.head_dim, shape.sliding_window) == (8, 128, 4096)


def test_param_count_matches_the_tiny_model_weights(tmp_path):
    from safetensors import safe_open

    from mistral_ray import tiny_model

    model = tiny_model.ensure(PROJECT_ROOT / ".state" / "models" / "tiny-mistral")
    with safe_open(str(model / "model.safetensors"), "np") as f:
        actual = sum(f.get_tensor(k).size for k in f.keys())
    assert planner.ModelShape.from_hf_config(model).num_params == actual


def test_write_into_edits_our_app_wherever_its_keys_are(tmp_path):
    # Another application first (with max_replicas of its own), and `router:` before `scaling:` in ours:
    # a regex on the first `max_replicas:` line would have changed the other application.
    path = tmp_path / "d.yaml"
    path.write_text("""# two apps in one Serve config
applications:
  - name: other
    import_path: other:app
    deployments:
      - name: Other
        autoscaling_config:
          max_replicas: 9   # theirs
  - name: mistral
    import_path: mistral_ray.app:build_app
    args:
      router:
        routing: {policy: pow2}
      engine:
        max_num_seqs: 8
      scaling:
        min_replicas: 1
        max_replicas: 2     # ours
""")
    p = planner.plan(planner.PRESETS["mistral-7b-v0.1"], 32768, 300, gpu_memory_gib=80)
    planner.write_into(path, p)
    text = path.read_text()
    assert "max_replicas: 9   # theirs" in text and "# two apps in one Serve config" in text
    svc = load_deployment(path).service
    assert svc.scaling.max_replicas == p.replicas and svc.engine.max_num_seqs == p.max_seqs_per_replica
    assert text.index("router:") < text.index("engine:") < text.index("scaling:")  # order kept


def test_write_into_keeps_comments(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text((PROJECT_ROOT / "deployments" / "mistral-7b-instruct-v0.1.yaml").read_text())
    p = planner.plan(planner.PRESETS["mistral-7b-v0.1"], 32768, 300, gpu_memory_gib=80)
    planner.write_into(path, p)
    svc = load_deployment(path).service
    assert svc.scaling.max_replicas == p.replicas and svc.engine.max_num_seqs == p.max_seqs_per_replica
    assert "# Mistral-7B-Instruct-v0.1 on NVIDIA GPUs" in path.read_text()


def test_lora_slots_come_out_of_the_gpu_kv_budget():
    from mistral_ray import planner

    shape = planner.PRESETS["mistral-7b-v0.1"]
    # q, k, v, o, gate, up, down of 32 layers: (in + out) = 81920 per layer, times the rank, bf16
    assert planner.lora_slot_bytes(shape, 16, "bfloat16") == 32 * 81920 * 16 * 2
    plain = planner.plan(shape, 32768, 64, gpu_memory_gib=22)
    lora = planner.plan(shape, 32768, 64, gpu_memory_gib=22, max_loras=4, max_lora_rank=16)
    assert lora.lora_slots_gib == 0.312 and plain.lora_slots_gib == 0
    assert round(plain.kv_budget_gib - lora.kv_budget_gib, 2) == 0.31


def test_the_shape_read_from_a_checkpoint_sizes_its_lora_slots(tmp_path):
    import json

    from mistral_ray import planner, tiny_model

    (tmp_path / "config.json").write_text(json.dumps({**tiny_model.ARCH, "vocab_size": 1024}))
    tiny = planner.ModelShape.from_hf_config(tmp_path)
    assert (tiny.hidden_size, tiny.intermediate_size, tiny.num_heads) == (256, 512, 8)
    # per layer: q 256+256, k and v 256+64 each, o 256+256, gate and up 256+512 each, down 512+256
    assert planner.lora_slot_bytes(tiny, 8, "float32") == 2 * (512 + 640 + 512 + 1536 + 768) * 8 * 4
