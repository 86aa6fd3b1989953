"""The LoRA bench: many adapters on a small fleet, one of them hot, routed with and without adapter affinity.

`python -m mistral_ray.bench.lora [--runs 3] [--out DIR]`: for each run, two targets in turn on this machine,
both our stack with 2 replicas of the tiny Mistral, `engine.lora.max_loras` 2 and 8 tiny adapters (ft-1 ..
ft-8): `aware` (pow2 with adapter affinity, the default) and `pow2` (adapter affinity off: the policy alone,
blind to adapters, as ray.serve.llm's HAProxy path routes them). Against each, streamed completions at
concurrency 8 with seeded random prompts whose `model` is an adapter drawn with a skew (ft-1 hot):

- `rising 30%`, `skewed`, `rising 80%`, in this order: ft-1 has 30 %, half, then 80 % of the requests, the 7
  others share the rest: TTFT p50/p95, req/s, adapter loads and evictions (the replicas' counters), requests
  per replica against the mean, and how many replicas served ft-1 (its share of the fleet);
- vLLM's own client (`vllm bench serve --lora-modules`, adapters drawn uniformly): req/s and TTFT.

Prints a table and writes every row to DIR/lora.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from mistral_ray.bench import vllm_client
from mistral_ray.bench.load import drive, summarize
from mistral_ray.bench.report import markdown
from mistral_ray.bench.targets import Target, _ours, _wait
from mistral_ray.bench.workloads import random_prompts, warmup_prompts
from mistral_ray.config import LLM_DEPLOYMENT, STATE_DIR

ADAPTERS = [f"ft-{i}" for i in range(1, 9)]
ADAPTER_DIR = STATE_DIR / "models" / "tiny-mistral-adapters"


def start(label: str, affinity: bool, workdir: Path, replicas: int = 2, max_loras: int = 2) -> Target:
    def lora(args: dict) -> None:
        args["engine"]["lora"] = {"max_loras": max_loras, "max_lora_rank": 8}
        args["router"]["routing"]["adapter_affinity"] = affinity

    adapters = {name: {"source": str(ADAPTER_DIR / name), "build_tiny": True} for name in ADAPTERS}
    target = _ours(label, "pow2", replicas, workdir, update=lora,
                   deployments=[{"name": LLM_DEPLOYMENT, "user_config": {"adapters": adapters}}])
    target.replicas = replicas
    try:
        _wait(target, 900)
    except BaseException:
        target.stop()
        raise
    return target


def calls(n: int, hot: float, seed: int, input_len: int = 128, output_len: int = 32) -> list:
    """Random-token completions, each naming an adapter: ft-1 with probability `hot`, the others evenly."""
    rng = random.Random(seed)
    work = random_prompts("x", n, input_len, output_len, 961, seed)
    models = rng.choices(ADAPTERS, [hot] + [(1 - hot) / (len(ADAPTERS) - 1)] * (len(ADAPTERS) - 1), k=n)
    for call, model in zip(work, models):
        call.body["model"] = model
    return work


def adapter_counters(metrics_url: str) -> dict[str, float]:
    """Adapter loads and evictions summed over the replicas, from the node's metrics."""
    import httpx

    text = httpx.get(metrics_url, timeout=10).text
    out = {"loads": 0.0, "evictions": 0.0}
    for line in text.splitlines():
        for key, name in (("loads", "ray_mistral_ray_adapter_loads_total{"),
                          ("evictions", "ray_mistral_ray_adapter_evictions_total{")):
            if line.startswith(name):
                out[key] += float(line.rsplit(" ", 1)[1])
    return out


def level(target: Target, work: list, label: str) -> tuple[dict, list]:
    before = adapter_counters(target.metrics_url)
    replies, duration = asyncio.run(drive(target.base_url, work, 8, label, target.headers, progress=False))
    time.sleep(target.metrics_lag_s)
    after = adapter_counters(target.metrics_url)
    r = summarize(target.label, label, 8, replies, duration)
    mean = sum(r.per_replica.values()) / max(1, len(r.per_replica))
    hot = {x.replica for x in replies if x.ok and x.model == "ft-1"}
    row = {"target": target.label, "workload": label, "requests": r.requests, "errors": r.errors,
           "req_per_s": round(r.req_per_s, 2), "ttft_ms_p50": round(r.ttft_ms_p50, 1),
           "ttft_ms_p95": round(r.ttft_ms_p95, 1), "adapter_loads": after["loads"] - before["loads"],
           "adapter_evictions": after["evictions"] - before["evictions"], "per_replica": r.per_replica,
           "max_over_mean": round(max(r.per_replica.values()) / mean, 2) if mean else None,
           "hot_replicas": len(hot), "first_errors": r.first_errors}
    return row, replies


def vllm_level(target: Target, workdir: Path, seed: int) -> dict:
    from mistral_ray.bench.targets import bench_service

    out = workdir / f"{target.label}-vllm-lora.json"
    opts = {"requests": 160, "seed": seed, "input_len": 128, "output_len": 32}
    cmd = vllm_client.command(target, "tiny-mistral", bench_service().model.resolved_source(), "random",
                              8, out, opts) + ["--lora-modules", *ADAPTERS]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": "unused"})
    if done.returncode != 0 or not out.exists():
        return {"target": target.label, "workload": "uniform [vllm bench]", "error": done.stdout[-800:] + done.stderr[-800:]}
    report = json.loads(out.read_text())
    return {"target": target.label, "workload": "uniform [vllm bench]", "requests": report.get("completed"),
            "errors": report.get("failed"), "req_per_s": round(report["request_throughput"], 2),
            "ttft_ms_p50": round(report["p50_ttft_ms"], 1), "ttft_ms_p95": round(report["p95_ttft_ms"], 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--out", default=str(STATE_DIR / "bench" / "lora"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in range(args.runs):
        for label, affinity in (("aware", True), ("pow2", False)):
            target = start(label, affinity, out)
            try:
                asyncio.run(drive(target.base_url, warmup_prompts("tiny-mistral", 4), 2, headers=target.headers,
                                  progress=False))
                seed = 1000 * run
                # ft-1 at 30 %, then half, then 80 % of the requests: its share of the fleet should follow
                for workload, hot, n in (("rising 30%", 0.3, args.requests // 2), ("skewed", 0.5, args.requests),
                                         ("rising 80%", 0.8, args.requests // 2)):
                    row, _ = level(target, calls(n, hot, seed + int(100 * hot)), workload)
                    rows.append({"run": run + 1, **row})
                    print(json.dumps(rows[-1]), flush=True)
                rows.append({"run": run + 1, **vllm_level(target, out, seed)})
                print(json.dumps(rows[-1]), flush=True)
            finally:
                target.stop()
    (out / "lora.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = ("run", "target", "workload", "req_per_s", "ttft_ms_p50", "ttft_ms_p95", "adapter_loads",
            "adapter_evictions", "max_over_mean", "hot_replicas", "errors")
    print(markdown(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
