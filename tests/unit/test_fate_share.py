"""Children that must end with their parent: vLLM's EngineCore (our vLLM plugin, as vLLM loads it in a spawned
child) and HAProxy (our wrapper, exec'd into the real binary). Each test kills the parent with SIGKILL, as
Ray kills an actor, and looks for the child."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil

from mistral_ray.ports import free_port
from mistral_ray.engine.fate_share import ENV

SPAWNER = textwrap.dedent("""
    import multiprocessing, sys, time

    def child():
        from vllm.plugins import load_general_plugins
        load_general_plugins()  # what vLLM's EngineCore does before its loop
        print("loaded", flush=True)
        time.sleep(120)

    if __name__ == "__main__":
        p = multiprocessing.get_context("spawn").Process(target=child)
        p.start()
        print(p.pid, flush=True)
        time.sleep(120)
""")


def _orphan(cmd: list[str], env: dict, ready: str) -> psutil.Process:
    """Start `cmd` (which prints its child's pid first, then the child prints `ready`), kill it, return
    the child."""
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    line = parent.stdout.readline()
    assert ready in line, line
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return child


def _gone(child: psutil.Process, within_s: float) -> bool:
    try:
        child.wait(timeout=within_s)
        return True
    except psutil.TimeoutExpired:
        child.kill()
        return False


def test_an_engine_child_ends_with_its_parent_only_where_the_replica_asks(tmp_path):
    script = tmp_path / "spawner.py"
    script.write_text(SPAWNER)
    base = {k: v for k, v in os.environ.items() if k != ENV}
    assert _gone(_orphan([sys.executable, str(script)], {**base, ENV: "1"}, "loaded"), 10)
    assert not _gone(_orphan([sys.executable, str(script)], base, "loaded"), 3)  # bare vLLM: as shipped


def test_haproxy_ends_with_the_process_that_started_it(tmp_path):
    port = free_port()
    cfg = tmp_path / "haproxy.cfg"  # not Ray's shape: the wrapper runs it unchanged
    cfg.write_text(f"global\ndefaults\n  mode http\n  timeout client 5s\n  timeout server 5s\n"
                   f"  timeout connect 1s\nfrontend f\n  bind 127.0.0.1:{port}\n")
    wrapper = os.path.join(os.path.dirname(sys.executable), "mistral-ray-haproxy")
    starter = textwrap.dedent(f"""
        import socket, subprocess, time
        p = subprocess.Popen([{wrapper!r}, "-db", "-f", {str(cfg)!r}], stderr=subprocess.DEVNULL)
        print(p.pid, flush=True)
        while socket.socket().connect_ex(("127.0.0.1", {port})):
            time.sleep(0.1)  # until HAProxy listens
        print("listening", flush=True)
        time.sleep(120)
    """)
    child = _orphan([sys.executable, "-c", starter], dict(os.environ), "listening")
    assert child.name().startswith("haproxy")
    assert _gone(child, 10)
