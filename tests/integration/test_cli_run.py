"""`mistral-ray run` as a user runs it: it prints the ready line, serves, and Ctrl-C leaves no Ray or vLLM
process of its session behind within 15 s."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from mistral_ray.bench.targets import free_port
from mistral_ray.config import PROJECT_ROOT
from tests.conftest import LOCAL_CPU

from tests.integration.processes import free_haproxy_ports, session_processes

pytestmark = pytest.mark.integration
STOP_BOUND_S = 15



def test_ctrl_c_stops_everything_within_15_s(tmp_path):
    raw = yaml.safe_load(LOCAL_CPU.read_text())
    port = free_port()
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    args = raw["applications"][0]["args"]
    args["observability"] = {"metrics_export_port": free_port(), "haproxy_metrics_port": free_port()}
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, **free_haproxy_ports()}
    proc = subprocess.Popen([sys.executable, "-m", "mistral_ray.cli", "run", str(config)], cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        ready = None
        for line in proc.stdout:
            if line.startswith("mistral-ray ready:"):
                ready = line
                break
        assert ready and f"http://127.0.0.1:{port}/v1" in ready, ready
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        assert any("haproxy" in p.name() for p in session_processes(proc.pid))  # the fast path, by itself
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        while session_processes(proc.pid) and time.monotonic() - started < STOP_BOUND_S:
            time.sleep(0.2)
        took = time.monotonic() - started
        left = [" ".join(p.cmdline())[:80] for p in session_processes(proc.pid)]
        print(f"\nmistral-ray run: Ctrl-C to no process left in {took:.1f}s")
        assert not left and took <= STOP_BOUND_S, (took, left)
    finally:
        for p in session_processes(proc.pid):
            p.kill()
