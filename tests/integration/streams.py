"""How the failure tests read a stream, as a client that must know how it ended."""

import json
import time
from typing import Callable, Optional

import httpx

from mistral_ray.server.errors import REPLICA_HEADER


def stream_last(body: dict, padding: int = 20 * 1024) -> bytes:
    """`body` as JSON with `stream` last, after `padding` bytes of JSON whitespace: as clients that write the
    flag after a long conversation send it, past HAProxy's first 16 KiB buffer."""
    rest = {k: v for k, v in body.items() if k != "stream"}
    return (json.dumps(rest)[:-1] + "," + " " * padding + f'"stream": {json.dumps(body["stream"])}}}').encode()


def read_stream(client: httpx.Client, url: str, body: dict | bytes,
                on_start: Callable[[Optional[str]], None], pauses: Optional[list] = None) -> tuple[Optional[str], str]:
    """(replica, outcome): "done" ([DONE] after the answer), "error event" (OpenAI's error event for a lost
    replica, then [DONE]: the stream guard's ending), "broken" (the connection ended without [DONE]) or
    "status N: <body>" (answered with an error before streaming). `pauses` gets the stream's longest wait
    between two events (s), and the end of that wait (time.monotonic())."""
    replica, outcome, lost = None, "broken", False
    last, longest = None, (0.0, 0.0)
    request = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    try:
        with client.stream("POST", url, **request) as r:
            replica = r.headers.get(REPLICA_HEADER)
            if r.status_code != 200:  # refused before it streamed (what answered, for the failure message)
                return replica, f"status {r.status_code}: {r.read()[:160]!r}"
            on_start(replica)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    now = time.monotonic()
                    if last is not None and now - last > longest[0]:
                        longest = (now - last, now)
                    last = now
                lost |= line.startswith("data: {") and '"replica_lost"' in line
                if line == "data: [DONE]":
                    outcome = "error event" if lost else "done"
    except httpx.HTTPError:
        pass
    if pauses is not None:
        pauses.append(longest)
    return replica, outcome
