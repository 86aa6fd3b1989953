"""A deployment file works with Ray's own `serve run`, as a Ray user runs it: without our environment (no
HAProxy), Serve's Python proxy serves the same app correctly; Ctrl-C stops it all."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from mistral_ray.ports import free_port
from mistral_ray.config import PROJECT_ROOT
from mistral_ray.server.errors import REPLICA_HEADER
from tests.conftest import CLUSTER_ENV, LOCAL_CPU

from tests.integration.processes import session_processes

pytestmark = pytest.mark.integration
# Ray's `serve` console script as a terminal's shell starts it: SIGINT at its default disposition and not
# blocked. In whole-suite runs it sometimes never saw Ctrl-C (no "Got KeyboardInterrupt" in 180 s, its main
# thread asleep in `serve run`'s wait loop): a process inherits an ignored or blocked signal from its parent,
# and CPython installs its KeyboardInterrupt handler only over the default one. What it inherited is logged.
# With a stack dump of every thread on SIGUSR1 (see test_ctrl_c_...).
SERVE_CLI = ("import faulthandler, signal, sys; faulthandler.register(signal.SIGUSR1, all_threads=True); "
             "print('inherited: SIGINT', signal.getsignal(signal.SIGINT), 'blocked', "
             "sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])), flush=True); "
             "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
             "signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from ray.serve.scripts import cli; sys.argv[0] = 'serve'; sys.exit(cli())")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    raw = yaml.safe_load(LOCAL_CPU.read_text())
    port = free_port()
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    config = tmp_path_factory.mktemp("serve-run") / "local-cpu.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k not in CLUSTER_ENV}  # a plain shell: no data-plane env
    env["PYTHONUNBUFFERED"] = "1"  # its log, as a terminal shows it, even when it is killed
    log = config.with_suffix(".log").open("w")
    # Ray's `serve` console script, with a stack dump of every thread on SIGUSR1 (see test_ctrl_c_...).
    proc = subprocess.Popen([sys.executable, "-c", SERVE_CLI, "run", str(config)], cwd=PROJECT_ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/ready", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, config.with_suffix(".log").read_text()[-3000:]
        yield base, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()



def test_serve_run_serves_through_serves_own_proxy(served):
    base, proc = served
    assert not any("haproxy" in p.name() for p in session_processes(proc.pid))
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-mistral", messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert raw.headers[REPLICA_HEADER] and raw.parse().usage.completion_tokens == 6
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-mistral", prompt="Once", max_tokens=8, stream=True) if c.choices)
    assert text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=1)


def test_ctrl_c_stops_everything(served):
    _, proc = served
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        # Ray's `serve run` shuts Serve down gracefully (replicas drain, engines stop): about 10-15 s alone. In
        # three earlier whole-suite runs it had not exited 90 s / 180 s / 180 s after the signal, and (in the
        # last of them) had not logged "Got KeyboardInterrupt": the signal never reached its handler. Cause
        # not found; the failure shows where its threads were.
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack into the log
        time.sleep(3)
        log = Path(proc.args[-1]).with_suffix(".log").read_text()
        pytest.fail(f"`serve run` still running 180 s after Ctrl-C; its log ends:\n{log[-12000:]}")
    print(f"\nserve run: exited {time.monotonic() - started:.1f} s after Ctrl-C")
    deadline = time.monotonic() + 30
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert not session_processes(proc.pid)
