"""Builds the embedded tiny Mistral: the same architecture as Mistral 7B, small enough for a laptop CPU.

It keeps what makes Mistral Mistral for a serving stack — grouped-query attention (4 query heads per KV
head), a sliding attention window, the `[INST] ... [/INST]` chat template — so that paging, routing and
capacity code is exercised for real without downloading 14 GB. Weights come from numpy's PCG64 generator
(stable across platforms and versions) and the tokenizer is trained on text shipped in the package, so the
build is byte-for-byte reproducible.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

SEED = 20231010  # Mistral 7B's release date
ARCH = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,  # vLLM's CPU attention rejects 16
    max_position_embeddings=4096,
    sliding_window=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
TARGET_VOCAB = 1024
# Mistral-7B-Instruct's template, except that a system message is folded into the first user turn
# (as Mistral's own later templates do) instead of raising.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] + '\\n\\n' %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only system, user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)
SPECIAL = ["<unk>", "<s>", "</s>"]


def _corpus() -> list[str]:
    text = (Path(__file__).parent / "data" / "corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    # Like Mistral's tokenizer: BOS on every encoded prompt (chat templates emit it themselves).
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=ARCH["max_position_embeddings"],
    )


def mistral_config(vocab_size: int, **overrides):
    from transformers import MistralConfig

    tok_ids = dict(bos_token_id=SPECIAL.index("<s>"), eos_token_id=SPECIAL.index("</s>"))
    return MistralConfig(vocab_size=vocab_size, torch_dtype="float32", **tok_ids, **(ARCH | overrides))


def _weights(shapes: dict[str, tuple[int, ...]]) -> dict:
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(SEED))
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype=np.float32)
        else:
            # Scaled so activations keep unit size: logits then have clear winners, and greedy decoding
            # does not hinge on float rounding differences between vLLM and transformers kernels.
            std = 1.0 if "embed_tokens" in name else shape[-1] ** -0.5
            out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return out


def build(out_dir: str | Path) -> Path:
    """Write config, safetensors weights, tokenizer and chat template to `out_dir` (replacing it)."""
    out = Path(out_dir)
    tmp = _build_into(out)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def ensure(out_dir: str | Path) -> Path:
    """Build unless something is there already: an existing directory with any file in it (the tiny model,
    or a real checkpoint someone put there) is never replaced. Safe when several replicas on one node race:
    each builds into its own temporary directory and the first rename wins (the builds are byte-identical)."""
    out = Path(out_dir)
    if out.is_dir() and any(out.iterdir()):
        return out
    tmp = _build_into(out)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _build_into(out: Path) -> Path:
    import torch
    from safetensors.numpy import save_file
    from transformers import MistralForCausalLM

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer()
    config = mistral_config(len(tokenizer))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MistralForCausalLM(config).state_dict().items()}
    save_file(_weights(shapes), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config.architectures = ["MistralForCausalLM"]
    config_dict = json.loads(config.to_json_string(use_diff=False))
    config_dict.pop("transformers_version", None)  # keep the bytes independent of the installed version
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(tmp)
    path = tmp / "tokenizer_config.json"  # sorted keys: reproducible bytes
    path.write_text(json.dumps(json.loads(path.read_text()), indent=2, sort_keys=True) + "\n")
    return tmp


def digest(model_dir: str | Path) -> str:
    """One sha256 over every file's name and bytes, for reproducibility checks."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()
