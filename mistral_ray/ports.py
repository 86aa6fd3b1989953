"""Free TCP ports for the servers a run, the bench or a test starts beside others on one machine.

A port the kernel hands out for `bind(0)` comes from the ephemeral range, the same range it takes the local
port of every outgoing connection and every other `bind(0)` from. A port picked that way and bound a minute
later (HAProxy's metrics port on a second start, a test cluster's ports held for half an hour) can meanwhile
be taken by one of Ray's hundreds of connections: the later bind fails with "Address already in use". Ports
below the ephemeral range (and above Ray's worker ports, 10002-19999) are only ever taken by a bind that
names them, so one found free here stays free until someone asks for it by number.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOW = 20000  # above Ray's default worker port range (min_worker_port 10002, max_worker_port 19999)
_given: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def bindable(port: int) -> bool:
    """Whether a server can bind `port` now (nothing listens on it or holds it bound)."""
    with socket.socket() as s:
        # as servers bind (HAProxy, uvicorn, Ray): a port whose old connections linger in TIME_WAIT is free
        # to them; one something listens on is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))  # taken on any address (127.0.0.1 included) fails here
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on, outside the ephemeral range, not handed out before by this process."""
    high = _ephemeral_low() - 1
    if high - _LOW >= 256:
        for _ in range(200):
            port = random.randint(_LOW, high)
            if port not in _given and bindable(port):
                _given.add(port)
                return port
    with socket.socket() as s:  # a machine whose ephemeral range starts low: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

