"""The noisy-neighbour bench: one replica, a key that floods it and a key with a modest steady load.

`python -m mistral_ray.bench.tenants [--runs 3] [--seconds 40] [--out DIR]`: each run starts our stack (1
replica of the tiny Mistral, deployments/local-cpu.yaml) twice, with `router.tenants.fair_share` off (`fifo`:
first come, first served up to max_ongoing_requests) and on (`fair`), in alternating order. The key file holds
`flood` and `steady` (one tier, weight 1). Per run, the replica's capacity C is measured first (req/s of a
closed loop at concurrency 32, on the first target). Against each target, open-loop (Poisson) streamed
completions of the random workload (128 prompt tokens, 64 completion tokens):

- `B alone`: `steady` at B = max(0.5, C/10) req/s;
- `A+B`: `flood` at 4 C req/s and `steady` at B, together.

`steady` is sent by vLLM's own client (`vllm bench serve --request-rate`, its own process: its TTFT is not
the flood client's event loop), `flood` by ours, starting when vLLM's client starts its measured run. For
each key and phase: requests sent, answered, refused (ours: 503s counted; vLLM's: failed), TTFT p50/p95 of
the answered, and (A+B) both keys' answers per second over the flood's span (first request to last answer).
Prints a table and writes every row to DIR/tenants.json.
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
from typing import Optional

import httpx

from mistral_ray.bench import vllm_client
from mistral_ray.bench.load import Reply, _pct, drive, send, summarize
from mistral_ray.bench.report import markdown
from mistral_ray.bench.targets import Target, _ours, _wait, bench_service
from mistral_ray.bench.workloads import random_prompts, warmup_prompts
from mistral_ray.config import STATE_DIR

MODEL = "tiny-mistral"
KEYS = {"flood": "sk-bench-flood-000000000001", "steady": "sk-bench-steady-00000000002"}


def start(label: str, fair: bool, workdir: Path, reserve: Optional[float] = None) -> Target:
    def tenants(args: dict) -> None:
        args["router"]["tenants"]["fair_share"] = fair
        if reserve is not None:
            args["router"]["tenants"]["reserve"] = reserve

    lines = "".join(f"{kid}:{key}\n" for kid, key in KEYS.items())
    target = _ours(label, "pow2", 1, workdir, update=tenants, keys=lines)
    try:
        _wait(target, 600)
    except BaseException:
        target.stop()
        raise
    return target


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[key]}"}


async def open_loop(client: httpx.AsyncClient, base_url: str, key: str, rate: float, seconds: float,
                    seed: int) -> list[Reply]:
    """Poisson arrivals at `rate` req/s for `seconds`, each sent whatever came of the others."""
    rng = random.Random(seed)
    work = random_prompts(MODEL, max(1, int(rate * seconds * 1.5) + 10), 128, 64, 961, seed)
    tasks, start, at = [], time.perf_counter(), 0.0
    for call in work:
        at += rng.expovariate(rate)
        if at >= seconds:
            break
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        tasks.append(asyncio.create_task(send(client, base_url, call, headers(key))))
    return list(await asyncio.gather(*tasks))


async def flood(base_url: str, rate: float, seconds: float, seed: int) -> list[Reply]:
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        return await open_loop(client, base_url, "flood", rate, seconds, seed)


def steady(target: Target, rate: float, seconds: float, seed: int, workdir: Path) -> subprocess.Popen:
    """vLLM's client sending `steady`'s load: Poisson arrivals at `rate` for about `seconds`."""
    out = workdir / f"{target.label}-steady-{seed}.json"
    out.unlink(missing_ok=True)
    keyed = Target(target.label, target.base_url, headers=headers("steady"))
    n = max(2, int(rate * seconds))
    opts = {"requests": n, "seed": seed, "input_len": 128, "output_len": 64}
    # in flight at most half the requests (the command sends at least twice its concurrency)
    cmd = vllm_client.command(keyed, MODEL, bench_service().model.resolved_source(), "random", n // 2, out, opts)
    cmd += ["--request-rate", str(rate), "--save-detailed"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OPENAI_API_KEY": KEYS["steady"]}), out


def phase(target: Target, rates: dict[str, float], seconds: float, seed: int, workdir: Path) -> tuple[dict, float]:
    """Both loads over the same `seconds`: the flood starts when vLLM's client starts its measured run (it
    takes seconds to start, and sends one test request first). Returns the replies and the seconds from the
    flood's first request to its last answer (the flood's own req/s)."""
    proc, out = steady(target, rates["steady"], seconds, seed, workdir)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Starting main benchmark run" in line:
            break
    start = time.perf_counter()
    flooded = asyncio.run(flood(target.base_url, rates["flood"], seconds, seed)) if rates.get("flood") else None
    elapsed = time.perf_counter() - start
    log, _ = proc.communicate(timeout=seconds * 10 + 120)
    report = json.loads(out.read_text()) if out.exists() else {"error": ("".join(lines) + log)[-600:]}
    return {"steady": report, "flood": flooded}, elapsed


def describe_vllm(key: str, report: dict) -> dict:
    if "error" in report:
        return {f"{key}_error": report["error"]}
    done, failed = int(report.get("completed", 0)), int(report.get("failed", 0))
    return {f"{key}_sent": done + failed, f"{key}_ok": done, f"{key}_refused": failed,
            f"{key}_success": round(done / (done + failed), 3) if done + failed else None,
            f"{key}_ttft_ms_p50": round(report.get("p50_ttft_ms", float("nan")), 1),
            f"{key}_ttft_ms_p95": round(report.get("p95_ttft_ms", float("nan")), 1)}


def describe(key: str, replies: list[Reply]) -> dict:
    ok = [r for r in replies if r.ok]
    refused = sum(1 for r in replies if r.error.startswith("503"))
    ttfts = [r.ttft for r in ok]
    return {f"{key}_sent": len(replies), f"{key}_ok": len(ok), f"{key}_refused": refused,
            f"{key}_other_errors": len(replies) - len(ok) - refused,
            f"{key}_success": round(len(ok) / len(replies), 3) if replies else None,
            f"{key}_ttft_ms_p50": round(1000 * _pct(ttfts, 0.5), 1), f"{key}_ttft_ms_p95": round(1000 * _pct(ttfts, 0.95), 1)}


def capacity(target: Target) -> float:
    work = random_prompts(MODEL, 96, 128, 64, 961, 7)
    replies, duration = asyncio.run(drive(target.base_url, work, 32, headers=headers("steady"), progress=False))
    return summarize(target.label, "random", 32, replies, duration).req_per_s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--reserves", default="", help="also fair share with these router.tenants.reserve values "
                   "(comma-separated; `fair` is the default's)")
    p.add_argument("--out", default=str(STATE_DIR / "bench" / "tenants"))
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    targets = [("fifo", False, None), ("fair", True, None)]
    targets += [(f"fair reserve={r}", True, float(r)) for r in args.reserves.split(",") if r]
    for run in range(args.runs):
        order = targets if run % 2 == 0 else targets[::-1]
        cap = None
        for label, fair, reserve in order:
            target = start(label.replace(" ", "-"), fair, out, reserve)
            target.label = label
            try:
                asyncio.run(drive(target.base_url, warmup_prompts(MODEL, 4), 2, headers=headers("steady"),
                                  progress=False))
                cap = cap or capacity(target)
                b_rate = round(max(0.5, cap / 10), 2)
                for name, rates in (("B alone", {"steady": b_rate}), ("A+B", {"flood": 4 * cap, "steady": b_rate})):
                    got, elapsed = phase(target, rates, args.seconds, 1000 * run + 17, out)
                    row = {"run": run + 1, "target": label, "phase": name, "capacity_req_s": round(cap, 2),
                           "steady_rate": b_rate, "flood_rate": round(rates.get("flood", 0), 2)}
                    row.update(describe_vllm("steady", got["steady"]))
                    if got["flood"] is not None:
                        row.update(describe("flood", got["flood"]))
                    if got["flood"] is not None:  # both keys' answers over the flood's span
                        row["total_ok_req_s"] = round((row.get("steady_ok", 0) + row["flood_ok"]) / elapsed, 2)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                target.stop()
    (out / "tenants.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = ("run", "target", "phase", "steady_ttft_ms_p50", "steady_ttft_ms_p95", "steady_success", "steady_refused",
            "flood_ok", "flood_refused", "total_ok_req_s")
    print(markdown(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
