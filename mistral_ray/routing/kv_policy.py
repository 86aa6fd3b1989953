"""`kv_aware`: the replica whose engine really holds the most of the prompt, by its own KV events.

For each replica whose index is in (`kv_feed.py`), the prompt's token ids (the ingress router tokenized
them as the engine will, `routing/tokens.py`) are hashed into blocks as that engine hashes them
(`kv_cache.block_hashes`, its block size and seed) and scored by the tokens it would reuse under vLLM's
rules for each of its KV-cache groups (`kv_cache.reusable_tokens`: sliding-window groups by the window
rule, full-attention ones by the longest prefix). The best scorer gets the request unless it is overloaded
(the same two-threshold check as prefix_affinity); nothing reusable anywhere, or a chat's first request,
goes by load. The scores stay on the hint (`RouteHint.predicted`): the ingress router tells the chosen
replica what was predicted, and the replica compares it with the engine's own count.

Without token ids (a body the router could not read, a prompt it does not tokenize) or before any index is
in, the policy is prefix_affinity's.
"""

from __future__ import annotations

from typing import Optional

from mistral_ray.routing.hint import RouteHint
from mistral_ray.routing.kv_cache import NONE_HASH_SEED, block_hashes, none_hash, reusable_tokens
from mistral_ray.routing.kv_feed import KVFeed
from mistral_ray.routing.policies import Decision, Load, PrefixAffinity, PrefixIndex


class KVAware(PrefixAffinity):
    name = "kv_aware"

    def __init__(self, feed: KVFeed, index: PrefixIndex, **kwargs):
        super().__init__(index, **kwargs)
        self.feed = feed

    def scores(self, tokens: tuple[int, ...], loads: list[Load]) -> dict[str, int]:
        """Predicted reusable prompt tokens per replica whose index is in."""
        hashes: dict[tuple[int, Optional[str]], list[bytes]] = {}
        scores: dict[str, int] = {}
        for load in loads:
            index = self.feed.ready(load.replica)
            if index is None:
                continue
            groups = sorted(index.groups.items())
            size = groups[0][1].block_size
            seed = self.feed.source(load.replica).get("seed") or NONE_HASH_SEED  # none: vLLM's own default
            chain = hashes.get((size, seed))
            if chain is None:
                chain = hashes[(size, seed)] = block_hashes(tokens, size, none_hash(seed),
                                                            limit=max(0, len(tokens) - 1) // size)
            scores[load.replica] = reusable_tokens(len(tokens), chain, size,
                                                   [(group, index.cached(g)) for g, group in groups])
        return scores

    def decide(self, hint: Optional[RouteHint], loads: list[Load]) -> Decision:
        if hint is None or not hint.tokens or not loads:
            return super().decide(hint, loads)
        scores = self.scores(hint.tokens, loads)
        if not scores:  # no index in yet: the text-prefix guess
            return super().decide(hint, loads)
        hint.predicted.update(scores)
        if not hint.follow_up:  # see PrefixAffinity.decide: first turns spread by load
            return Decision(self._by_load(loads), "load")
        best = max(scores.values())
        if best == 0:
            return Decision(self._by_load(loads), "new_prefix")
        holders = [l for l in loads if scores.get(l.replica) == best and not self._overloaded(l, loads)]
        if not holders:
            return Decision(self._by_load(loads), "overloaded")
        return Decision(self._prefer(min(holders, key=lambda l: (l.ongoing, l.kv_usage)), loads), "kv")

    def forget(self, replica: str) -> None:
        super().forget(replica)
        self.feed.forget(replica)
