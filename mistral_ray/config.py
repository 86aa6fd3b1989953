"""The one config tree of mistral-ray, and the only home of its defaults.

A deployment file under `deployments/` is a plain Ray Serve config file (`serve run` / `serve deploy` /
a RayService's `serveConfigV2` take it as is); the application's `args` are a `ServiceConfig`. Everything
else (Serve deployment options, vLLM arguments, the replicas' and the Ray cluster's environment) is derived
from it in `mistral_ray/options.py`, so that local runs and clusters cannot disagree.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Relative paths in a config (model dirs, state) are taken from here, not from the process cwd: Serve
# builds applications in worker processes whose cwd is not the user's.
STATE_DIR = PROJECT_ROOT / ".state"
APP_IMPORT_PATH = "mistral_ray.app:build_app"
LLM_DEPLOYMENT = "LLMServer"  # the replicas' deployment: its `user_config` in a file is an AdaptersConfig


class ConfigError(ValueError):
    """A deployment file that cannot be served; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field("tiny-mistral", min_length=1, description="Model id clients send as `model`.")
    source: str = Field(
        ".state/models/tiny-mistral",
        min_length=1,
        description="Local checkpoint directory (relative paths are from the project root) or a Hugging "
        "Face repo id such as mistralai/Mistral-7B-Instruct-v0.1, loaded by vLLM on the replica.",
    )
    revision: Optional[str] = Field(None, description="Hub revision (branch, tag or commit) of `source`.")
    build_tiny: bool = Field(
        False,
        description="Build the embedded tiny Mistral (random weights) at `source` when that directory is "
        "missing or empty, for laptops and tests (no downloads). An explicit choice: `source` must then be a "
        "local path (absolute, or starting with `.`), and an existing checkpoint there is never replaced.",
    )

    @model_validator(mode="after")
    def _tiny_needs_a_local_path(self) -> "ModelConfig":
        if self.build_tiny and not (self.source.startswith(".") or Path(self.source).is_absolute()):
            raise ValueError(
                f"build_tiny builds the random tiny model into `source`, which must then be a local path "
                f"(absolute or starting with .); {self.source!r} reads as a hub checkpoint: set build_tiny: false"
            )
        return self

    def resolved_source(self) -> str:
        """An absolute path for local checkpoints; hub ids are passed through."""
        path = Path(self.source)
        if path.is_absolute() or self.source.startswith("."):
            return str(path if path.is_absolute() else (PROJECT_ROOT / path).resolve())
        local = PROJECT_ROOT / path
        return str(local.resolve()) if local.exists() else self.source


class LoraConfig(_Strict):
    """The engine's LoRA slots (vLLM --enable-lora and its settings); the adapters themselves are the LLM
    deployment's `user_config` (`AdaptersConfig`), which changes without restarting a replica."""

    max_loras: int = Field(2, ge=1, description="Adapters one engine batch can mix (vLLM --max-loras): each "
                           "holds a slot of weights on the device; more adapters wait for a slot, least recently "
                           "used out.")
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank served (vLLM --max-lora-rank); an "
                               "adapter of higher rank is refused when the config names it.")
    max_cpu_loras: Optional[int] = Field(
        None, ge=1, description="Adapters kept loaded in host memory per replica (vLLM --max-cpu-loras), least "
        "recently used out; null: max_loras. Others are read from their source again when asked for.")

    @model_validator(mode="after")
    def _cpu_holds_the_slots(self) -> "LoraConfig":
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        return self


class AdapterConfig(_Strict):
    source: str = Field(..., min_length=1, description="The adapter's directory in PEFT format (relative paths "
                        "are from the project root; on Kubernetes a mounted volume) or a Hugging Face repo id.")
    build_tiny: bool = Field(
        False, description="Write a random LoRA adapter for the embedded tiny Mistral at `source` when that "
        "directory is missing or empty (seeded by the adapter's name; for laptops and tests).")
    keys: Optional[list[str]] = Field(
        None, description="API key ids that may use this adapter (a tenant's own fine-tune); any other key gets "
        "404 for it, as for a name that does not exist, and /v1/models does not list it to them. null: every "
        "key. Needs router.api_keys.enabled.")

    @model_validator(mode="after")
    def _tiny_needs_a_local_path(self) -> "AdapterConfig":
        ModelConfig(source=self.source, build_tiny=self.build_tiny)  # the same rule as the base model's
        return self

    def resolved_source(self) -> str:
        return ModelConfig(source=self.source).resolved_source()


class AdaptersConfig(_Strict):
    """The LLM deployment's `user_config`: what a replica changes in place when the file is deployed again
    (Serve calls `reconfigure` on every running replica; a change of the application's `args` restarts them)."""

    adapters: dict[str, AdapterConfig] = Field(
        default_factory=dict, description="Adapter name (what clients send as `model`) -> where it is. Needs "
        "`engine.lora`. Removing one: requests already running on it finish; new ones get 404.")


class EngineConfig(_Strict):
    device: Literal["cpu", "cuda"] = Field("cpu", description="Which vLLM build the replicas run.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations dtype; `auto` takes the checkpoint's."
    )
    max_model_len: Optional[int] = Field(
        2048, ge=16, description="Context length (prompt + completion) in tokens; null: the model's."
    )
    max_num_seqs: int = Field(64, ge=1, description="Sequences the engine batches at once.")
    max_num_batched_tokens: Optional[int] = Field(None, ge=16, description="Tokens per engine step.")
    block_size: Optional[int] = Field(
        None, ge=1, description="Tokens per KV-cache block (vLLM --block-size); null: vLLM's (16 on CUDA, 128 on "
        "CPU, where it must be a multiple of 32). A sliding-window hit needs the blocks covering the window: "
        "with the tiny model's 64-token window, 128-token blocks make that one block, 32 makes it two."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    cpu_kvcache_space_gib: float = Field(
        1.0, gt=0, description="KV cache per replica on CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of GPU memory vLLM may use (weights + KV) on CUDA."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards the model over.")
    enforce_eager: bool = Field(True, description="Skip CUDA graph / compile warm-up (faster start).")
    seed: int = Field(0, description="Engine seed; requests with their own `seed` stay reproducible.")
    cpu_threads: Optional[int] = Field(
        None, ge=1, description="Threads of a CPU engine's forward pass (OMP_NUM_THREADS); null: Ray's choice, "
        "the replica's reserved CPUs (at least 1). On a 2-core machine that also runs the proxy, 1 beats 2: "
        "spinning OpenMP threads starve the serving processes (measured 2026-11-27 at 1b1bded: ITL 11.6 vs 18.5 ms at c=1)."
    )
    cpu_step_wait_us: Optional[int] = Field(
        100, ge=1, le=10_000, description="On a CPU engine, how its scheduler and worker wait for each other "
        "between steps: sleep this many microseconds per check instead of vLLM's busy yield, which on a "
        "small machine takes the cores the forward pass and the proxy need (measured: c=32 +38 % and +40 % in two rounds, see "
        "docs/benchmarks.md); null: vLLM's spin. Not applied to CUDA engines."
    )
    # vLLM's OpenAI serving options (`vllm serve` flags of the same names).
    tokenizer_mode: Literal["auto", "hf", "slow", "mistral"] = Field(
        "auto", description="`mistral` for checkpoints in Mistral's own format (with config_format and "
        "load_format `mistral`); HF-format checkpoints such as Mistral-7B-Instruct-v0.1 use `auto`."
    )
    config_format: Literal["auto", "hf", "mistral"] = Field("auto", description="vLLM --config-format.")
    load_format: str = Field("auto", min_length=1, description="vLLM --load-format (`mistral` for consolidated weights).")
    chat_template: Optional[str] = Field(
        None, description="A Jinja chat template (file path or the template itself); null: the tokenizer's."
    )
    enable_auto_tool_choice: bool = Field(
        False, description="Let the model decide to call tools (`tool_choice: auto`); needs tool_call_parser. "
        "A request naming a function in `tool_choice` works without it (structured output forces the call)."
    )
    tool_call_parser: Optional[str] = Field(
        None, description="How tool calls are read from the model's text: `mistral` for Mistral's "
        "[TOOL_CALLS] format (vLLM's parser names: mistral, hermes, llama3_json, ...)."
    )
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "priority", description="vLLM --scheduling-policy. priority: the engine runs its queue by each request's "
        "priority, which the gate sets from the API key's tier and its fair share (router.tenants; a client's "
        "own `priority` is refused), and preempts the lowest first when the KV cache runs out; requests of equal "
        "priority run first come, first served. fcfs: arrival order for everyone."
    )
    lora: Optional[LoraConfig] = Field(
        None, description="Serve LoRA adapters of this model (listed in the LLM deployment's user_config, see "
        "AdaptersConfig); null: none, and a file naming adapters is refused.")
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other `vllm serve` option, by its argument name (`--max-loras` "
        "is `max_loras`); an unknown name fails the replica's start naming it."
    )


class ScalingConfig(_Strict):
    min_replicas: int = Field(1, ge=0, description="Fewest LLM replicas (0 allows scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Most LLM replicas.")
    initial_replicas: Optional[int] = Field(None, ge=0, description="Replicas at start; default min.")
    replica_cpus: float = Field(
        0.5, ge=0, description="Ray CPUs reserved per LLM replica. The CPU default fits two replicas on a "
        "2-core machine; the engine's threads are not limited by it. With replica_gpus, what keeps replicas "
        "off a head that offers Ray no CPU and no GPU (the RayService's and `mistral-ray run --nodes`'s)."
    )
    replica_gpus: float = Field(0, ge=0, description="Ray GPUs reserved per LLM replica.")
    placement: Literal["spread", "pack"] = Field(
        "spread", description="spread: replicas go to different worker nodes while there are free ones (a lost "
        "node takes fewer replicas with it); pack: as few nodes as possible (Ray Serve's compact scheduling, "
        "for freeing whole nodes). A property of the Ray cluster's environment, like the data plane."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica holds at once (running in its engine's batch or waiting "
        "in the engine's queue); more get 503 with Retry-After, so memory stays bounded."
    )
    target_ongoing_requests: float = Field(
        16, gt=0, description="Queued + running requests per replica the autoscaler aims at (when min < max)."
    )
    target_kv_usage: float = Field(
        0.8, gt=0, le=1, description="Sliding-window-aware KV-cache use per replica the autoscaler aims at; "
        "whichever of the two targets needs more replicas wins."
    )
    upscale_delay_s: float = Field(10, ge=0, description="How long the need for more replicas must last.")
    downscale_delay_s: float = Field(60, ge=0, description="How long the need for fewer replicas must last.")
    downscale_to_zero_delay_s: Optional[float] = Field(
        None, ge=0, description="Delay before going from 1 to 0 replicas (min_replicas 0); default downscale_delay_s."
    )
    look_back_period_s: float = Field(10, gt=0, description="Window the replicas' stats are averaged over.")
    drain_timeout_s: float = Field(
        30, ge=0, description="On scale-down or shutdown a replica takes no new requests and gets this long "
        "to finish the ones it has (Serve's graceful shutdown)."
    )
    metrics_interval_s: float = Field(2, gt=0, description="How often replicas push their stats to Serve.")
    health_check_period_s: float = Field(10, gt=0, description="How often Serve checks each replica's engine.")
    health_check_timeout_s: float = Field(
        30, gt=0, description="A replica whose engine does not answer a health check within this is replaced."
    )
    start_timeout_s: float = Field(
        600, gt=0, description="How long `mistral-ray run` waits for the first replica to answer (a 7B "
        "checkpoint's download and load take minutes)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> "ScalingConfig":
        if self.replica_cpus <= 0 and self.replica_gpus <= 0:
            raise ValueError("replica_cpus or replica_gpus must be > 0: a replica that reserves nothing could "
                             "land on the head node")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        init = self.initial_replicas
        if init is not None and not self.min_replicas <= init <= self.max_replicas:
            raise ValueError(f"initial_replicas ({init}) outside [min_replicas, max_replicas]")
        return self


class ApiKeysConfig(_Strict):
    enabled: bool = Field(
        False, description="Require `Authorization: Bearer <key>` on every route but /health and /ready. Off "
        "in the local default; on in every Kubernetes overlay (`mistral-ray k8s serve-config` turns it on)."
    )
    file: str = Field(
        "/etc/mistral-ray/api-keys/keys",
        description="One key per line as `<key id>:<key>`, optionally followed by the key's tenant attributes "
        "`tier=<name> weight=<w> rpm=<n> tpm=<n>` (router.tenants; rpm/tpm replace router.limits' for this key); "
        "`#` comments. On Kubernetes a Secret mounted here. Only the key id ever reaches logs and metrics.",
    )
    env: Optional[str] = Field(
        None, description="Also read keys (same format, comma- or newline-separated) from this env variable."
    )

    def read_entries(self) -> list[str]:
        """The raw `<id>:<key>` entries from the file and the environment (read once, at replica start)."""
        entries = []
        path = Path(self.file)
        if path.exists():
            entries += path.read_text().splitlines()
        if self.env:
            entries += os.environ.get(self.env, "").replace(",", "\n").splitlines()
        return [e.strip() for e in entries if e.strip() and not e.strip().startswith("#")]


class RoutingConfig(_Strict):
    """Which LLM replica gets a request (see mistral_ray/routing/policies.py)."""

    policy: Literal["pow2", "prefix_affinity", "kv_aware", "session"] = Field(
        "pow2", description="pow2: the less loaded of two random replicas. prefix_affinity: the replica "
        "that was sent the longest prefix of the prompt (a guess from the text). kv_aware: the replica whose "
        "engine holds the most reusable prompt tokens, from its own KV-cache events, with vLLM's sliding-window "
        "rule (prefix_affinity until the events are in). session: the replica the session used before. All but "
        "pow2 fall back to pow2 when their favourite is overloaded."
    )
    imbalance: int = Field(
        16, ge=0, description="A favourite replica is skipped when its queued + running requests exceed the "
        "least loaded replica's by more than this (and by more than `imbalance_ratio` times, see there). "
        "About a quarter of an engine's max_num_seqs, as SGLang's and vLLM's routers (64 for 256). With 8, "
        "moved conversations cost prefix hits and bought no throughput or TTFT (docs/benchmarks.md, \"overload "
        "needs a gap and a ratio\")."
    )
    imbalance_ratio: float = Field(
        1.5, ge=1, description="A favourite replica is skipped only when its load also exceeds this many "
        "times the least loaded replica's (both as the `imbalance` check sees them). SGLang's and vLLM's "
        "cache-aware routers use the same two-threshold rule (64 and 1.5)."
    )
    kv_limit: float = Field(0.95, gt=0, description="A favourite replica is skipped at this KV-cache use.")
    load_average_s: float = Field(
        1.0, ge=0, description="The `imbalance` check sees a replica's load fall over about this many "
        "seconds (a rise at once), so a replica whose batch of answers just ended does not look idle for the "
        "moment before its conversations' next turns arrive (and draw conversations off the replicas holding "
        "them). 0: the loads of the moment."
    )
    block_chars: int = Field(
        64, ge=1, description="Prefix block size in characters (about one 16-token KV block of English)."
    )
    max_prefix_blocks: int = Field(512, ge=1, description="Leading blocks of a prompt that are hashed.")
    index_blocks: int = Field(
        65536, ge=1, description="Prefix blocks remembered per replica (least recently used are forgotten)."
    )
    max_sessions: int = Field(100_000, ge=1, description="Sessions the session policy remembers (LRU).")
    session_header: str = Field(
        "x-session-id", min_length=1, description="Header naming the session (else the body's `user` field)."
    )
    chars_per_token: float = Field(
        4.0, gt=0, description="Prompt characters per token, for KV accounting before the engine tokenizes."
    )
    stats_period_s: float = Field(0.5, gt=0, description="How often Serve reads each replica's load.")
    adapter_affinity: bool = Field(
        True, description="With LoRA adapters (engine.lora): route an adapter's requests to the replicas running "
        "it, else to one with a free adapter slot (routing/adapter_policy.py). false: the policy alone, blind to "
        "adapters (for comparison: the LoRA bench's `pow2` target)."
    )
    adapter_spread: float = Field(
        1.0, gt=0, description="With LoRA adapters (engine.lora): an adapter may run on its share of the "
        "requests times the replicas times this, rounded up (at least 1): at 1.0 an adapter with 60 % of the "
        "traffic on 2 replicas uses both, one with 10 % stays on one replica (routing/adapter_policy.py)."
    )
    adapter_window_s: float = Field(
        30, gt=0, description="An adapter's share of the traffic counts each request for about this long "
        "(exponentially decaying), and a replica a router sent the adapter to stays one of its holders this long."
    )
    route_body_bytes: int = Field(
        65536, ge=16384, description="How much of a request body HAProxy hands the ingress router (prefix_affinity "
        "and the session policy's `user` field need it; pow2 gets none). A longer body is routed by load. It "
        "becomes HAProxy's buffer size (tune.bufsize) for every request, headers included, so it may not go "
        "below HAProxy's own 16 KiB: at 1024 ordinary requests' headers no longer fit."
    )


class LimitsConfig(_Strict):
    """What one request may ask for, and how fast one API key may ask (see server/limits.py)."""

    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="Largest request body; more gets 413.")
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="Longest prompt in tokens, counted by the engine's tokenizer (400 beyond); "
        "null: the context length is the only bound."
    )
    max_tokens: Optional[int] = Field(
        None, ge=1, description="Most completion tokens per sequence: a request asking for more (max_tokens, "
        "max_completion_tokens, max_output_tokens, however encoded) gets 400; one that asks for none gets "
        "this many at most (the engine's cap on every route, vLLM's max_new_tokens override). null: the "
        "context length is the only bound."
    )
    max_n: int = Field(8, ge=1, description="Most choices (`n`) per request (400 beyond).")
    max_batch_prompts: int = Field(
        32, ge=1, description="Most prompts in one completions request (`prompt` as a list; 400 beyond). Each "
        "is a sequence per choice: n x prompts count as the request's load and in its token charge."
    )
    requests_per_minute: Optional[int] = Field(
        None, ge=1, description="Per API key (or for everyone when keys are off), for the whole application "
        "(one QuotaBank replica holds every key's buckets); 429 with Retry-After beyond. null: no limit."
    )
    tokens_per_minute: Optional[int] = Field(
        None, ge=1, description="Prompt (estimated) + requested completion tokens per minute, per key, for "
        "the whole application; 429 with Retry-After beyond. null: no limit."
    )
    max_keys: int = Field(100_000, ge=1, description="Keys whose buckets are kept (least recently seen go).")
    quota_timeout_s: float = Field(
        2.0, gt=0, description="How long a replica waits for the QuotaBank's answer; past it the request is "
        "admitted without a rate check and a warning logged (the bank is being restarted)."
    )

    @property
    def rate_limited(self) -> bool:
        return bool(self.requests_per_minute or self.tokens_per_minute)


class TenantsConfig(_Strict):
    """What an API key's tier and weight mean (server/fairness.py). The key file names them per key:
    `<key id>:<key> tier=<name> weight=<w> rpm=<n> tpm=<n>`, every attribute optional (router.api_keys)."""

    tiers: dict[str, int] = Field(
        default_factory=lambda: {"interactive": 0, "standard": 1, "batch": 2},
        description="Tier name -> priority (lower runs first; 0-99). With engine.scheduling_policy priority "
        "the engine runs a higher tier's waiting requests before a lower tier's, and preempts the lowest tier "
        "first. Tier names are the `tier` label of the per-tier metrics, so they stay few.")
    default_tier: str = Field("standard", description="The tier of keys that name none (and of every request "
                              "when keys are off).")
    fair_share: bool = Field(
        True, description="With API keys on: between keys, a replica's engine queue runs in weighted fair "
        "order (start-time fair queueing on the tokens each request asks for; needs scheduling_policy priority) "
        "and, once the replica holds max_ongoing_requests minus the reserve, only keys holding less than the "
        "heaviest key (in-flight requests per weight, lower tiers counted heavier) are admitted: a key that "
        "floods is refused (503) before a light one. Off: first come, first served, up to the bound.")
    reserve: float = Field(
        0.125, ge=0, lt=1, description="Fraction of scaling.max_ongoing_requests (at least one request) the "
        "heaviest key cannot take: what a light key finds free on a replica another key floods.")

    @model_validator(mode="after")
    def _default_is_a_tier(self) -> "TenantsConfig":
        if not self.tiers:
            raise ValueError("tiers must name at least one tier")
        bad = sorted(name for name, priority in self.tiers.items() if not 0 <= priority <= 99 or not name.strip())
        if bad:
            raise ValueError(f"tier {bad[0]!r}: priorities are 0-99 and names non-empty")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of tiers ({', '.join(self.tiers)})")
        return self


class RouterConfig(_Strict):
    """The front door: HAProxy, the ingress router it asks once per request, and the checks every replica
    runs before its engine (keys, sizes, rate, timeouts)."""

    haproxy: bool = Field(
        True, description="Serve through Ray's HAProxy data plane (tokens go replica -> HAProxy -> client). "
        "A property of the Ray cluster's environment: `mistral-ray run` and the Kubernetes overlays set it "
        "(`mistral-ray env FILE` prints it for `serve run`); off, Serve's Python proxy relays every token."
    )
    stream_guard: bool = Field(
        True, description="Streamed requests pass HAProxy's stream guard (mistral_ray/proxy): when the replica "
        "serving a stream dies mid-answer (its node lost), the client gets OpenAI's error event and [DONE] "
        "instead of a cut connection. Costs one more hop inside HAProxy per streamed request."
    )
    migration_limit: int = Field(
        2, ge=0, le=8, description="How often the stream guard continues one stream on another replica when the "
        "replica serving it is lost mid-answer (0: never; the client gets the error event). 2, not 1: a lost "
        "node takes all of its replicas at once, and a continuation sent before the routers learned it may "
        "land on another replica of that node; a third loss in a row is an outage, not a lost replica. "
        "Needs stream_guard; what cannot be continued exactly is listed in the README (Stream migration)."
    )
    haproxy_threads: int = Field(2, ge=1, description="HAProxy worker threads per node (Ray's default is 4).")
    retries: int = Field(
        1, ge=0, description="How often HAProxy sends a request again, to another replica, when the replica "
        "it picked refused the connection or closed it without answering (a lost replica)."
    )
    num_cpus: float = Field(0, ge=0, description="Ray CPUs reserved per ingress router replica (one per node).")
    route_timeout_s: int = Field(
        15, ge=1, description="How long HAProxy waits for the ingress router's pick (and for a client's body, when "
        "the policy needs it) before it answers 503 itself. A burst on a busy machine can delay the router by "
        "seconds (Ray's default, 5 s, was exceeded by an 800-request burst on 2 cores)."
    )
    deregister_s: float = Field(
        3, ge=0, description="A replica being stopped keeps answering this long before it closes its port, so "
        "every HAProxy has dropped it (HAProxy sends a refused connection elsewhere, so a few seconds do)."
    )
    request_timeout_s: float = Field(
        120, gt=0, description="Longest wait for a replica's answer (the whole answer when not streaming, the "
        "first token when streaming; also the wait for a replica at scale from zero) before 504."
    )
    ready_timeout_s: float = Field(5.0, gt=0, description="How long /ready waits on the engine.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    api_keys: ApiKeysConfig = Field(default_factory=ApiKeysConfig)
    tenants: TenantsConfig = Field(default_factory=TenantsConfig)


class ObservabilityConfig(_Strict):
    engine_metrics: bool = Field(
        True, description="Export vLLM's engine metrics (TTFT, KV usage, queue, ...) through Ray's metrics "
        "pipeline, tagged with the Serve replica id, so a scrape of each Ray node's metrics port sees them."
    )
    request_metrics: bool = Field(
        True, description="Record our request metrics (mistral_ray_* in the replicas and the ingress router)."
    )
    metrics_export_port: int = Field(
        8080, ge=1, le=65535, description="Ray's per-node Prometheus export port (KubeRay's default). Set where "
        "Ray starts: by `mistral-ray run`, and on Kubernetes by the overlay's generated ports patch (`mistral-ray "
        "k8s serve-config --write`). `serve run` starts Ray itself and cannot set it: start Ray first "
        "(`ray start --head --metrics-export-port N`), then `serve run`."
    )
    haproxy_metrics_port: int = Field(
        9101, ge=1, le=65535, description="HAProxy's own Prometheus exporter on each node (Ray's default port); "
        "through the cluster's environment everywhere, and the pods' `haproxy-metrics` port on Kubernetes."
    )
    metrics_report_interval_ms: int = Field(
        5000, ge=100, description="How often Ray processes push metrics to the node's exporter. Local only: "
        "`mistral-ray run` passes it to the Ray it starts; elsewhere Ray's own default applies (Ray's "
        "environment override of it, RAY_metrics_report_interval_ms, stops gauges from being exported: "
        "tests/integration/test_metrics.py fails with it)."
    )
    key_labels: int = Field(
        50, ge=0, description="How many API key ids the request counter labels by (`key_id`): the first this "
        "many of the key file (the same on every replica) keep their own series, the others share "
        "`key_id=\"other\"`; 0: no per-key series (`key_id=\"all\"`). Bounds the series a large key file makes."
    )


class ServiceConfig(_Strict):
    """One served model: what it is, how its engines run, how many replicas, how requests reach them."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    observability: ObservabilityConfig = Field(default_factory=ObservabilityConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceConfig":
        if self.engine.device == "cuda" and self.scaling.replica_gpus < self.engine.tensor_parallel_size:
            raise ValueError(
                "scaling.replica_gpus must be >= engine.tensor_parallel_size on device cuda "
                f"({self.scaling.replica_gpus} < {self.engine.tensor_parallel_size})"
            )
        if self.engine.device == "cpu" and self.scaling.replica_gpus:
            raise ValueError("scaling.replica_gpus must be 0 on device cpu")
        if self.engine.enable_auto_tool_choice and not self.engine.tool_call_parser:
            raise ValueError("engine.enable_auto_tool_choice needs engine.tool_call_parser")
        return self


class HttpOptions(BaseModel):
    """The part of Serve's `http_options` our CLI needs; the rest is Serve's to validate."""

    model_config = ConfigDict(extra="allow")
    host: str = "127.0.0.1"
    port: int = 8000


class DeploymentFile(BaseModel):
    """A Serve config file holding one mistral-ray application."""

    model_config = ConfigDict(frozen=True)
    path: Path
    raw: dict[str, Any]
    http: HttpOptions
    app_name: str
    route_prefix: str
    service: ServiceConfig
    live: AdaptersConfig = Field(default_factory=AdaptersConfig)  # the LLM deployment's user_config

    @property
    def base_url(self) -> str:
        return f"http://{self.http.host}:{self.http.port}{self.route_prefix.rstrip('/')}"


def _invalid(exc: ValidationError, where: str) -> ConfigError:
    """One line per offending field, named by its dotted path under `where`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        lines.append(f"  {where}.{loc}: {err['msg']}" if loc else f"  {where}: {err['msg']}")
    return ConfigError("invalid mistral-ray config:\n" + "\n".join(lines))


def parse_service(args: dict[str, Any] | None, where: str = "args") -> ServiceConfig:
    """Validate application args; errors name each offending field by its dotted path."""
    try:
        return ServiceConfig.model_validate(args or {})
    except ValidationError as exc:
        raise _invalid(exc, where) from None


def parse_adapters(user_config: dict[str, Any] | None, service: ServiceConfig,
                   where: str = "user_config") -> AdaptersConfig:
    """The LLM deployment's user_config, checked against the application it belongs to."""
    try:
        live = AdaptersConfig.model_validate(user_config or {})
    except ValidationError as exc:
        raise _invalid(exc, where) from None
    if live.adapters and service.engine.lora is None:
        raise ConfigError(f"invalid mistral-ray config:\n  {where}.adapters: adapters need engine.lora in the "
                          "application's args (the engine's LoRA slots)")
    restricted = sorted(name for name, a in live.adapters.items() if a.keys is not None)
    if restricted and not service.router.api_keys.enabled:
        raise ConfigError(f"invalid mistral-ray config:\n  {where}.adapters.{restricted[0]}.keys: allow-lists need "
                          "router.api_keys.enabled (without keys every caller is the same)")
    if service.model.name in live.adapters:
        raise ConfigError(f"invalid mistral-ray config:\n  {where}.adapters.{service.model.name}: the base "
                          "model's name cannot name an adapter")
    return live


def load_deployment(path: str | os.PathLike) -> DeploymentFile:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    apps = [a for a in raw.get("applications") or [] if a.get("import_path") == APP_IMPORT_PATH]
    if len(apps) != 1:
        raise ConfigError(f"{path}: expected one application with import_path {APP_IMPORT_PATH}")
    app = apps[0]
    idx = raw["applications"].index(app)
    where = f"{path}: applications[{idx}].args"
    service = parse_service(app.get("args"), where)
    deployments = app.get("deployments") or []
    llm = [i for i, d in enumerate(deployments) if isinstance(d, dict) and d.get("name") == LLM_DEPLOYMENT]
    live = parse_adapters(deployments[llm[0]].get("user_config"), service,
                          f"{path}: applications[{idx}].deployments[{llm[0]}].user_config") if llm else AdaptersConfig()
    return DeploymentFile(
        path=path,
        raw=raw,
        http=HttpOptions.model_validate(raw.get("http_options") or {}),
        app_name=app.get("name", "default"),
        route_prefix=app.get("route_prefix", "/"),
        service=service,
        live=live,
    )
