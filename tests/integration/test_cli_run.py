"""`mistral-ray run` as a user runs it: it prints the ready line, serves, and a stop (Ctrl-C to its process
group, or SIGTERM to it; SIGTERM to its group stops Ray's own processes too, so nothing is drained) lets the
answer in flight finish and leaves no process of its session (Ray,
HAProxy's reloaded workers, vLLM's EngineCore and workers) behind within 15 s, every time; the next start
on the same port works. A start whose port is taken fails at once, in one line."""

import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import yaml

from mistral_ray.ports import bindable, free_port
from mistral_ray.config import PROJECT_ROOT
from tests.conftest import LOCAL_CPU

from tests.integration.processes import free_haproxy_ports, session_processes

pytestmark = pytest.mark.integration
STOP_BOUND_S = 15
ANSWER_TOKENS = 200


def _config(tmp_path, port: int):
    raw = yaml.safe_load(LOCAL_CPU.read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    args = raw["applications"][0]["args"]
    args["observability"] = {"metrics_export_port": free_port(), "haproxy_metrics_port": free_port()}
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def _start(config, env):
    return subprocess.Popen([sys.executable, "-m", "mistral_ray.cli", "run", str(config)], cwd=PROJECT_ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _stream(url: str, out: dict, first: threading.Event) -> None:
    """A streamed completion of ANSWER_TOKENS tokens; `out` gets its completion tokens (usage) and finish."""
    body = {"prompt": "Once upon a time", "max_tokens": ANSWER_TOKENS, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    tokens, finish = 0, None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                    continue
                first.set()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"]:
                    finish = chunk["choices"][0].get("finish_reason") or finish
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        out.update(tokens=tokens, finish=finish)
        first.set()


def _wait_ready(proc) -> str:
    for line in proc.stdout:
        if line.startswith("mistral-ray ready:"):
            return line
    pytest.fail(f"mistral-ray run ended without a ready line (rc {proc.wait()})")


def _lines(proc) -> list[str]:
    lines = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigterm-group"])
def test_stop_with_an_answer_in_flight_leaves_nothing_every_time(tmp_path, how):
    port = free_port()
    config = _config(tmp_path, port)
    haproxy_ports = free_haproxy_ports()
    env = {**os.environ, **haproxy_ports}
    observability = yaml.safe_load(config.read_text())["applications"][0]["args"]["observability"]
    ports = [port, *observability.values(), *map(int, haproxy_ports.values())]
    for attempt in range(2 if how == "sigterm-group" else 3):
        proc = _start(config, env)
        try:
            said = []
            for ready in proc.stdout:
                if ready.startswith("mistral-ray ready:"):
                    break
                said.append(ready)
            else:
                pytest.fail(f"start {attempt + 1} ended without a ready line (rc {proc.wait()}); its last lines:\n"
                            + "".join(said[-15:]))
            url = f"http://127.0.0.1:{port}"
            out, first = {}, threading.Event()
            client = threading.Thread(target=_stream, args=(url, out, first))
            client.start()
            assert first.wait(60) and out.get("status") == 200, out
            haproxies = [p for p in session_processes(proc.pid) if "haproxy" in p.name()]
            assert haproxies  # the fast path, by itself
            started = time.monotonic()
            # A terminal's Ctrl-C reaches the whole foreground process group; `kill` only the process.
            # SIGTERM to the group (`kill -TERM -<pgid>`, systemd) stops Ray's GCS and raylet too: nothing can
            # be drained then (65 s to stop before the launcher saw it: every GCS call waited for its timeout).
            if how == "ctrl-c":
                os.killpg(proc.pid, signal.SIGINT)
            elif how == "sigterm":
                proc.send_signal(signal.SIGTERM)
            else:
                os.killpg(proc.pid, signal.SIGTERM)
            lines = _lines(proc)
            client.join(60)
            if how != "sigterm-group":
                assert out.get("tokens") == ANSWER_TOKENS and out.get("finish") == "length", out  # not cut
            while session_processes(proc.pid) and time.monotonic() - started < STOP_BOUND_S:
                time.sleep(0.2)
            took = time.monotonic() - started
            left = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in session_processes(proc.pid)]
            print(f"\nstop {attempt + 1} by {how}: answer {out.get('finish') or 'cut'}, no process left after {took:.1f}s "
                  f"(started in {ready.split('started in ')[-1].strip()}")
            assert not left and took <= STOP_BOUND_S, (took, left, lines[-5:])
            # nothing outside the session holds what it listened on either: the next start binds them again
            assert all(bindable(p) for p in ports), [p for p in ports if not bindable(p)]
            assert proc.wait(5) == 0
        finally:
            for p in session_processes(proc.pid):
                p.kill()


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _listening(sid: int) -> dict[tuple[str, int], str]:
    """(address, port) -> process name, of every TCP socket the session's processes listen on."""
    found = {}
    for p in session_processes(sid):
        try:
            for c in p.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found[(c.laddr.ip, c.laddr.port)] = p.name()
        except psutil.Error:
            pass
    return found


def test_a_loopback_deployment_listens_on_loopback_only_and_stops_without_waiting(tmp_path):
    port = free_port()
    proc = _start(_config(tmp_path, port), {**os.environ, **free_haproxy_ports()})
    try:
        _wait_ready(proc)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200
        listening = _listening(proc.pid)
        assert ("127.0.0.1", port) in listening and len(listening) > 10
        # http_options.host is 127.0.0.1: Ray's servers and metrics exporter, HAProxy's metrics and stats,
        # the replicas' own ports all listen there too.
        exposed = {where: name for where, name in listening.items() if not _loopback(where[0])}
        assert not exposed, sorted(exposed.items())
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        took = time.monotonic() - started
        print(f"\nidle stop: {took:.1f}s")
        assert not session_processes(proc.pid)
        # Serve's drain budget is 30 s (scaling.drain_timeout_s): an idle app does not wait for it (what it
        # does take: 3 s for HAProxy to deregister the replica, about 5 s for vLLM's engine to shut down).
        assert took < STOP_BOUND_S, took
    finally:
        for p in session_processes(proc.pid):
            p.kill()


def test_a_second_signal_stops_without_waiting_for_the_answer(tmp_path):
    port = free_port()
    proc = _start(_config(tmp_path, port), {**os.environ, **free_haproxy_ports()})
    try:
        _wait_ready(proc)
        out, first = {}, threading.Event()
        client = threading.Thread(target=_stream, args=(f"http://127.0.0.1:{port}", out, first))
        client.start()
        assert first.wait(60) and out.get("status") == 200, out
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        lines = _lines(proc)
        deadline = time.monotonic() + 10
        while not any("stopping;" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # again: stop now
        proc.wait(timeout=60)
        client.join(60)
        took = time.monotonic() - started
        print(f"\nstop now: {took:.1f}s, the answer got {out.get('tokens')} of {ANSWER_TOKENS} tokens")
        assert not session_processes(proc.pid) and took < STOP_BOUND_S, (took, lines[-5:])
        assert any("stopping now" in line for line in lines), lines[-5:]
    finally:
        for p in session_processes(proc.pid):
            p.kill()


def test_a_taken_port_fails_at_once_in_one_line(tmp_path):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        proc = _start(_config(tmp_path, port), {**os.environ, **free_haproxy_ports()})
        try:
            output, _ = proc.communicate(timeout=30)
        finally:
            for p in session_processes(proc.pid):
                p.kill()
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if line.startswith("mistral-ray: error")]
    assert len(errors) == 1 and f"127.0.0.1:{port}" in errors[0], output
    assert f"pid {os.getpid()}" in errors[0], errors  # the process holding it, when it can tell
    assert "Traceback" not in output, output


def test_deploy_changes_the_adapters_of_a_running_app_in_place(tmp_path):
    """deployments/local-cpu-lora.yaml under `mistral-ray run`; the file edited and `mistral-ray deploy`ed:
    the adapters change, the replica stays; a change the running cluster cannot take is refused in one line."""
    port = free_port()
    raw = yaml.safe_load((PROJECT_ROOT / "deployments" / "local-cpu-lora.yaml").read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    raw["applications"][0]["args"]["observability"] = {"metrics_export_port": free_port(),
                                                       "haproxy_metrics_port": free_port()}
    config = tmp_path / "lora.yaml"
    config.write_text(yaml.safe_dump(raw))
    url = f"http://127.0.0.1:{port}"
    proc = _start(config, {**os.environ, **free_haproxy_ports()})

    def models() -> set:
        return {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]}

    def deploy() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mistral_ray.cli", "deploy", str(config)], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=300)

    try:
        _wait_ready(proc)
        assert models() == {"tiny-mistral", "ft-1", "ft-2", "ft-3", "ft-4"}
        replica = httpx.post(f"{url}/v1/completions", json={"model": "ft-4", "prompt": "hi", "max_tokens": 2},
                             timeout=60).headers["x-mistral-ray-replica"]
        adapters = raw["applications"][0]["deployments"][0]["user_config"]["adapters"]
        adapters["ft-5"] = {**adapters.pop("ft-4"), "source": adapters["ft-1"]["source"].replace("ft-1", "ft-5")}
        config.write_text(yaml.safe_dump(raw))
        done = deploy()
        assert done.returncode == 0, done.stdout + done.stderr
        assert models() == {"tiny-mistral", "ft-1", "ft-2", "ft-3", "ft-5"}
        r = httpx.post(f"{url}/v1/completions", json={"model": "ft-5", "prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200 and r.headers["x-mistral-ray-replica"] == replica  # the same replica
        assert httpx.post(f"{url}/v1/completions", json={"model": "ft-4", "prompt": "hi"}, timeout=60).status_code == 404
        raw["applications"][0]["args"]["router"]["haproxy_threads"] = 2  # HAProxy read it when it started
        config.write_text(yaml.safe_dump(raw))
        done = deploy()
        assert done.returncode != 0 and "RAY_SERVE_HAPROXY_NBTHREAD" in done.stderr, done.stdout + done.stderr
        assert "another cluster environment" in done.stderr and "Traceback" not in done.stderr, done.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        finally:
            for p in session_processes(proc.pid):
                p.kill()
