"""What a benchmark run leaves behind: a table on stdout, JSON, and PNG plots; plus the engines' prefix-cache
hit rate, read from their own Prometheus metrics."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

from mistral_ray.bench.load import Result

# vLLM's counters (tokens looked up / found in the prefix cache), bare and as Ray's exporter renames them.
_HITS = {"vllm:prefix_cache_hits_total", "ray_vllm_prefix_cache_hits_total"}
_QUERIES = {"vllm:prefix_cache_queries_total", "ray_vllm_prefix_cache_queries_total"}


def prefix_cache_counters(metrics_url: Optional[str]) -> Optional[tuple[float, float]]:
    """(hits, queries) summed over every engine the endpoint exports, or None if it cannot be read."""
    if not metrics_url:
        return None
    try:
        text = httpx.get(metrics_url, timeout=10).text
    except httpx.HTTPError:
        return None
    hits = queries = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _HITS:
                hits += sample.value
            elif sample.name in _QUERIES:
                queries += sample.value
    return hits, queries


def hit_rate(before: Optional[tuple[float, float]], after: Optional[tuple[float, float]]) -> Optional[float]:
    if before is None or after is None or after[1] - before[1] <= 0:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _f(value: Optional[float], spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(results: list[Result]) -> str:
    """One row per target and level. TPOT is per request, (e2e - TTFT) / (output tokens - 1), from the
    server's usage: a gap between SSE events says little when a server puts several tokens in one event."""
    head = (f"{'target':<24}{'workload':>9}{'conc':>5}{'req':>5}{'err':>4}{'req/s':>7}{'tok/s':>7}"
            f"{'TTFT p50':>9}{'p95':>7}{'p99':>7}{'TPOT p50':>9}{'p95':>6}{'hit %':>7}{'PSS MB':>8}{'CPU ms':>8}  per replica")
    rows = [head]
    for r in results:
        rate = None if r.prefix_cache_hit_rate is None else 100 * r.prefix_cache_hit_rate
        pss = (r.memory_mb or {}).get("pss")
        cpu = (r.cpu_ms or {}).get("total")
        replicas = " ".join(str(n) for n in sorted(r.per_replica.values(), reverse=True))
        rows.append(
            f"{r.target:<24}{r.workload:>9}{r.concurrency:>5}{r.requests:>5}{r.errors:>4}{r.req_per_s:>7.1f}"
            f"{r.out_tok_per_s:>7.0f}{r.ttft_ms_p50:>9.1f}{r.ttft_ms_p95:>7.1f}{r.ttft_ms_p99:>7.1f}"
            f"{r.tpot_ms_p50:>9.1f}{r.tpot_ms_p95:>6.1f}{_f(rate, '.1f'):>7}{_f(pss, '.0f'):>8}{_f(cpu, '.1f'):>8}  {replicas}"
        )
    return "\n".join(rows)


def markdown(rows: list[dict], cols: tuple[str, ...]) -> str:
    """Rows of a bench module (the LoRA and tenants benches) as a Markdown table of `cols`."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def to_json(results: list[Result]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)


def plot(results: list[Result], out_dir: Path) -> list[Path]:
    """latency_vs_concurrency.png (TTFT/ITL p50 and requests/s per target) and hit_rate_by_target.png."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    targets = list(dict.fromkeys(f"{r.target} ({r.workload})" for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name in targets:
        rows = sorted((r for r in results if f"{r.target} ({r.workload})" == name), key=lambda r: r.concurrency)
        xs = [r.concurrency for r in rows]
        axes[0].plot(xs, [r.ttft_ms_p50 for r in rows], marker="o", label=name)
        axes[1].plot(xs, [r.tpot_ms_p50 for r in rows], marker="o", label=name)
        axes[2].plot(xs, [r.req_per_s for r in rows], marker="o", label=name)
    for ax, title in zip(axes, ["TTFT p50 (ms)", "time per output token p50 (ms)", "requests/s"]):
        ax.set_title(title)
        ax.set_xlabel("concurrency")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "latency_vs_concurrency.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    rated = [r for r in results if r.prefix_cache_hit_rate is not None]
    if rated:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rated)), 4))
        labels = [f"{r.target}\n{r.workload} c={r.concurrency}" for r in rated]
        ax.bar(labels, [100 * r.prefix_cache_hit_rate for r in rated], color="tab:blue")
        ax.set_ylabel("prefix-cache hit rate (%)")
        ax.set_title("prefix-cache hit rate by routing policy / target")
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        written.append(out_dir / "hit_rate_by_target.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
