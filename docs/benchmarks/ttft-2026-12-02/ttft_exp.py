"""TTFT decomposition (docs/benchmarks.md, "TTFT under load", 2026-12-02): each variant started in turn,
driven by our bench client and by vLLM's (`vllm bench serve`), with the means of the engine's own TTFT
histogram and of our gate's beside the client's figures. Kept as the record of how rows.json was measured.

usage: .venv/bin/python docs/benchmarks/ttft-2026-12-02/ttft_exp.py OUTDIR VARIANT [VARIANT ...]
"""
import asyncio, copy, json, os, subprocess, sys, time
from pathlib import Path

import httpx, yaml
from prometheus_client.parser import text_string_to_metric_families

import mistral_ray.bench.targets as T
from mistral_ray.bench import DEFAULTS
from mistral_ray.bench.load import drive, summarize
from mistral_ray.bench.workloads import random_prompts

PY = sys.executable
MODEL_DIR = str(T.PROJECT_ROOT / ".state" / "models" / "tiny-mistral")
KEYS = ("mistral_ray_time_to_first_token_seconds", "mistral_ray_routing_latency_seconds",
        "mistral_ray_e2e_request_latency_seconds", "time_to_first_token_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
        "request_decode_time_seconds", "e2e_request_latency_seconds")

# variant -> (spec, env, engine overrides)
VARIANTS = {
    "vllm": ("vllm", {}, {}),
    "vllm-wait": ("vllm", {"MISTRAL_RAY_CPU_STEP_WAIT_US": "100"}, {}),
    "ours": ("ours:pow2:1", {}, {}),
    "ours-nice0": ("ours:pow2:1", {"RAY_worker_niceness": "0"}, {}),
    "ours-nowait": ("ours:pow2:1", {}, {"cpu_step_wait_us": None}),
    "ours-thr2": ("ours:pow2:1", {}, {"cpu_threads": 2}),
    "ours-idle": ("ours:pow2:1", {"SCHED_WORKER": "idle"}, {}),
    "ours-batch": ("ours:pow2:1", {"SCHED_WORKER": "batch"}, {}),
    "ours-w19": ("ours:pow2:1", {"SCHED_WORKER": "nice19"}, {}),
    "ours-thr2p": ("ours:pow2:1", {"OMP_WAIT_POLICY": "PASSIVE"}, {"cpu_threads": 2}),
    "vllm-thr1": ("vllm", {"OMP_NUM_THREADS": "1"}, {}),
}


def engine_sums(url):
    out = {}
    try:
        text = httpx.get(url, timeout=10).text
    except Exception:
        return out
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            for k in KEYS:
                base = s.name.replace("ray_vllm_", "").replace("vllm:", "").replace("ray_mistral_ray_", "mistral_ray_")
                if base in (k + "_sum", k + "_count"):
                    key = k + ("_sum" if s.name.endswith("_sum") else "_count")
                    out[key] = out.get(key, 0.0) + s.value
    return out


def means(before, after):
    m = {}
    for k in KEYS:
        n = after.get(k + "_count", 0) - before.get(k + "_count", 0)
        if n > 0 and k + "_sum" in after:
            m[k.replace("_seconds", "_ms")] = round(1000 * (after[k + "_sum"] - before.get(k + "_sum", 0)) / n, 1)
    return m


def vllm_client(target, c, outdir, label):
    fn = f"{label}-vllmclient-c{c}.json"
    cmd = [PY, "-m", "mistral_ray.engine.vllm_cli", "bench", "serve", "--backend", "openai",
           "--base-url", target.base_url, "--model", "tiny-mistral", "--tokenizer", MODEL_DIR,
           "--dataset-name", "random", "--input-len", "128", "--output-len", "64", "--num-prompts", "96",
           "--ignore-eos", "--max-concurrency", str(c), "--percentile-metrics", "ttft,tpot,itl",
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(outdir),
           "--result-filename", fn, "--disable-tqdm", "--seed", str(c),
           "--header", f"Authorization=Bearer {T.BENCH_KEY}"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OPENAI_API_KEY": T.BENCH_KEY})
    try:
        r = json.loads((outdir / fn).read_text())
    except Exception:
        print(p.stdout[-2000:], p.stderr[-3000:])
        return None
    return dict(req_s=round(r["request_throughput"], 2), ttft_p50=round(r["p50_ttft_ms"], 1),
                ttft_p99=round(r["p99_ttft_ms"], 1), ttft_mean=round(r["mean_ttft_ms"], 1), tpot_p50=round(r["p50_tpot_ms"], 2), ok=r["completed"])


def run_variant(name, outdir):
    spec, env, engine = VARIANTS[name]
    saved = dict(os.environ)
    os.environ.update(env)
    local = T.LOCAL_CPU
    if engine:
        raw = yaml.safe_load(local.read_text())
        raw["applications"][0]["args"]["engine"].update(engine)
        p = outdir / f"{name}-deploy.yaml"
        p.write_text(yaml.safe_dump(raw, sort_keys=False))
        T.LOCAL_CPU = p
    sched = os.environ.pop("SCHED_WORKER", None)
    try:
        target = T.start(spec, outdir, label=name)
    finally:
        T.LOCAL_CPU = local
        os.environ.clear(); os.environ.update(saved)
    if sched:
        n = 0
        for p in target.session():
            if p.name() != "VLLM::Worker":
                continue
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                tid = int(tid)
                if sched == "idle":
                    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
                elif sched == "batch":
                    os.sched_setscheduler(tid, os.SCHED_BATCH, os.sched_param(0))
                else:
                    os.setpriority(os.PRIO_PROCESS, tid, 19)
                n += 1
        print("sched", sched, "threads", n, flush=True)
    rows = []
    try:
        asyncio.run(drive(target.base_url, random_prompts("tiny-mistral", 4, 16, 4, 961, -1), 2,
                          headers=target.headers, progress=False))
        for c in (8, 32):
            work = random_prompts("tiny-mistral", 96, 128, 64, DEFAULTS["vocab"], c)
            b = engine_sums(target.metrics_url)
            replies, dur = asyncio.run(drive(target.base_url, work, c, headers=target.headers, progress=False))
            res = summarize(name, "random", c, replies, dur)
            time.sleep(target.metrics_lag_s + 0.5)
            a = engine_sums(target.metrics_url)
            rows.append(dict(variant=name, client="ours", c=c, req_s=round(res.req_per_s, 2),
                             ttft_p50=round(res.ttft_ms_p50, 1), ttft_p99=round(res.ttft_ms_p99, 1),
                             ttft_mean=round(1000 * sum(r.ttft for r in replies if r.ok) / max(1, res.requests), 1),
                             tpot_p50=round(res.tpot_ms_p50, 2), ok=res.requests, **means(b, a)))
            print(json.dumps(rows[-1]), flush=True)
        for c in (8, 32):
            b = engine_sums(target.metrics_url)
            v = vllm_client(target, c, outdir, name)
            time.sleep(target.metrics_lag_s + 0.5)
            a = engine_sums(target.metrics_url)
            rows.append(dict(variant=name, client="vllm", c=c, **(v or {}), **means(b, a)))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        target.stop()
        time.sleep(2)
        left = target.session() if target.proc else []
        if left:
            print("LEFT", left)
    return rows


if __name__ == "__main__":
    outdir = Path(sys.argv[1]); outdir.mkdir(parents=True, exist_ok=True)
    allrows = []
    for v in sys.argv[2:]:
        allrows += run_variant(v, outdir)
        (outdir / "rows.json").write_text(json.dumps(allrows, indent=1))
