"""What an engine's prefix cache would reuse for a prompt, computed from its token ids as vLLM computes it:
pure logic, no vllm (the router does not load the engine).

Block hashes follow vLLM 0.32's `hash_block_tokens` with `prefix_caching_hash_algo: sha256` (its default):
each full block of `block_size` tokens hashes `(parent hash, tuple(token ids), extra keys)` pickled with the
highest protocol; the first block's parent is `NONE_HASH`, the hash of the fixed seed "vllm-none-hash"
(PYTHONHASHSEED, when set in the engine, replaces that seed: the router must then see the same value).
`tests/unit/test_kv_cache.py` checks both against vLLM's own functions.

Hit rules (vLLM's `find_longest_cache_hit` of each KV-cache group's manager):

- full attention: the longest run of cached blocks from the first;
- sliding window W: a prefix of L tokens is reusable when the blocks covering the W - 1 tokens before L
  (`ceil((W - 1) / block_size)` blocks) are cached, whatever happened to the blocks before them; the
  longest such L wins, and without one, the leading run of cached blocks counts.

A hit never covers the prompt's last token (the engine must compute it to sample): at most
`prompt_tokens - 1` tokens, in whole blocks. A model with several groups (full attention and a window)
runs vLLM's HybridKVCacheCoordinator loop: each group's hit is capped by the previous one's, round after
round, until the length stops shrinking.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

NONE_HASH_SEED = "vllm-none-hash"  # vLLM's DEFAULT_NONE_HASH_SEED


def sha256(value) -> bytes:
    return hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def none_hash(seed: Optional[str] = None) -> bytes:
    """The parent hash of a prompt's first block, as an engine started with this environment derives it."""
    return sha256(seed if seed is not None else os.environ.get("PYTHONHASHSEED", NONE_HASH_SEED))


def block_hashes(tokens: Sequence[int], block_size: int, root: Optional[bytes] = None,
                 extra_keys: Optional[tuple] = None, limit: Optional[int] = None) -> list[bytes]:
    """The chained hash of every full block of `tokens` (at most `limit` blocks)."""
    parent = root if root is not None else none_hash()
    out: list[bytes] = []
    count = len(tokens) // block_size if limit is None else min(limit, len(tokens) // block_size)
    for i in range(count):
        parent = sha256((parent, tuple(tokens[i * block_size:(i + 1) * block_size]), extra_keys))
        out.append(parent)
    return out


@dataclass(frozen=True)
class Group:
    """One KV-cache group of an engine, as its KV events describe it."""

    block_size: int
    sliding_window: Optional[int] = None  # None: full attention

    @property
    def blocks_for_hit(self) -> int:
        """Contiguous cached blocks a sliding-window hit needs (vLLM's `_contiguous_blocks_for_hit`)."""
        assert self.sliding_window is not None
        return max(1, math.ceil((self.sliding_window - 1) / self.block_size))


def reusable_blocks(cached: Callable[[int], bool], num_blocks: int, group: Group) -> int:
    """How many leading blocks of a prompt's `num_blocks` hashable blocks one group would reuse, where
    `cached(i)` says whether block i is in that engine's cache."""
    if group.sliding_window is None:
        n = 0
        while n < num_blocks and cached(n):
            n += 1
        return n
    need = group.blocks_for_hit
    run = 0
    for i in range(num_blocks - 1, -1, -1):  # right to left: the longest prefix whose window is cached
        if cached(i):
            run += 1
            if run >= need:
                return i + run
        else:
            run = 0
    return run  # no full window anywhere: the leading run (blocks 0..run-1) is still a hit


def reusable_tokens(prompt_tokens: int, hashes: Sequence[bytes], block_size: int,
                    groups: Sequence[tuple[Group, Callable[[bytes], bool]]]) -> int:
    """Prompt tokens an engine would take from its cache: `hashes` are the prompt's block hashes at
    `block_size` (every group of the engines we serve has the same block size), `groups` each group with its
    membership test. The engine reuses at most `prompt_tokens - 1` tokens, in whole blocks."""
    if not groups:
        return 0
    blocks = min(len(hashes), max(0, prompt_tokens - 1) // block_size)
    ordered = sorted(groups, key=lambda g: g[0].sliding_window is not None)  # full attention first, as vLLM
    while True:
        capped = blocks
        for group, has in ordered:
            capped = reusable_blocks(lambda i, has=has: has(hashes[i]), capped, group)
        if capped == blocks:
            return blocks * block_size
        blocks = capped
