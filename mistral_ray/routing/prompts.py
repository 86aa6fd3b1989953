"""kv_aware: a chat's prompt token ids, sent ahead to the replica that will serve it.

The ingress router has tokenized the chat to rank the replicas (`tokens.py`); pushing the ids to the chosen
replica's link (`server/link.py`) under a random key, which the forwarded request carries in a header only
HAProxy sets, spares that replica's engine rendering and tokenizing the messages again. The ids travel with
a digest of the body they were computed from: the replica uses them only for that same body. They go only
to a replica whose engine renders the probe chat (`hint.PROBE_CHAT`) to the ids the router does. Best
effort: a push that cannot go out at once (no connection yet, a full pipe) is dropped and the request
carries no key, and the engine tokenizes as usual.
"""

from __future__ import annotations

import array
import hashlib
import logging
import secrets
import sys
from collections import OrderedDict
from typing import Optional

import zmq

logger = logging.getLogger("ray.serve")
MAX_SOCKETS = 256  # replicas one router pushes to; the least recently used beyond go

def body_digest(body: bytes) -> bytes:
    """What binds staged ids to the request body they were computed from."""
    return hashlib.blake2b(body, digest_size=16).digest()


def encode_ids(ids) -> bytes:
    """Token ids as little-endian uint32."""
    packed = array.array("I", ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def decode_ids(payload: bytes) -> list[int]:
    packed = array.array("I")
    packed.frombytes(payload)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tolist()


class PromptSender:
    """One PUSH socket per replica link, used from the ingress router's event loop (never waits)."""

    def __init__(self, high_water: int = 256):
        self.high_water = high_water
        self._ctx: Optional[zmq.Context] = None
        self._sockets: OrderedDict[str, zmq.Socket] = OrderedDict()

    def send(self, endpoint: str, ids, digest: bytes) -> Optional[str]:
        """The key the ids (of the body with `digest`) were staged under at `endpoint`, or None if they could
        not go out at once."""
        sock = self._socket(endpoint)
        if sock is None:
            return None
        key = secrets.token_hex(16)
        try:
            sock.send_multipart((key.encode(), digest, encode_ids(ids)), flags=zmq.DONTWAIT)
        except zmq.Again:  # not connected yet, or the replica is not reading: it tokenizes this one
            return None
        except zmq.ZMQError as exc:
            logger.warning("prompt ids to %s: %s", endpoint, exc)
            self._drop(endpoint)
            return None
        return key

    def _socket(self, endpoint: str) -> Optional[zmq.Socket]:
        sock = self._sockets.get(endpoint)
        if sock is not None:
            self._sockets.move_to_end(endpoint)
            return sock
        if self._ctx is None:
            self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, self.high_water)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a peer not connected: send says so at once
        sock.setsockopt(zmq.IPV6, endpoint.startswith("tcp://["))
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            logger.warning("prompt ids: cannot connect to %s: %s", endpoint, exc)
            sock.close(0)
            return None
        self._sockets[endpoint] = sock
        while len(self._sockets) > MAX_SOCKETS:
            self._drop(next(iter(self._sockets)))
        return sock

    def _drop(self, endpoint: str) -> None:
        sock = self._sockets.pop(endpoint, None)
        if sock is not None:
            sock.close(0)

    def close(self) -> None:
        for endpoint in list(self._sockets):
            self._drop(endpoint)
        if self._ctx is not None:
            self._ctx.term()
