"""Each request's engine priority is the gate's, whatever the request or its headers said.

vLLM's serving takes a request's priority from its body (`priority`) or from an `X-Vllm-Priority` header; the
gate refuses the first, and this makes the second (and any other way) moot: `generate` runs with the
priority of the request's ticket (server/fairness.py; 0 without one, e.g. the health probe). The ticket
gets back the request's queue time as the engine measured it (queued -> first scheduled).
"""

from __future__ import annotations

from typing import Any

from mistral_ray.server.fairness import TICKET


def prioritize(llm: Any) -> None:
    inner = llm.generate

    def generate(*args, **kwargs):
        ticket = TICKET.get()
        kwargs["priority"] = ticket.priority if ticket is not None else 0
        outputs = inner(*args, **kwargs)
        return outputs if ticket is None else _timed(outputs, ticket)

    llm.generate = generate


async def _timed(outputs, ticket):
    try:
        async for out in outputs:
            stats = getattr(out, "metrics", None)
            if ticket.queued_s is None and stats is not None and getattr(stats, "scheduled_ts", 0):
                ticket.queued_s = max(0.0, stats.scheduled_ts - stats.queued_ts)
            yield out
    finally:
        await outputs.aclose()
