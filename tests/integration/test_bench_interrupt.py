"""A bench that dies mid-run (SIGKILL: nothing of it runs again) leaves no server behind: its target goes
away by itself. One that is asked to stop (SIGTERM) stops its target first."""

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from mistral_ray.config import PROJECT_ROOT

from tests.integration.processes import session_processes

pytestmark = pytest.mark.integration



def bench_with_a_running_target(tmp_path):
    """A bench driving bare vLLM with more work than the test waits for; returns (bench, target pid)."""
    log = (tmp_path / "bench.log").open("w")
    bench = subprocess.Popen(
        [sys.executable, "-m", "mistral_ray.cli", "bench", "--targets", "vllm", "--concurrency", "1",
         "--requests", "5000", "--no-progress"], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        children = [c for c in psutil.Process(bench.pid).children() if "vllm_cli" in " ".join(c.cmdline())]
        if children:
            port = children[0].cmdline()[-1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                    time.sleep(3)  # serving the bench's requests now
                    return bench, children[0].pid
            except httpx.HTTPError:
                pass
        assert bench.poll() is None, (tmp_path / "bench.log").read_text()[-2000:]
        time.sleep(1)
    raise AssertionError("the bench's target did not start")


def gone_within(sid: int, timeout_s: float) -> float:
    start = time.monotonic()
    while session_processes(sid):
        if time.monotonic() - start > timeout_s:
            left = [" ".join(p.cmdline())[:80] for p in session_processes(sid)]
            for p in session_processes(sid):
                p.kill()
            raise AssertionError(f"left behind after {timeout_s}s: {left}")
        time.sleep(0.5)
    return time.monotonic() - start


def test_killed_bench_leaves_no_server(tmp_path):
    bench, target = bench_with_a_running_target(tmp_path)
    os.killpg(bench.pid, signal.SIGKILL)
    bench.wait()
    took = gone_within(target, 60)
    print(f"\nbench killed: its target (bare vLLM) was gone {took:.1f}s later")


def test_terminated_bench_stops_its_target(tmp_path):
    bench, target = bench_with_a_running_target(tmp_path)
    bench.send_signal(signal.SIGTERM)
    assert bench.wait(timeout=150) == 130
    assert not session_processes(target)
