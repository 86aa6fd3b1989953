"""How a CPU engine's scheduler and its worker wait for each other, as a vLLM general plugin.

vLLM's EngineCore and its worker hand each step over in a shared-memory queue and, while one waits for the
other, busy-loop on `sched_yield` (vLLM's `SpinCondition`: a fixed 1 s busy window, no setting). On a GPU the
waiting side has a core to itself. In a CPU replica it shares two cores with the forward pass and with Ray's
and HAProxy's processes, all at nice 0 above the replica's nice 15, so the spin comes straight out of the
forward pass (py-spy: 89 % of the EngineCore's samples were this loop; docs/benchmarks.md, "Where the CPU
goes at concurrency 32", 2026-11-28). Sleeping a few microseconds instead of yielding gives that time back;
the handover costs at most one sleep per step.
vLLM's own idle path (block on a notify socket, busy window 0) is not used: it loses wake-ups and stalls
seconds per step at low load (measured: 0.06 req/s at c=1).

vLLM loads general plugins in the EngineCore and in every worker before their loops start; the config
reaches them only through the environment, which `options.engine_env` sets from `engine.cpu_step_wait_us`.
"""

from __future__ import annotations

import os
import time

ENV = "MISTRAL_RAY_CPU_STEP_WAIT_US"


def register() -> None:
    """Entry point `vllm.general_plugins`: replace the shm queue's yield with a short sleep when asked."""
    wait_us = os.environ.get(ENV)  # absent: every other vLLM on this Python (bare `vllm serve`) is untouched
    if not wait_us:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    seconds = int(wait_us) / 1e6
    # Both waits of the queue (a reader for the next block, the writer for readers to finish) look this
    # name up in the module at call time.
    shm_broadcast.sched_yield = lambda: time.sleep(seconds)
