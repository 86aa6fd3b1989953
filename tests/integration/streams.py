"""How the failure tests read a stream, as a client that must know how it ended."""

from typing import Callable, Optional

import httpx

from mistral_ray.server.errors import REPLICA_HEADER


def read_stream(client: httpx.Client, url: str, body: dict,
                on_start: Callable[[Optional[str]], None]) -> tuple[Optional[str], str]:
    """(replica, outcome): "done" ([DONE] after the answer), "error event" (OpenAI's error event for a lost
    replica, then [DONE]: the stream guard's ending) or "broken" (the connection ended without [DONE])."""
    replica, outcome, lost = None, "broken", False
    try:
        with client.stream("POST", url, json=body) as r:
            replica = r.headers.get(REPLICA_HEADER)
            on_start(replica)
            for line in r.iter_lines():
                lost |= line.startswith("data: {") and '"replica_lost"' in line
                if line == "data: [DONE]":
                    outcome = "error event" if lost else "done"
    except httpx.HTTPError:
        pass
    return replica, outcome
