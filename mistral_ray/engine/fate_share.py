"""vLLM's EngineCore and workers end with the process that started them, as a vLLM general plugin.

vLLM starts its EngineCore as a child of the replica's process and its workers as children of the
EngineCore. When Ray kills a replica (a stop past its drain budget, a failed health check), nothing tells
the EngineCore, which keeps its memory (GBs; on a GPU, the device memory the next replica needs). vLLM loads
general plugins in the EngineCore and every worker before their loops start: there each asks the kernel for
SIGTERM (vLLM's own orderly shutdown) when its parent dies. The replica's environment turns it on (`ENV`,
set by `options.engine_env`); any other vLLM on this Python is untouched.
"""

from __future__ import annotations

import multiprocessing
import os
import signal

ENV = "MISTRAL_RAY_FATE_SHARE"


def register() -> None:
    """Entry point `vllm.general_plugins`; a no-op outside a multiprocessing child of a mistral-ray replica."""
    parent = multiprocessing.parent_process()
    if os.environ.get(ENV) != "1" or parent is None:
        return
    from mistral_ray.processes import die_with_parent

    die_with_parent(signal.SIGTERM, parent.pid)
