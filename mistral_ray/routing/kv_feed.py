"""One thread per router process that reads every LLM replica's KV events into its `ReplicaIndex`, and
each replica's load as its engine counts it (`server/link.py`) into an `EngineLoad`.

Replicas report where their engine publishes (`policies.KV_EVENTS` in their routing stats: PUB and replay
addresses, topic, hash seed, block count, and their own load PUB); the request router calls `track` for each
replica it sees and `forget` when one leaves. ZMQ sockets belong to the thread that uses them, so those calls
only queue commands; the policy reads the indexes and loads from the router's event loop (a set membership
test or an attribute read under the GIL; a reset swaps whole sets, a load snapshot replaces the last).

A new index asks the engine to replay from sequence 0, so a router that starts after its replicas (or
restarts) learns what they already hold while their replay buffer reaches back that far.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import msgspec
import zmq

from mistral_ray.routing.kv_events import ReplicaIndex

logger = logging.getLogger("ray.serve")
_END = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class EngineLoad:
    """One replica's snapshot (`RouterLink.snapshot`): sequences its engine runs and queues as of its last
    step, those admitted and not yet counted by the engine, KV blocks in use (0..1), requests received per
    router."""

    running: int
    waiting: int
    pending: int
    kv_usage: float
    arrivals: dict = field(default_factory=dict)
    seq: int = 0
    at: float = 0.0  # when it came (monotonic)

    @property
    def ongoing(self) -> int:
        return self.running + self.waiting + self.pending


def _load(payload: bytes, now: float) -> Optional[EngineLoad]:
    snap = msgspec.msgpack.decode(payload)
    if not isinstance(snap, list) or len(snap) != 6 or not isinstance(snap[4], dict):
        return None
    return EngineLoad(int(snap[0]), int(snap[1]), int(snap[2]), float(snap[3]),
                      {str(k): int(v) for k, v in snap[4].items()}, int(snap[5]), now)


class KVFeed:
    def __init__(self, max_blocks: int, replay_timeout_s: float = 2.0, load_stale_s: float = 3.0):
        self.max_blocks, self.replay_timeout_s = max_blocks, replay_timeout_s
        self.load_stale_s = load_stale_s  # three of a replica's heartbeats: past it, Serve's stats again
        self.indexes: dict[str, ReplicaIndex] = {}
        self.loads: dict[str, EngineLoad] = {}
        self.load_reports = 0  # snapshots received (the router's metric reads it)
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
        self.indexes.pop(replica, None)  # made anew when the feed connects: no old engine's events in it
        self.loads.pop(replica, None)
        # The engine's own block count bounds what it can cache; without it, routing.index_blocks.
        self._commands.put(("track", replica, {**source, "max_blocks": max_blocks or self.max_blocks}))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mistral-ray-kv-feed", daemon=True)
            self._thread.start()

    def forget(self, replica: str) -> None:
        if self._sources.pop(replica, None) is not None:
            self.indexes.pop(replica, None)
            self.loads.pop(replica, None)
            self._commands.put(("forget", replica, None))

    def load(self, replica: str) -> Optional[EngineLoad]:
        """The replica's last load snapshot, if it publishes one and one came lately (a replica whose link
        or event loop stalled must not look idle for good)."""
        load = self.loads.get(replica)
        return load if load is not None and time.monotonic() - load.at <= self.load_stale_s else None

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
        sub, loads = ctx.socket(zmq.SUB), ctx.socket(zmq.SUB)
        poller = zmq.Poller()
        for sock in (sub, loads):
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.LINGER, 0)
            poller.register(sock, zmq.POLLIN)
        connected: dict[str, dict] = {}
        try:
            while not self._stop.is_set():
                self._commands_to(sub, loads, connected)
                ready = dict(poller.poll(100))
                if loads in ready:
                    self._read_loads(loads)
                if sub in ready:
                    self._read_events(ctx, sub, connected)
        except Exception:  # the feed must never take the router down: routing falls back without it
            logger.exception("KV event feed stopped")
        finally:
            self.indexes.clear()  # nothing stale to route on: the policy falls back
            self.loads.clear()
            self._sources.clear()  # and the next report of each replica tracks it again, on a new thread
            self._thread = None
            sub.close(0)
            loads.close(0)
            ctx.term()

    def _read_loads(self, sock) -> None:
        while sock.poll(0):
            frames = sock.recv_multipart()
            replica = self._topics.get(frames[0]) if len(frames) == 2 else None
            if replica is None or replica not in self._sources:
                continue
            try:
                load = _load(frames[1], time.monotonic())
            except (msgspec.DecodeError, TypeError, ValueError):
                load = None
            if load is not None:
                self.loads[replica] = load
                self.load_reports += 1

    def _read_events(self, ctx, sub, connected: dict[str, dict]) -> None:
        while sub.poll(0):
            frames = sub.recv_multipart()
            replica = self._topics.get(frames[0]) if len(frames) == 3 else None
            index = self.indexes.get(replica) if replica else None
            if index is None:
                continue
            try:
                start = index.receive(int.from_bytes(frames[1], "big", signed=True), frames[2])
                if start is not None:
                    self._replay(ctx, index, connected[replica].get("replay"), start)
            except Exception:  # one engine's bad batch: start its index over, keep the others
                logger.exception("KV events of %s: index reset", replica)
                index.reset()
                index.seq, index.restart = -1, True

    def _commands_to(self, sub, loads, connected: dict[str, dict]) -> None:
        while True:
            try:
                command, replica, source = self._commands.get_nowait()
            except queue.Empty:
                return
            old = connected.pop(replica, None)
            if old is not None:
                sub.disconnect(old["pub"])
                if old.get("load"):
                    loads.disconnect(old["load"])
                self._topics.pop(old["topic"].encode(), None)
            if command == "forget":
                self.indexes.pop(replica, None)  # one a track still queued before the forget made
                self.loads.pop(replica, None)
            if command == "track":
                try:
                    sub.connect(source["pub"])
                    if source.get("load"):
                        loads.connect(source["load"])
                except zmq.ZMQError:
                    logger.warning("KV events of %s: cannot connect to %s", replica, source.get("pub"))
                    continue
                connected[replica] = source
                self._topics[source["topic"].encode()] = replica
                index = ReplicaIndex(source["max_blocks"])
                self._replay(sub.context, index, source.get("replay"), 0, tracking=True)
                self.indexes[replica] = index

    def _replay(self, ctx, index: ReplicaIndex, endpoint: Optional[str], start: int, tracking: bool = False,
                attempts: int = 3) -> None:
        """Ask the engine's replay socket for every batch from `start`; reset the index if it cannot."""
        for _ in range(attempts):
            messages = self._fetch(ctx, endpoint, start)
            if tracking and start == 0 and not messages and index.seq < 0:
                return  # a fresh engine with nothing published yet: nothing was missed
            start = index.replayed(messages, start)
            if start is None:
                return
        index.reset()  # holes every time: start over rather than ask forever
        index.seq, index.restart = -1, True

    def _fetch(self, ctx, endpoint: Optional[str], start: int) -> list[tuple[int, bytes]]:
        messages: list[tuple[int, bytes]] = []
        if endpoint:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)  # a whole buffer's replay: no drops on our side
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
        return messages
