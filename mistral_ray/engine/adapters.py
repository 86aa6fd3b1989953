"""The LoRA adapters one engine serves, changed in place while it runs.

vLLM's OpenAI app resolves a request's `model` to an adapter through `OpenAIServingModels.lora_requests`
(what `/v1/models` lists, with each adapter's parent). Registering an adapter checks it as vLLM's loader
will (PEFT config, rank within `max_lora_rank`, no bias), then has the engine load it once (`add_lora`, as
vLLM's own `/v1/load_lora_adapter` does): weights that do not fit the model fail there, as an error of that
call, and not in the first request's engine step, where vLLM treats a failed load as fatal to the engine.
Only then is it added to the table. The engine keeps `max_cpu_loras` adapters in memory and `max_loras` in
a batch, least recently used out, and reads an evicted one again when a request needs it. Removing one takes
it out of the table: requests already running keep their reference and finish; the engine's LRU frees it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.lora.utils import get_adapter_absolute_path

logger = logging.getLogger("ray.serve")


class AdapterError(ValueError):
    """An adapter the engine cannot serve (missing, not PEFT LoRA, rank too high); names it."""


class Adapters:
    def __init__(self, llm: Any, models: Any, base: str):
        self.llm, self.models, self.base = llm, models, base
        self.lora_config = llm.vllm_config.lora_config
        self.sources: dict[str, str] = {}  # name -> source as configured (a hub id resolves to another path)

    def names(self) -> set[str]:
        return set(self.models.lora_requests)

    def _check(self, name: str, source: str) -> str:
        """The adapter's local directory, its config checked as vLLM's loader checks it (a hub id is
        downloaded here, not by the first request)."""
        try:
            path = get_adapter_absolute_path(source)
            if not (Path(path) / "adapter_config.json").is_file():
                raise AdapterError(f"adapter {name!r}: no adapter_config.json in {path}")
            helper = PEFTHelper.from_local_dir(path, self.llm.model_config.max_model_len)
            helper.validate_legal(self.lora_config)
        except AdapterError:
            raise
        except Exception as exc:
            raise AdapterError(f"adapter {name!r} ({source}): {type(exc).__name__}: {exc}") from None
        return path

    def _request(self, name: str, lora_id: int, path: str) -> LoRARequest:
        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path, base_model_name=self.base)

    async def apply(self, wanted: dict[str, str]) -> dict[str, Any]:
        """Serve `wanted` (name -> source) from now on. An adapter that fails its check is not served (an
        adapter it replaces stays as it was) and is named in `failed`: a bad path in a deploy must not take
        the replica, and every other adapter, down with it."""
        if wanted and self.lora_config is None:
            raise AdapterError("adapters need an engine started with LoRA (engine.lora)")
        current = self.models.lora_requests
        changed = {name: src for name, src in wanted.items() if name not in current or self.sources.get(name) != src}
        paths, failed, ids = {}, {}, {}
        for name, source in changed.items():
            try:
                paths[name] = await asyncio.to_thread(self._check, name, source)
                # a new id for a new or moved adapter: the engine's cache (and its KV block hashes) tell them apart
                ids[name] = self.models.lora_id_counter.inc(1)
                await self.llm.add_lora(self._request(name, ids[name], paths[name]))
            except Exception as exc:  # AdapterError, or the engine's load of the weights failed
                paths.pop(name, None)
                failed[name] = str(exc) if isinstance(exc, AdapterError) else \
                    f"adapter {name!r} ({source}): the engine cannot load it: {type(exc).__name__}: {exc}"
                logger.error("adapters: %s", failed[name])
        removed = sorted(set(current) - set(wanted))
        for name in removed:
            del current[name]
            self.sources.pop(name, None)
        for name, path in paths.items():
            current[name] = self._request(name, ids[name], path)
            self.sources[name] = changed[name]
        if paths or removed:
            logger.info("adapters: added or changed %s, removed %s", sorted(paths), removed)
        return {"added": sorted(paths), "removed": removed, "failed": failed, "served": sorted(current)}
