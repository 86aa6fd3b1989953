"""One thread per router process that reads every LLM replica's KV events into its `ReplicaIndex`.

Replicas report where their engine publishes (`policies.KV_EVENTS` in their routing stats: PUB and replay
addresses, topic, hash seed, block count); the request router calls `track` for each replica it sees and `forget` when one leaves. ZMQ
sockets belong to the thread that uses them, so those calls only queue commands; the policy reads the
indexes from the router's event loop (a set membership test under the GIL; a reset swaps whole sets).

A new index asks the engine to replay from sequence 0, so a router that starts after its replicas (or
restarts) learns what they already hold while their replay buffer reaches back that far.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

import zmq

from mistral_ray.routing.kv_events import ReplicaIndex

logger = logging.getLogger("ray.serve")
_END = (-1).to_bytes(8, "big", signed=True)


class KVFeed:
    def __init__(self, max_blocks: int, replay_timeout_s: float = 2.0):
        self.max_blocks, self.replay_timeout_s = max_blocks, replay_timeout_s
        self.indexes: dict[str, ReplicaIndex] = {}
        self._sources: dict[str, dict] = {}  # replica -> its reported addresses (as tracked)
        self._topics: dict[bytes, str] = {}
        self._commands: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # --- the router's side (its event loop) ---------------------------------------------------------------
    def track(self, replica: str, source: Optional[dict], max_blocks: Optional[int] = None) -> None:
        if not source or self._sources.get(replica) == source:
            return
        self._sources[replica] = source
        # The engine's own block count bounds what it can cache; without it, routing.index_blocks.
        self.indexes[replica] = ReplicaIndex(max_blocks or self.max_blocks)
        self._commands.put(("track", replica, source))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mistral-ray-kv-feed", daemon=True)
            self._thread.start()

    def forget(self, replica: str) -> None:
        if self._sources.pop(replica, None) is not None:
            self.indexes.pop(replica, None)
            self._commands.put(("forget", replica, None))

    def source(self, replica: str) -> dict:
        return self._sources.get(replica) or {}

    def ready(self, replica: str) -> Optional[ReplicaIndex]:
        """The replica's index once it has applied anything (else the policy falls back)."""
        index = self.indexes.get(replica)
        return index if index is not None and index.seq >= 0 and index.groups else None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    # --- the feed's thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        connected: dict[str, dict] = {}
        try:
            while not self._stop.is_set():
                self._commands_to(sub, connected)
                if not sub.poll(100):
                    continue
                while sub.poll(0):
                    topic, seq, payload = sub.recv_multipart()
                    replica = self._topics.get(topic)
                    index = self.indexes.get(replica) if replica else None
                    if index is None:
                        continue
                    start = index.receive(int.from_bytes(seq, "big", signed=True), payload)
                    if start is not None:
                        self._replay(ctx, replica, index, connected[replica]["replay"], start)
        except Exception:  # the feed must never take the router down: routing falls back without it
            logger.exception("KV event feed stopped")
        finally:
            sub.close(0)
            ctx.term()

    def _commands_to(self, sub, connected: dict[str, dict]) -> None:
        while True:
            try:
                command, replica, source = self._commands.get_nowait()
            except queue.Empty:
                return
            old = connected.pop(replica, None)
            if old is not None:
                sub.disconnect(old["pub"])
                self._topics.pop(old["topic"].encode(), None)
            if command == "track":
                sub.connect(source["pub"])
                connected[replica] = source
                self._topics[source["topic"].encode()] = replica
                index = self.indexes.get(replica)
                if index is not None:
                    self._replay(sub.context, replica, index, source.get("replay"), 0)

    def _replay(self, ctx, replica: str, index: ReplicaIndex, endpoint: Optional[str], start: int) -> None:
        """Ask the engine's replay socket for every batch from `start`; reset the index if it cannot."""
        messages: list[tuple[int, bytes]] = []
        if endpoint:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            try:
                sock.connect(endpoint)
                sock.send_multipart((b"", start.to_bytes(8, "big")))
                deadline = time.monotonic() + self.replay_timeout_s
                while time.monotonic() < deadline:
                    if not sock.poll(max(1, int(1000 * (deadline - time.monotonic())))):
                        break
                    frames = sock.recv_multipart()
                    if len(frames) != 4 or frames[2] == _END:
                        break
                    messages.append((int.from_bytes(frames[2], "big", signed=True), frames[3]))
            finally:
                sock.close(0)
        if start == 0 and not messages and index.seq < 0:
            return  # a fresh engine with nothing published yet: nothing was missed
        index.replayed(messages, start)
