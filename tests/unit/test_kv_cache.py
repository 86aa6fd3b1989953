"""The router's block hashes and hit rules against vLLM's own functions (vllm is imported here only)."""

import random

import pytest

from mistral_ray.routing.kv_cache import Group, block_hashes, none_hash, reusable_blocks, reusable_tokens


def test_block_hashes_are_vllms(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kvu

    kvu.init_none_hash(sha256)
    tokens = [random.Random(1).randrange(32000) for _ in range(100)]
    parent, expected = None, []
    for i in range(100 // 32):
        parent = kvu.hash_block_tokens(sha256, parent, tokens[i * 32:(i + 1) * 32], None)
        expected.append(bytes(parent))
    assert block_hashes(tokens, 32) == expected
    assert block_hashes(tokens, 32, limit=2) == expected[:2]
    assert none_hash() == bytes(kvu.NONE_HASH)


def test_seed_follows_pythonhashseed(monkeypatch):
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kvu

    monkeypatch.setenv("PYTHONHASHSEED", "7")
    kvu.init_none_hash(sha256)
    try:
        assert none_hash() == bytes(kvu.NONE_HASH) == none_hash("7") != none_hash("vllm-none-hash")
    finally:
        monkeypatch.delenv("PYTHONHASHSEED")
        kvu.init_none_hash(sha256)


class _Pool:
    """What find_longest_cache_hit asks of vLLM's BlockPool."""

    def __init__(self, cached: set, block_size: int):
        from vllm.v1.core.kv_cache_utils import KVCacheBlock

        self.cached, self.hash_block_size = cached, block_size
        self.null_block = KVCacheBlock(-1)
        self._block = KVCacheBlock(0)

    def get_cached_block(self, block_hash, group_ids):
        return [self._block] * len(group_ids) if block_hash in self.cached else None


@pytest.mark.parametrize("window,block", [(64, 32), (64, 16), (64, 128), (4096, 16), (33, 32)])
def test_sliding_window_rule_is_vllms(window, block):
    import torch
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager
    from vllm.v1.kv_cache_interface import SlidingWindowSpec

    spec = SlidingWindowSpec(block_size=block, num_kv_heads=2, head_size=32, dtype=torch.float32,
                             sliding_window=window)
    rng = random.Random(window * 1000 + block)
    for trial in range(300):
        n = rng.randrange(0, 24)
        hashes = [bytes([trial % 256, i]) for i in range(n)]
        density = rng.random()
        cached = {h for h in hashes if rng.random() < density}
        prompt = n * block + rng.randrange(0, block + 1)  # the blocks are the prompt's full ones
        blocks, _ = SlidingWindowManager.find_longest_cache_hit(
            hashes, max(0, prompt - 1), [0], _Pool(cached, block), spec, False, block)
        ours = reusable_tokens(prompt, hashes, block, [(Group(block, window), cached.__contains__)])
        assert ours == len(blocks[0]) * block, (window, block, n, sorted(hashes.index(h) for h in cached))


def test_full_attention_is_the_leading_run():
    cached = {0, 1, 2, 4}
    assert reusable_blocks(cached.__contains__, 6, Group(16)) == 3
    assert reusable_blocks(cached.__contains__, 2, Group(16)) == 2


def test_sliding_window_survives_evicted_prefix():
    """The case the others drop: the first blocks are gone, the window before the end is there."""
    cached = {3, 4, 5}  # blocks 0..2 evicted
    assert reusable_blocks(cached.__contains__, 6, Group(32, 64)) == 6  # 2 blocks cover W - 1 = 63 tokens
    assert reusable_blocks(cached.__contains__, 6, Group(32)) == 0  # full attention: nothing
    assert reusable_blocks({5}.__contains__, 6, Group(32, 64)) == 0  # one block is not a window
    assert reusable_blocks({0, 5}.__contains__, 6, Group(32, 64)) == 1  # the leading run still counts


def test_several_groups_cap_each_other_as_vllms_coordinator():
    hashes = [bytes([i]) for i in range(6)]
    full = {hashes[i] for i in (0, 1)}.__contains__
    window = {hashes[i] for i in (2, 3, 4, 5)}.__contains__
    # full attention reuses 2 blocks; capped there, the window group's blocks 0..1 are not cached: 0
    assert reusable_tokens(6 * 16 + 1, hashes, 16, [(Group(16), full), (Group(16, 32), window)]) == 0
    both = {hashes[i] for i in range(6)}.__contains__
    assert reusable_tokens(6 * 16 + 1, hashes, 16, [(Group(16, 32), window), (Group(16), both)]) == 6 * 16
    assert reusable_tokens(6 * 16 + 1, hashes, 16, [(Group(16, 32), both), (Group(16), full)]) == 2 * 16
