"""kv_aware's direct channel between an LLM replica and the ingress routers, beside Serve's stats.

Out (ZMQ PUB, topic: the replica id): the replica's load as its engine counts it at every step (running and
waiting sequences, KV blocks in use) plus what the engine cannot count yet (sequences admitted by the gate,
not yet in its step), and how many requests each router's picks it has received. Published on every change,
at most once per turn of the event loop, and every `heartbeat_s`. Serve's own stats path (the controller
polls every `stats_period_s` and relays) is up to half a second old; a router that added its picks to such
a report over-counted every replica by what had finished meanwhile.

In (ZMQ PULL): the prompt token ids a router computed for a chat it is sending here, under a random key the
request carries in a header HAProxy sets (`routing/ingress.py`) and with a digest of the body they were
computed from (used only for a request with that same body); the gate hands them to the engine, which
then does not render and tokenize the messages again (1.3 ms of the replica's event loop for an 800-token
chat here; 0.2 ms with the ids). The ids go out before the router answers HAProxy, but may still be on their
way when the request comes: they are waited for up to `wait_s`, then the engine tokenizes.

Both sockets bind this node's address on free ports; the replica reports them with its KV-event addresses.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from typing import Optional

import msgspec
import zmq

from mistral_ray.routing.prompts import decode_ids
from mistral_ray.server.load import Inflight, engine_load

KEY_CHARS = 64  # a staging key is 32 hex digits; anything longer is not ours


def _endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class Staged:
    """Prompt ids waiting for their request, bounded in entries, bytes and age (a router's ids whose request
    went elsewhere, after a refused connection, are never taken)."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 << 20, ttl_s: float = 30.0):
        self.max_entries, self.max_bytes, self.ttl_s = max_entries, max_bytes, ttl_s
        self._entries: OrderedDict[bytes, tuple[float, bytes, bytes]] = OrderedDict()  # key -> (when, digest, ids)
        self._bytes = 0

    def put(self, key: bytes, digest: bytes, payload: bytes, now: float) -> None:
        if not key or len(key) > KEY_CHARS or not payload or len(payload) % 4 or len(payload) > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old[2])
        self._entries[key] = (now, digest, payload)
        self._bytes += len(payload)
        while self._entries and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes
                                 or next(iter(self._entries.values()))[0] < now - self.ttl_s):
            self._bytes -= len(self._entries.popitem(last=False)[1][2])

    def take(self, key: bytes, digest: bytes) -> Optional[list[int]]:
        """The ids staged under `key` for the body with `digest`, once (another body's: None, and gone)."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._bytes -= len(entry[2])
        return decode_ids(entry[2]) if entry[1] == digest else None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries


class RouterLink:
    def __init__(self, host: str, topic: str, max_prompt_ids: int = 1 << 20, heartbeat_s: float = 1.0,
                 wait_s: float = 0.005):
        """`max_prompt_ids`: the longest prompt the engine takes (a bigger message is dropped unread)."""
        self.topic, self.heartbeat_s, self.wait_s = topic.encode(), heartbeat_s, wait_s
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.PUB)  # sent to without waiting, from the event loop
        self.pull = self.ctx.socket(zmq.PULL)  # read without waiting when a request asks for its ids
        for sock in (self.pub, self.pull):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IPV6, ":" in host)
        self.pub.setsockopt(zmq.SNDHWM, 64)  # a router that falls behind drops snapshots; the next is whole
        self.pull.setsockopt(zmq.RCVHWM, 1024)
        self.pull.setsockopt(zmq.MAXMSGSIZE, 4 * max_prompt_ids + 64)
        bound = "[%s]" % host if ":" in host else host
        self.endpoints = {"load": _endpoint(host, self.pub.bind_to_random_port(f"tcp://{bound}")),
                          "prompts": _endpoint(host, self.pull.bind_to_random_port(f"tcp://{bound}"))}
        self.staged = Staged()
        self.inflight: Optional[Inflight] = None
        self.engine = (0, 0, 0.0)  # running, waiting, KV use as of the engine's last step
        self.steps = self.busiest = 0  # engine steps reported, most requests running at one
        self.seq = 0
        self._last: Optional[tuple] = None  # what the last snapshot said (an unchanged one is not sent again)
        self._scheduled = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread = 0
        self._tasks: list[asyncio.Task] = []

    def start(self, inflight: Inflight) -> None:
        """Publish `inflight`'s changes and the engine's steps from now on (on the running event loop)."""
        self.inflight, inflight.on_change = inflight, self.changed
        self._loop, self._thread = asyncio.get_running_loop(), threading.get_ident()
        self._tasks = [self._loop.create_task(self._heartbeat())]

    def engine_step(self, running: int, waiting: int, kv_usage: float) -> None:
        """vLLM's scheduler counts (engine/step_stats.py), on the replica's event loop."""
        self.engine = (running, waiting, kv_usage)
        self.steps, self.busiest = self.steps + 1, max(self.busiest, running)
        self.changed()

    def changed(self) -> None:
        if self._scheduled or self._loop is None:
            return
        self._scheduled = True
        if threading.get_ident() == self._thread:
            self._loop.call_soon(self._publish)
        else:
            self._loop.call_soon_threadsafe(self._publish)

    def snapshot(self) -> list:
        """[running, waiting, pending, KV use, {router: requests received}, sequence number]."""
        running, waiting, kv = self.engine
        arrivals = {}
        if self.inflight is not None:
            running, waiting, pending = engine_load(running, waiting, self.inflight.width())
            arrivals = dict(self.inflight.arrivals)
        else:
            pending = 0
        self.seq += 1
        return [running, waiting, pending, kv, arrivals, self.seq]

    def _publish(self, always: bool = False) -> None:
        self._scheduled = False
        snap = self.snapshot()
        said = (*snap[:3], round(snap[3], 3), sum(snap[4].values()))
        if said == self._last and not always:
            return
        self._last = said
        try:
            self.pub.send_multipart((self.topic, msgspec.msgpack.encode(snap)), flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # no room: the router gets the next snapshot
            pass

    async def _heartbeat(self) -> None:
        while True:  # an idle replica's last snapshot may have been dropped; a new router needs one
            await asyncio.sleep(self.heartbeat_s)
            self._publish(always=True)
            self._drain()  # ids whose requests went elsewhere: bounded here, not left in ZMQ's queue

    def _drain(self) -> None:
        now = time.monotonic()
        while True:
            try:
                frames = self.pull.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # nothing more (Again), or closed
                return
            if len(frames) == 3:
                self.staged.put(frames[0], frames[1], frames[2], now)

    async def prompt_ids(self, key: bytes, digest: bytes) -> Optional[list[int]]:
        """The ids a router staged under `key` for the body with `digest`, once; None if they are not here
        within `wait_s`."""
        deadline = time.monotonic() + self.wait_s
        while True:
            self._drain()
            if key in self.staged or time.monotonic() >= deadline:
                return self.staged.take(key, digest)
            await asyncio.sleep(0.0005)

    def close(self) -> None:
        if self.inflight is not None:
            self.inflight.on_change = None
        for task in self._tasks:
            task.cancel()
        self.pub.close(0)
        self.pull.close(0)
        self.ctx.term()
