"""The embedded tiny Mistral: Mistral's architecture in miniature, built byte-for-byte the same everywhere."""

import json
import subprocess
import sys

import pytest

from mistral_ray import tiny_model

# sha256 over every file of a build with the pinned transformers/tokenizers/numpy (pyproject's `model` extra).
# A change here means a different model on every machine: update it only on purpose.
GOLDEN_DIGEST = "c489d1a560ec30833af9b6f42c44b4cc95a60e31138f5eb936fc040663c1eb02"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("tiny") / "model")


def test_architecture_is_mistral_in_miniature(built):
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert cfg["num_attention_heads"] == 8 and cfg["num_key_value_heads"] == 2  # GQA 4:1 like Mistral 7B
    assert cfg["head_dim"] == 32 and cfg["hidden_size"] == 256 and cfg["num_hidden_layers"] >= 2
    assert cfg["sliding_window"] == 64 and cfg["max_position_embeddings"] >= 2048
    assert (built / "model.safetensors").stat().st_size > 1_000_000


def test_tokenizer_and_chat_template(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built)
    ids = tok("Sliding window attention")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "Sliding window attention"
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}],
        tokenize=False,
    )
    assert text == "<s>[INST] Be brief.\n\nHi [/INST]Hello</s>[INST] Bye [/INST]"
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "x"}], tokenize=False)


def test_build_is_deterministic_across_processes(built, tmp_path):
    # A second build in a fresh interpreter (no shared RNG or caches) must give the same bytes.
    out = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "mistral_ray.cli", "tiny-model", "build", str(out)], check=True)
    assert tiny_model.digest(out) == tiny_model.digest(built)


def test_build_matches_golden_digest(built):
    assert tiny_model.digest(built) == GOLDEN_DIGEST


def test_ensure_does_not_rebuild(built):
    before = (built / "model.safetensors").stat().st_mtime_ns
    assert tiny_model.ensure(built) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == before


def test_ensure_never_replaces_a_checkpoint_that_is_there(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text('{"model_type": "mistral", "hidden_size": 4096}')
    (real / "model-00001-of-00002.safetensors").write_bytes(b"weights")
    assert tiny_model.ensure(real) == real
    assert sorted(p.name for p in real.iterdir()) == ["config.json", "model-00001-of-00002.safetensors"]
    assert json.loads((real / "config.json").read_text())["hidden_size"] == 4096
