"""`mistral-ray ...`: run a deployment file locally, build the tiny model, check a config."""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from mistral_ray.config import ConfigError, load_deployment


def _run(args: argparse.Namespace) -> int:
    from mistral_ray import launcher

    dep = load_deployment(args.config)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        raise KeyboardInterrupt  # interrupts a start-up still in progress; the finally below cleans up

    signal.signal(signal.SIGTERM, on_signal)
    print(f"mistral-ray: starting {dep.path} (model {dep.service.model.name}) ...", flush=True)
    try:
        running = launcher.start(dep, port=args.port, ready_timeout_s=args.ready_timeout)
        # ray.init() installs its own SIGTERM handler (which aborts the process); take the signals back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(f"mistral-ray ready: {running.base_url}/v1 (started in {running.startup_s:.1f}s)", flush=True)
        while not stop.wait(1):
            pass
        print("mistral-ray: shutting down ...", flush=True)
    except KeyboardInterrupt:
        print("mistral-ray: interrupted, shutting down ...", flush=True)
    finally:
        launcher.stop()
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from mistral_ray import tiny_model

    out = tiny_model.build(args.dir) if args.force else tiny_model.ensure(args.dir)
    print(f"{out} sha256={tiny_model.digest(out)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    dep = load_deployment(args.config)
    print(f"{dep.path}: ok ({dep.service.model.name}, replicas {dep.service.scaling.min_replicas}"
          f"..{dep.service.scaling.max_replicas})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistral-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a deployment file on a local Ray cluster until Ctrl-C")
    run.add_argument("config", help="a file under deployments/")
    run.add_argument("--port", type=int, default=None, help="override http_options.port")
    run.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for a replica")
    run.set_defaults(func=_run)
    tiny = sub.add_parser("tiny-model", help="the embedded tiny Mistral")
    tiny_sub = tiny.add_subparsers(dest="action", required=True)
    build = tiny_sub.add_parser("build", help="build it into DIR (skipped when present)")
    build.add_argument("dir")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=_tiny)
    check = sub.add_parser("check", help="validate a deployment file")
    check.add_argument("config")
    check.set_defaults(func=_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mistral-ray: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
