"""`mistral-ray ...`: run a deployment file locally, build the tiny model, check a config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading

from mistral_ray.bench import DEFAULTS
from mistral_ray.config import ConfigError, load_deployment
from mistral_ray.launcher import StartError


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    from mistral_ray import launcher
    from mistral_ray.options import llm_deployment_options, node_env

    dep = load_deployment(args.config)
    launcher.check_ports(dep, args.port or dep.http.port)
    stop = threading.Event()

    def on_signal(*_):
        stop.set()
        raise KeyboardInterrupt  # interrupts a start-up still in progress; the finally below cleans up

    signal.signal(signal.SIGTERM, on_signal)
    print(f"mistral-ray: starting {dep.path} (model {dep.service.model.name}) ...", flush=True)
    drain = None
    again: list = []
    try:
        running = launcher.start(dep, port=args.port, ready_timeout_s=args.ready_timeout, workers=args.nodes)
        # ray.init() installs its own SIGTERM handler (which aborts the process); take the signals back.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        if running.cluster is not None:
            ports = running.cluster.metrics_ports
            print(f"mistral-ray: head (Serve, HAProxy, ingress router) metrics port {ports[0]}; "
                  + "; ".join(f"worker {i + 1} metrics port {p}" for i, p in enumerate(ports[1:])), flush=True)
        address = _address_file(dep, args.port)
        address.parent.mkdir(parents=True, exist_ok=True)
        # for `mistral-ray deploy` of this file: where the cluster is, and the environment it started with
        # (and Ray's auth mode: a local cluster turns token auth on in this process; the token is ~/.ray's)
        address.write_text(json.dumps({"gcs": running.gcs_address, "env": node_env(dep),
                                       "auth": os.environ.get("RAY_AUTH_MODE")}))
        print(f"mistral-ray ready: {running.base_url}/v1 (started in {running.startup_s:.1f}s)", flush=True)
        while not stop.wait(1):
            pass
        drain = dep.app_name
        # From here a signal means "again": kept until launcher.stop listens, so none is lost in between.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: again.append(True))
        budget = llm_deployment_options(dep.service)["graceful_shutdown_timeout_s"]
        print(f"mistral-ray: stopping; requests in flight get up to {budget:g}s to finish (again to stop now) ...",
              flush=True)
    except KeyboardInterrupt:
        print("mistral-ray: interrupted, shutting down ...", flush=True)
    finally:
        _address_file(dep, args.port).unlink(missing_ok=True)
        launcher.stop(drain, again=lambda: bool(again))
    return 0


def _address_file(dep, port):
    from mistral_ray.config import STATE_DIR

    return STATE_DIR / "run" / f"{dep.http.host}-{port or dep.http.port}.gcs"


def _deploy(args: argparse.Namespace) -> int:
    """Deploy a changed file to the cluster `mistral-ray run` started for it (found by its HTTP address)."""
    from mistral_ray import launcher
    from mistral_ray.options import node_env

    dep = load_deployment(args.config)
    address = _address_file(dep, args.port)
    if not address.exists():
        print(f"mistral-ray deploy: no `mistral-ray run` serves {dep.http.host}:{args.port or dep.http.port} "
              "on this machine", file=sys.stderr)
        return 1
    running = json.loads(address.read_text())
    changed = sorted(k for k in {*running["env"], *node_env(dep)} if running["env"].get(k) != node_env(dep).get(k))
    if changed:  # what every Ray process read at start (HAProxy, the data plane): a deploy cannot change it
        print(f"mistral-ray deploy: {dep.path} needs another cluster environment ({', '.join(changed)}: e.g. "
              "a routing policy or LoRA that needs the request body, HAProxy settings); stop the run and start "
              "it again with this file", file=sys.stderr)
        return 1
    os.environ.update(running["env"])  # before Ray is imported: this driver joins that cluster as its nodes are
    if running.get("auth"):
        os.environ["RAY_AUTH_MODE"] = running["auth"]
    import ray

    ray.init(address=running["gcs"], namespace="mistral-ray", log_to_driver=False)
    try:
        launcher.deploy(dep, args.timeout)
    finally:
        ray.shutdown()
    print(f"mistral-ray: deployed {dep.path} ({len(dep.live.adapters)} adapter(s))", flush=True)
    return 0


def _env(args: argparse.Namespace) -> int:
    from mistral_ray.options import node_env

    dep = load_deployment(args.config)
    for key, value in node_env(dep).items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from mistral_ray import tiny_model

    out = tiny_model.build(args.dir) if args.force else tiny_model.ensure(args.dir)
    print(f"{out} sha256={tiny_model.digest(out)}")
    if args.adapters:
        from pathlib import Path

        from mistral_ray import tiny_adapters

        root = Path(f"{Path(args.dir)}-adapters")
        for i in range(1, args.adapters + 1):
            adapter = tiny_adapters.ensure(root / f"ft-{i}")
            print(f"{adapter} sha256={tiny_model.digest(adapter)}")
    return 0


def _check(args: argparse.Namespace) -> int:
    dep = load_deployment(args.config)
    print(f"{dep.path}: ok ({dep.service.model.name}, replicas {dep.service.scaling.min_replicas}"
          f"..{dep.service.scaling.max_replicas})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from mistral_ray import bench
    from mistral_ray.bench import targets

    specs = list(args.targets or [])
    if args.url:
        specs.insert(0, f"{args.target}={args.url}")
    if not specs:
        print("mistral-ray bench: give a URL or --targets", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else None
    workdir = Path(tempfile.mkdtemp(prefix="mistral-ray-bench-"))
    signal.signal(signal.SIGTERM, _interrupt)  # like Ctrl-C: the running target is stopped on the way out
    opts = dict(requests=args.requests, input_len=args.input_len, output_len=args.output_len, vocab=args.vocab,
                seed=args.seed, sessions=args.sessions, turns=args.turns, system_prompts=args.system_prompts,
                system_words=args.system_words, user_words=args.user_words)
    client_opts = dict(requests=args.requests, input_len=args.input_len, output_len=args.output_len,
                       seed=args.seed, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                       num_prefixes=args.num_prefixes)
    engine = {**({"block_size": args.block_size} if args.block_size else {}),
              **({"extra_args": {"num_gpu_blocks_override": args.kv_blocks}} if args.kv_blocks else {})}
    results = []
    for i, spec in enumerate(specs):
        # A target measured twice (bare vLLM before and after the others) is two lines, not one.
        label = spec if spec not in specs[:i] else f"{spec}#{specs[:i].count(spec) + 1}"
        print(f"bench: starting {label} (logs in {workdir}) ...", flush=True)
        try:
            target = targets.start(spec, workdir, replicas=args.replicas, label=label, engine=engine)
        except (RuntimeError, ValueError) as exc:  # one target that cannot start does not void the others
            print(f"bench: skipping {label}: {exc}", file=sys.stderr, flush=True)
            continue
        if args.metrics_url and "=" in spec:
            target.metrics_url = args.metrics_url
        try:
            for workload in args.workload:
                results += bench.run_target(target, args.model, workload, args.concurrency,
                                            progress=not args.no_progress, **opts)
                print(bench.table([r for r in results if r.target == label]), flush=True)
            if args.vllm_client:
                from mistral_ray.bench import vllm_client

                results += vllm_client.run(target, args.model, targets.bench_service().model.resolved_source(),
                                           args.vllm_client, args.concurrency, workdir, **client_opts)
                print(bench.table([r for r in results if r.target.startswith(label)]), flush=True)
            if out:  # after every target, so an interrupted comparison keeps what it measured
                out.mkdir(parents=True, exist_ok=True)
                (out / "results.json").write_text(bench.to_json(results))
        finally:
            target.stop()
    print("\n" + bench.table(results), flush=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(bench.to_json(results))
        for path in [out / "results.json", *bench.plot(results, out)]:
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(bench.to_json(results))
    return 0


def _monitor(args: argparse.Namespace) -> int:
    from mistral_ray import monitoring

    dep = load_deployment(args.config)
    obs = dep.service.observability
    proc = monitoring.start_prometheus([obs.metrics_export_port, *args.node_ports], obs.haproxy_metrics_port,
                                       port=args.port)
    print(f"prometheus: http://127.0.0.1:{args.port} (scraping Ray's metrics on port {obs.metrics_export_port} "
          f"and HAProxy's on {obs.haproxy_metrics_port}; rules {monitoring.RULES}); Ctrl-C stops it", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0


def _rules(args: argparse.Namespace) -> int:
    from mistral_ray import monitoring

    print(monitoring.prometheus_rule_yaml(), end="")
    return 0


def _prometheus_config(args: argparse.Namespace) -> int:
    from mistral_ray import monitoring

    print(monitoring.shipped_config_yaml(), end="")
    return 0


def _serve_config(args: argparse.Namespace) -> int:
    from mistral_ray import k8s

    if args.write:
        for path in k8s.write_overlays():
            print(f"wrote {path}")
    else:
        print(k8s.serve_config_yaml(args.config), end="")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from mistral_ray import planner

    shape = planner.PRESETS[args.model] if args.model in planner.PRESETS else planner.ModelShape.from_hf_config(args.model)
    if args.no_window:
        shape = dataclasses.replace(shape, sliding_window=None)
    p = planner.plan(
        shape, args.context_len, args.concurrency, dtype=args.dtype, gpu_memory_gib=args.gpu_memory_gib,
        gpu_memory_utilization=args.gpu_memory_utilization, overhead_gib=args.overhead_gib,
        kv_budget_gib=args.kv_budget_gib, tensor_parallel_size=args.tp, gpus_per_worker=args.gpus_per_worker,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs, max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
    )
    print(planner.report(p))
    if args.write:
        planner.write_into(args.write, p)
        print(f"wrote max_replicas={max(p.replicas, 1)} max_num_seqs={max(p.max_seqs_per_replica, 1)} into {args.write}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mistral-ray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a deployment file on a local Ray cluster until Ctrl-C")
    run.add_argument("config", help="a file under deployments/")
    run.add_argument("--port", type=int, default=None, help="override http_options.port")
    run.add_argument("--nodes", type=int, default=0, metavar="N",
                     help="a head (Serve, HAProxy, no replica) and N worker nodes for the replicas, each its own "
                     "raylet on this machine, as a RayService runs; 0: one node that does everything")
    run.add_argument("--ready-timeout", type=float, default=None,
                     help="seconds to wait for a replica (default: the file's scaling.start_timeout_s)")
    run.set_defaults(func=_run)
    dp = sub.add_parser("deploy", help="deploy a changed deployment file to the app `mistral-ray run` serves from "
                        "it: a change of the LLM deployment's user_config (adapters) applies in place, of args "
                        "restarts the replicas")
    dp.add_argument("config")
    dp.add_argument("--port", type=int, default=None, help="the run's --port, when it was given one")
    dp.add_argument("--timeout", type=float, default=600, help="seconds to wait for Serve to apply it")
    dp.set_defaults(func=_deploy)
    tiny = sub.add_parser("tiny-model", help="the embedded tiny Mistral")
    tiny_sub = tiny.add_subparsers(dest="action", required=True)
    build = tiny_sub.add_parser("build", help="build it into DIR (skipped when present)")
    build.add_argument("dir")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.add_argument("--adapters", type=int, default=0, metavar="N",
                       help="also write N LoRA adapters ft-1..ft-N into DIR-adapters/ (as deployments/local-cpu-lora.yaml "
                       "names them; kept when present)")
    build.set_defaults(func=_tiny)
    env = sub.add_parser("env", help="the Ray cluster environment a deployment file's data plane needs, as "
                         "shell exports (for `ray start` / `serve run`; `mistral-ray run` sets it itself)")
    env.add_argument("config")
    env.set_defaults(func=_env)
    check = sub.add_parser("check", help="validate a deployment file")
    check.add_argument("config")
    check.set_defaults(func=_check)
    mon = sub.add_parser("monitor", help="run a local Prometheus scraping the local Ray cluster")
    mon.add_argument("config", nargs="?", default="deployments/local-cpu.yaml")
    mon.add_argument("--port", type=int, default=9090)
    mon.add_argument("--node-ports", type=int, nargs="*", default=[], metavar="PORT",
                     help="worker nodes' metrics ports too (`mistral-ray run --nodes` prints them)")
    mon.set_defaults(func=_monitor)
    k8s = sub.add_parser("k8s", help="render Kubernetes manifests from the project's sources of truth")
    k8s_sub = k8s.add_subparsers(dest="action", required=True)
    k8s_sub.add_parser("rules", help="print the PrometheusRule built from the rules file").set_defaults(func=_rules)
    k8s_sub.add_parser("prometheus-config", help="print the local Prometheus scrape config").set_defaults(
        func=_prometheus_config
    )
    sc = k8s_sub.add_parser("serve-config", help="a deployment file as the RayService's serveConfigV2")
    sc.add_argument("config", nargs="?", help="a file under deployments/ (print its serveConfigV2)")
    sc.add_argument("--write", action="store_true", help="regenerate every k8s/overlays/*/serve-config.yaml")
    sc.set_defaults(func=_serve_config)
    pl = sub.add_parser("plan", help="KV-cache capacity: sequences per replica, replicas, GPU workers")
    pl.add_argument("--model", default="mistral-7b-v0.1", help="a preset (mistral-7b-v0.1/v0.2/v0.3) or a checkpoint dir")
    pl.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16", "fp8"])
    pl.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU, GiB (e.g. 22 for a 24 GB L4)")
    pl.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    pl.add_argument("--overhead-gib", type=float, default=1.5, help="activations, CUDA graphs, per GPU")
    pl.add_argument("--kv-budget-gib", type=float, help="KV budget directly (CPU: VLLM_CPU_KVCACHE_SPACE)")
    pl.add_argument("--context-len", type=int, default=32768, help="tokens per sequence (prompt + output)")
    pl.add_argument("--concurrency", type=int, default=64, help="target concurrent sequences")
    pl.add_argument("--tp", type=int, default=1, help="tensor parallel size (GPUs per replica)")
    pl.add_argument("--gpus-per-worker", type=int, default=1)
    pl.add_argument("--block-size", type=int, default=16, help="vLLM KV block size (16 on GPU, 128 on CPU)")
    pl.add_argument("--max-num-seqs", type=int, help="cap sequences per replica at the engine's limit")
    pl.add_argument("--no-window", action="store_true", help="plan as if the model had no sliding window")
    pl.add_argument("--max-loras", type=int, default=0, help="engine.lora.max_loras: LoRA slots per replica")
    pl.add_argument("--max-lora-rank", type=int, default=16, help="engine.lora.max_lora_rank")
    pl.add_argument("--write", help="set max_replicas and max_num_seqs in this deployment file")
    pl.set_defaults(func=_plan)
    b = sub.add_parser("bench", help="load-test OpenAI-compatible servers, side by side (streamed requests)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("url", nargs="?", help="a running server's root, e.g. http://127.0.0.1:8000")
    b.add_argument("--targets", nargs="+", metavar="SPEC", help="servers to start and compare, one after the "
                   "other: ours:<pow2|prefix_affinity|kv_aware|session>[:<replicas>[:<router field>=<value>,...]], vllm, "
                   "ray-serve-llm[:<replicas>], ray-serve-llm:direct, ray-serve-llm:prefix[:<replicas>], label=url")
    b.add_argument("--replicas", type=int, default=2, help="replicas for ours/ray-serve-llm targets")
    b.add_argument("--workload", nargs="+", choices=["random", "chat"], default=["random"],
                   help="random: independent prompts; chat: multi-turn sessions with shared system prompts")
    b.add_argument("--model", default="tiny-mistral")
    b.add_argument("--target", default="target", help="label of the URL's results")
    b.add_argument("--metrics-url", help="the URL's engine metrics (Prometheus text), for the hit rate")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    b.add_argument("--requests", type=int, default=DEFAULTS["requests"],
                   help="random: requests per level (>= 2x concurrency)")
    b.add_argument("--input-len", type=int, default=DEFAULTS["input_len"], help="random: prompt tokens")
    b.add_argument("--output-len", type=int, default=DEFAULTS["output_len"], help="tokens per answer (both workloads)")
    b.add_argument("--vocab", type=int, default=DEFAULTS["vocab"], help="random: prompt token ids are drawn below this")
    b.add_argument("--conversations", "--sessions", dest="sessions", type=int, metavar="N", default=DEFAULTS["sessions"],
                   help="chat: conversations per level (at least 2 x concurrency)")
    b.add_argument("--turns", type=int, default=DEFAULTS["turns"], help="chat: turns per session")
    b.add_argument("--system-prompts", type=int, default=DEFAULTS["system_prompts"],
                   help="chat: system prompts shared by sessions")
    b.add_argument("--system-words", type=int, default=DEFAULTS["system_words"], help="chat: words per system prompt")
    b.add_argument("--user-words", type=int, default=DEFAULTS["user_words"], help="chat: words per user message")
    b.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    b.add_argument("--block-size", type=int, help="engine.block_size of every target the bench starts")
    b.add_argument("--kv-blocks", type=int, help="KV-cache blocks of every engine the bench starts "
                   "(vLLM's num_gpu_blocks_override): a cache a fraction of the working set, for KV pressure")
    b.add_argument("--vllm-client", choices=["random", "prefix_repetition"],
                   help="after our client, drive each target with vLLM's own `vllm bench serve` on this dataset "
                   "too (same levels; --requests prompts, at least 2 x concurrency)")
    b.add_argument("--prefix-len", type=int, default=DEFAULTS["prefix_len"], help="prefix_repetition: prefix tokens")
    b.add_argument("--suffix-len", type=int, default=DEFAULTS["suffix_len"], help="prefix_repetition: suffix tokens")
    b.add_argument("--num-prefixes", type=int, default=DEFAULTS["num_prefixes"],
                   help="prefix_repetition: distinct prefixes")
    b.add_argument("--out", help="directory for results.json and the PNG plots")
    b.add_argument("--json", help="also write the results here")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mistral-ray: {exc}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"mistral-ray: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; whatever was started has been stopped on the way out
        print("mistral-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
