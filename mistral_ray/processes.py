"""Processes we start and must not leave behind: a stop that leaks one leaves a port or GBs of memory held.

Two leaks are not ours to fix at their source. Ray starts HAProxy as a child of its proxy actor, and on a
reload the old HAProxy drains beside the new one; when the actor dies, its HAProxys are re-parented to init
and keep the HTTP port. vLLM's EngineCore (and its workers) are children of the replica's process, and
nothing makes them exit when it is killed. Both children therefore ask the kernel to signal them when
their parent dies (`die_with_parent`), and the launcher sweeps what its Ray started (`sweep`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Linux: get `sig` when the parent's thread that started this process ends (kept across exec). If
    `parent` (its pid) is already gone, this process was orphaned before it could ask: exit now."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        return  # not worth failing a start over: the launcher's sweep still runs
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def tree(roots: list) -> list:
    """`roots` (psutil processes) and all their live descendants."""
    import psutil

    found = []
    for root in roots:
        try:
            if root.is_running():
                found.append(root)
                found.extend(root.children(recursive=True))
        except psutil.Error:
            pass
    return found


def sweep(procs: list, grace_s: float) -> list[str]:
    """Wait up to `grace_s` for `procs` to exit, then kill the rest; return what had to be killed."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    killed = []
    for p in alive:
        try:
            killed.append(f"{p.pid} {p.name()}")
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return killed


def holder(host: str, port: int) -> str:
    """The process listening on `port` (on `host` or every interface), as 'pid N (name)', or ''."""
    import psutil

    addresses = {host, "0.0.0.0", "::", *(["127.0.0.1", "::1"] if host == "localhost" else [])}
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid \
                    and c.laddr.ip in addresses:
                return f"pid {c.pid} ({psutil.Process(c.pid).name()})"
    except (psutil.Error, OSError):
        pass
    return ""


def taken(host: str, port: int) -> bool:
    """Whether another socket holds `port` on `host` (IPv4 or IPv6, as the host resolves). Other bind errors
    (a host that is not this machine's, no permission) are raised: they are not "in use"."""
    import errno
    import socket

    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to HAProxy too
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False
