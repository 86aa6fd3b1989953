"""The blocks each engine holds, from its own KV-cache events: vLLM's ZMQ publisher, read without vllm.

Each LLM replica's engine publishes on a PUB socket (topic: the replica id) and keeps a replay buffer
behind a ROUTER socket (`engine/vllm_engine.py` starts both; the replica reports their addresses in its
routing stats). A message is `(topic, seq as 8 bytes big-endian, msgpack(EventBatch))`; an EventBatch is
`[ts, events, dp_rank]` and each event a map tagged `type`: `BlockStored` (hashes of full blocks, with the
group's block size and, since vLLM 0.32, its kind and sliding window), `BlockRemoved`, `AllBlocksCleared`.

`ReplicaIndex` applies them in order. A gap in the sequence numbers (the PUB socket drops when a reader
falls behind, or the reader started late) is mended by replaying from the last applied number; when the
engine's buffer no longer reaches back that far, the index starts over from what it is told next and counts
a reset (`mistral_ray_kv_index_resets_total`): until the evicted blocks come back, it under-predicts, never
over-predicts. A group of an index never holds more than `max_blocks` hashes (the engine's own block count
bounds what it can cache: more means removals were lost, and the index resets).

vLLM does not de-duplicate blocks: two requests that computed the same prefix at once hold two blocks of
one hash, each stored and later removed on its own; the index counts copies, so the first removal does not
hide the second copy.

Hashes are kept as their low 64 bits (what vLLM publishes with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, and a
fixed-size key either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import msgspec

from mistral_ray.routing.kv_cache import Group

_MASK = (1 << 64) - 1
_DEVICE_MEDIA = (None, "GPU")  # vLLM tags device-resident blocks "GPU" on every platform; others are offload tiers
_decode = msgspec.msgpack.Decoder()


def key(block_hash: Any) -> int:
    """A block hash as the index keeps it (bytes from vLLM's default, or its published int)."""
    if isinstance(block_hash, (bytes, bytearray)):
        return int.from_bytes(block_hash, "big") & _MASK
    return int(block_hash) & _MASK


def decode(payload: bytes) -> list[dict]:
    """The events of one published batch."""
    batch = _decode.decode(payload)
    return list(batch[1]) if isinstance(batch, list) and len(batch) > 1 else []


@dataclass
class ReplicaIndex:
    """The exact set of block hashes one engine holds, per KV-cache group."""

    max_blocks: int
    groups: dict[int, Group] = field(default_factory=dict)
    blocks: dict[int, dict[int, int]] = field(default_factory=dict)  # group -> hash -> copies held
    seq: int = -1  # last applied sequence number
    resets: int = 0
    events: int = 0
    restart: bool = False  # after a reset that no replay could fill: the next message starts the count

    def size(self) -> int:
        return sum(len(s) for s in list(self.blocks.values()))  # read from the router's loop: no iteration race

    def clear(self) -> None:
        self.blocks = {g: {} for g in list(self.blocks)}

    def reset(self) -> None:
        """Start over: what the engine holds now is unknown until it is stored again."""
        self.clear()
        self.resets += 1

    def apply(self, events: Iterable[dict]) -> None:
        for event in events:
            self.events += 1
            kind = event.get("type")
            if kind == "AllBlocksCleared":
                self.clear()
                continue
            if event.get("medium") not in _DEVICE_MEDIA:
                continue
            group = event.get("group_idx") or 0
            if kind == "BlockStored":
                if group not in self.groups:
                    window = event.get("kv_cache_spec_sliding_window")
                    sliding = (event.get("kv_cache_spec_kind") or "").lower().startswith("sliding") or window
                    self.groups[group] = Group(int(event["block_size"]), int(window) if sliding and window else None)
                held = self.blocks.setdefault(group, {})
                for h in event.get("block_hashes") or ():
                    k = key(h)
                    held[k] = held.get(k, 0) + 1
                if len(held) > self.max_blocks:
                    self.reset()
            elif kind == "BlockRemoved":
                held = self.blocks.get(group)
                for h in (event.get("block_hashes") or ()) if held else ():
                    k = key(h)
                    copies = held.get(k, 0) - 1
                    if copies > 0:
                        held[k] = copies
                    else:
                        held.pop(k, None)

    def receive(self, seq: int, payload: bytes) -> Optional[int]:
        """Apply one message. Returns the sequence number to replay from when this one leaves a gap (the
        message is then not applied: the replay brings it again in order), else None."""
        if seq <= self.seq:
            return None  # a duplicate (replayed twice, or the PUB copy of a replayed batch)
        if seq != self.seq + 1 and not self.restart:  # the first message must be 0: an engine counts from 0
            return self.seq + 1
        self.restart = False
        self.apply(decode(payload))
        self.seq = seq
        return None

    def replayed(self, messages: list[tuple[int, bytes]], start: int) -> Optional[int]:
        """Apply a replay that was asked to start at `start`; if the engine's buffer no longer reaches back
        that far, reset first. A replay with a hole (the replay socket dropped some) is applied up to the hole;
        returns where to ask again, else None."""
        if not messages or messages[0][0] > start:
            self.reset()
            self.seq, self.restart = -1, True
        for seq, payload in messages:
            if seq <= self.seq:
                continue
            if seq != self.seq + 1 and not self.restart:
                return self.seq + 1
            self.restart = False
            self.apply(decode(payload))
            self.seq = seq
        return None

    def cached(self, group: int):
        held = self.blocks.get(group, set())
        return lambda h: key(h) in held
