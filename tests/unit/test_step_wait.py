"""Our vLLM plugin: installed as a `vllm.general_plugins` entry point, it swaps the shm queue's busy yield for
a sleep only where our replica's environment asks (vLLM loads it in its EngineCore and workers the same way)."""

import os
import subprocess
import sys

from mistral_ray.engine.step_wait import ENV

PROBE = """
import time
from vllm.distributed.device_communicators import shm_broadcast
from vllm.plugins import load_general_plugins
original = shm_broadcast.sched_yield
load_general_plugins()
t0 = time.perf_counter()
for _ in range(200):
    shm_broadcast.sched_yield()
print(shm_broadcast.sched_yield is original, (time.perf_counter() - t0) / 200)
"""


def probe(env: dict) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    untouched, per_call = out.stdout.split()[-2:]
    return untouched == "True", float(per_call)


def test_the_plugin_sleeps_between_checks_only_when_asked():
    base = {k: v for k, v in os.environ.items() if k != ENV}
    # Without the env vLLM keeps its own function (no timing bound here: a sched_yield on a busy machine can
    # take as long as another process's time slice).
    untouched, _ = probe(base)
    assert untouched
    untouched, sleep_s = probe({**base, ENV: "500"})
    assert not untouched and sleep_s >= 450e-6  # ours: at least the configured sleep per check
