"""ray.serve.llm's `build_openai_app` serving our tiny model, as a benchmark target (peer comparison).

`python -m mistral_ray.bench.serve_llm_target <deployment file> <port> <metrics port> <replicas> [<mode>
[<engine overrides as JSON>]]` serves until SIGTERM. The same engine arguments and KV size as our replicas
(with the bench's engine overrides), so only the serving stack differs. Mode `prefix`: its
`PrefixCacheAffinityRouter` (defaults as shipped) instead of power-of-two choices. With
RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 (and HAProxy on) in the environment, its direct-streaming mode.
"""

from __future__ import annotations

import json
import signal
import sys
import threading

PREFIX_ROUTER = "ray.serve.llm.request_router:PrefixCacheAffinityRouter"


def main(config: str, port: int, metrics_port: int, replicas: int, mode: str = "", engine: str = "{}") -> None:
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    from ray.llm._internal.serve.constants import RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING

    from mistral_ray import tiny_model
    from mistral_ray.bench.targets import bench_service
    from mistral_ray.options import replica_env, vllm_args

    cfg = bench_service(json.loads(engine), config)
    kwargs = vllm_args(cfg)
    source = kwargs.pop("model")
    name = kwargs.pop("served_model_name")[0]
    tiny_model.ensure(source)
    llm = LLMConfig(
        model_loading_config={"model_id": name, "model_source": source},
        engine_kwargs=kwargs,
        # A token CPU per replica: ray.serve.llm runs a model-download task that needs a whole free CPU at
        # start, which two 0.5-CPU replicas on a 2-core machine would not leave.
        placement_group_config={"bundles": [{"CPU": 0.01}]},
        # Its defaults (1 CPU per actor) cannot place two replicas and the ingress on 2 cores.
        deployment_config={"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0},
                           **({"request_router_config": {"request_router_class": PREFIX_ROUTER}}
                              if mode == "prefix" else {})},
        runtime_env={"env_vars": replica_env(cfg)},
        log_engine_metrics=True,
    )
    stop = threading.Event()
    ray.init(include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port,
             _system_config={"metrics_report_interval_ms": 1000})
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Direct streaming has no separate ingress deployment (the LLM server is the ingress).
        ingress = {} if RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING else {
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}}
        app = build_openai_app({"llm_configs": [llm], **ingress})
        serve.run(app, blocking=False)
        print("ray-serve-llm ready", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:7])
