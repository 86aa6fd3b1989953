"""Capacity planning: how much KV fits on a replica, how many sequences that serves, how many replicas.

KV bytes per token = 2 (K and V) x layers x KV heads x head_dim x dtype bytes. GQA is why Mistral 7B needs
128 KiB per token instead of 512 KiB; the sliding window is why a 32k-token sequence holds only W tokens of
KV (vLLM frees blocks that slid out of the window), so concurrency at long contexts is set by W, not L.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


@dataclass(frozen=True)
class ModelShape:
    name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_params: float
    sliding_window: Optional[int]
    hidden_size: int = 0  # these three size the LoRA slots (0: unknown, no LoRA estimate)
    intermediate_size: int = 0
    num_heads: int = 0

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelShape":
        path = Path(path)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
        kv = cfg.get("num_key_value_heads", cfg["num_attention_heads"])
        attn = h * cfg["num_attention_heads"] * head_dim * 2 + h * kv * head_dim * 2
        params = n * (attn + 3 * h * i + 2 * h) + 2 * v * h + h
        return cls(path.name, n, kv, head_dim, params, cfg.get("sliding_window"), h, i, cfg["num_attention_heads"])


# Published architectures (config.json of each checkpoint).
PRESETS = {
    "mistral-7b-v0.1": ModelShape("Mistral-7B-v0.1", 32, 8, 128, 7.24e9, 4096, 4096, 14336, 32),
    "mistral-7b-v0.2": ModelShape("Mistral-7B-v0.2", 32, 8, 128, 7.24e9, None, 4096, 14336, 32),
    "mistral-7b-v0.3": ModelShape("Mistral-7B-v0.3", 32, 8, 128, 7.25e9, None, 4096, 14336, 32),
}


@dataclass(frozen=True)
class Plan:
    model: str
    kv_bytes_per_token: int
    weights_gib: float
    kv_budget_gib: float
    kv_tokens_per_replica: int
    context_len: int
    kv_tokens_per_seq: int
    kv_tokens_per_seq_without_window: int
    max_seqs_per_replica: int
    max_seqs_per_replica_without_window: int
    target_concurrency: int
    replicas: int
    gpu_workers: int
    lora_slots_gib: float = 0.0  # engine.lora: max_loras slots at max_lora_rank, taken from the KV budget on GPU


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * DTYPE_BYTES[dtype]


def lora_slot_bytes(shape: ModelShape, rank: int, dtype: str) -> int:
    """One LoRA slot as vLLM allocates it when the engine starts: for every linear layer of every decoder
    layer (q, k, v, o, gate, up, down), A (rank x in) and B (out x rank) at max_lora_rank, whatever the
    adapters loaded later hold (vllm/lora/layers/base_linear.py, create_lora_weights)."""
    h, i = shape.hidden_size, shape.intermediate_size
    if not (h and i and shape.num_heads):
        return 0  # a shape without them: no estimate
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    in_out = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return shape.num_layers * in_out * rank * DTYPE_BYTES[dtype]


def kv_tokens_per_seq(context_len: int, window: Optional[int], block_size: int) -> int:
    """Tokens of KV one sequence holds at its peak, in whole blocks. With a window, vLLM keeps the blocks
    that overlap the last W tokens: at most W + one partly-filled block."""
    held = context_len if window is None else min(context_len, window + block_size)
    return math.ceil(held / block_size) * block_size


def plan(
    shape: ModelShape,
    context_len: int,
    target_concurrency: int,
    dtype: str = "bfloat16",
    gpu_memory_gib: Optional[float] = None,
    gpu_memory_utilization: float = 0.9,
    overhead_gib: float = 1.5,
    kv_budget_gib: Optional[float] = None,
    tensor_parallel_size: int = 1,
    gpus_per_worker: int = 1,
    block_size: int = 16,
    max_num_seqs: Optional[int] = None,
    max_loras: int = 0,
    max_lora_rank: int = 16,
) -> Plan:
    """Either `gpu_memory_gib` (GPU: the budget is what is left after weights, activations and LoRA slots)
    or `kv_budget_gib` (CPU: vLLM takes VLLM_CPU_KVCACHE_SPACE as the budget; LoRA slots are host memory
    beside it). `max_loras`: engine.lora's slots (0: no LoRA)."""
    per_token = kv_bytes_per_token(shape, dtype)
    weights = shape.num_params * DTYPE_BYTES[dtype] / GIB
    lora = max_loras * lora_slot_bytes(shape, max_lora_rank, dtype) / GIB
    if kv_budget_gib is None:
        if gpu_memory_gib is None:
            raise ValueError("give gpu_memory_gib (GPU) or kv_budget_gib (CPU)")
        usable = gpu_memory_gib * gpu_memory_utilization * tensor_parallel_size
        kv_budget_gib = usable - weights - lora - overhead_gib * tensor_parallel_size
        if kv_budget_gib <= 0:
            raise ValueError(f"{shape.name} ({weights:.1f} GiB of weights) does not fit in {usable:.1f} GiB")
    tokens = int(kv_budget_gib * GIB // per_token) // block_size * block_size
    per_seq = kv_tokens_per_seq(context_len, shape.sliding_window, block_size)
    per_seq_full = kv_tokens_per_seq(context_len, None, block_size)
    seqs = tokens // per_seq
    if max_num_seqs is not None:
        seqs = min(seqs, max_num_seqs)
    replicas = math.ceil(target_concurrency / seqs) if seqs else 0
    return Plan(
        model=shape.name,
        kv_bytes_per_token=per_token,
        weights_gib=round(weights, 2),
        kv_budget_gib=round(kv_budget_gib, 2),
        kv_tokens_per_replica=tokens,
        context_len=context_len,
        kv_tokens_per_seq=per_seq,
        kv_tokens_per_seq_without_window=per_seq_full,
        max_seqs_per_replica=seqs,
        max_seqs_per_replica_without_window=tokens // per_seq_full,
        target_concurrency=target_concurrency,
        replicas=replicas,
        gpu_workers=math.ceil(replicas * tensor_parallel_size / gpus_per_worker),
        lora_slots_gib=round(lora, 3),
    )


def report(p: Plan) -> str:
    rows = asdict(p)
    rows["kv_bytes_per_token"] = f"{p.kv_bytes_per_token} ({p.kv_bytes_per_token / 1024:g} KiB)"
    width = max(map(len, rows))
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows.items())


def write_into(deployment_file: str | Path, p: Plan) -> None:
    """Set scaling.max_replicas and engine.max_num_seqs of the file's mistral-ray application, editing it as
    YAML (round trip: comments, key order and the other applications stay as they were). A result that
    does not validate is not written."""
    from ruamel.yaml import YAML

    from mistral_ray.config import APP_IMPORT_PATH, load_deployment

    path = Path(deployment_file)
    original = path.read_text()
    rt = YAML()
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)  # the `  - name:` style of Serve config files
    doc = rt.load(original)
    apps = [a for a in doc.get("applications") or [] if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected one application with import_path {APP_IMPORT_PATH}")
    args = apps[0].setdefault("args", {})
    args.setdefault("scaling", {})["max_replicas"] = max(p.replicas, 1)
    args.setdefault("engine", {})["max_num_seqs"] = max(p.max_seqs_per_replica, 1)
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    path.write_text(buffer.getvalue())
    try:
        load_deployment(path)
    except Exception:
        path.write_text(original)
        raise
