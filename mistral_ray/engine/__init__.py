"""The engine layer: the only package that imports vllm (or torch).

Import `mistral_ray.engine.vllm_engine` lazily, from inside an LLM replica, so that the router and the
CLI start without paying for vllm's imports.
"""
