"""LoRA adapters for the embedded tiny Mistral: fine-tunes to serve, route and test without downloads.

Each adapter is written in PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`), the
format vLLM loads, with random low-rank weights drawn from numpy's PCG64 generator seeded by the adapter's
name: the same name gives the same bytes everywhere. The update B @ A is scaled to the size of the base
weights, so an adapter's greedy answers differ from the base model's and from each other's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from pathlib import Path

from mistral_ray.tiny_model import ARCH, SEED

RANK = 8
ALPHA = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# (in, out) features of each target in the tiny model's attention.
_HEADS_OUT = {"q_proj": ARCH["num_attention_heads"] * ARCH["head_dim"],
              "k_proj": ARCH["num_key_value_heads"] * ARCH["head_dim"],
              "v_proj": ARCH["num_key_value_heads"] * ARCH["head_dim"]}


def _shape(target: str) -> tuple[int, int]:
    hidden = ARCH["hidden_size"]
    if target == "o_proj":
        return ARCH["num_attention_heads"] * ARCH["head_dim"], hidden
    return hidden, _HEADS_OUT[target]


def _seed(name: str) -> int:
    return SEED + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def weights(name: str) -> dict:
    """PEFT's tensors for adapter `name`: lora_A (r, in) and lora_B (out, r) of every target, every layer."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(_seed(name)))
    out = {}
    for layer in range(ARCH["num_hidden_layers"]):
        for target in TARGETS:
            fan_in, fan_out = _shape(target)
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            # (alpha / r) * B @ A has entries of about fan_in ** -0.5, as the base weight's (tiny_model._weights)
            out[f"{prefix}.lora_A.weight"] = rng.standard_normal((RANK, fan_in), dtype=np.float32) * np.float32(fan_in ** -0.5)
            out[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, RANK), dtype=np.float32)
                                              * np.float32(RANK ** -0.5 * RANK / ALPHA))
    return out


def peft_config(base: str) -> dict:
    return {"base_model_name_or_path": base, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "lora_alpha": ALPHA, "lora_dropout": 0.0, "modules_to_save": None, "peft_type": "LORA", "r": RANK,
            "target_modules": list(TARGETS), "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False}


def _build_into(out: Path, name: str) -> Path:
    from safetensors.numpy import save_file

    # unique across hosts too: replicas on several pods may build into one shared volume at once
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights(name), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(peft_config("tiny-mistral"), indent=2, sort_keys=True) + "\n")
    return tmp


def ensure(out_dir: str | Path, name: str | None = None) -> Path:
    """Write adapter `name` (default: the directory's name) into `out_dir` unless something is there: an
    existing adapter (or any file) is never replaced. Safe when replicas race (the first rename wins)."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        return out
    tmp = _build_into(out, name or out.name)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def merged(model, name: str) -> None:
    """Add adapter `name`'s update into a transformers MistralForCausalLM in place (W += alpha/r * B @ A):
    the reference a served adapter's answers are compared with."""
    import torch

    tensors = weights(name)
    with torch.no_grad():
        for layer in range(ARCH["num_hidden_layers"]):
            attn = model.model.layers[layer].self_attn
            for target in TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
                a = torch.from_numpy(tensors[f"{prefix}.lora_A.weight"])
                b = torch.from_numpy(tensors[f"{prefix}.lora_B.weight"])
                getattr(attn, target).weight += (ALPHA / RANK) * (b @ a)
