"""vLLM's own benchmark client (`vllm bench serve`) against a target the bench runs, beside ours: a result that
only our own client shows is not a result. Each level's JSON is kept and read into the same `Result` rows
(target label + " [vllm bench]"), with the engines' prefix-cache hit rate read around it as for ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from mistral_ray.bench.load import Result
from mistral_ray.bench.report import hit_rate, prefix_cache_counters
from mistral_ray.bench.targets import Target, cpu_ms_per_request

DATASETS = ("random", "prefix_repetition")
SUFFIX = " [vllm bench]"


def command(target: Target, model: str, tokenizer: str, dataset: str, concurrency: int, out: Path,
            opts: dict) -> list[str]:
    """`vllm bench serve` for one level: completions, streamed, `requests` prompts (at least 2 per client)."""
    cmd = [sys.executable, "-m", "mistral_ray.engine.vllm_cli", "bench", "serve", "--backend", "openai",
           "--base-url", target.base_url, "--model", model, "--tokenizer", tokenizer,
           "--dataset-name", dataset, "--num-prompts", str(max(opts["requests"], 2 * concurrency)),
           "--max-concurrency", str(concurrency), "--seed", str(opts["seed"] + concurrency),
           "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,95,99", "--ignore-eos",
           "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name, "--disable-tqdm"]
    if dataset == "random":
        cmd += ["--random-input-len", str(opts["input_len"]), "--random-output-len", str(opts["output_len"])]
    else:
        cmd += ["--prefix-repetition-prefix-len", str(opts["prefix_len"]),
                "--prefix-repetition-suffix-len", str(opts["suffix_len"]),
                "--prefix-repetition-num-prefixes", str(opts["num_prefixes"]),
                "--prefix-repetition-output-len", str(opts["output_len"])]
    for name, value in target.headers.items():
        cmd += ["--header", f"{name}={value}"]
    return cmd


def result(label: str, dataset: str, concurrency: int, report: dict, rate) -> Result:
    def ms(name: str) -> float:
        return float(report.get(name, float("nan")))

    return Result(label + SUFFIX, dataset, concurrency, int(report.get("completed", 0)), int(report.get("failed", 0)),
                  float(report["duration"]), float(report["request_throughput"]), float(report["output_throughput"]),
                  ms("p50_ttft_ms"), ms("p95_ttft_ms"), ms("p99_ttft_ms"), ms("p50_tpot_ms"), ms("p95_tpot_ms"),
                  ms("p50_itl_ms"), ms("p95_itl_ms"), ms("p99_itl_ms"), rate)


def run(target: Target, model: str, tokenizer: str, dataset: str, concurrencies: list[int], workdir: Path,
        **opts) -> list[Result]:
    """One `vllm bench serve` run per level; a level whose client fails prints its output and is skipped."""
    results = []
    for c in concurrencies:
        out = workdir / f"{target.label.replace(':', '-')}-vllm-{dataset}-c{c}.json"
        before, cpu = prefix_cache_counters(target.metrics_url), target.cpu_s()
        done = subprocess.run(command(target, model, tokenizer, dataset, c, out, opts), capture_output=True,
                              text=True, env={**os.environ, "OPENAI_API_KEY": "unused"})
        cpu_after = target.cpu_s()
        time.sleep(target.metrics_lag_s if before is not None else 0)
        rate = hit_rate(before, prefix_cache_counters(target.metrics_url))
        if done.returncode != 0 or not out.exists():
            print(f"bench: vllm bench serve failed on {target.label} c={c}:\n{done.stdout[-1500:]}\n"
                  f"{done.stderr[-1500:]}", file=sys.stderr, flush=True)
            continue
        results.append(result(target.label, dataset, c, json.loads(out.read_text()), rate))
        results[-1].memory_mb = target.memory_mb()
        results[-1].cpu_ms = cpu_ms_per_request(cpu, cpu_after, results[-1].requests)
    return results
