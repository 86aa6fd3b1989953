"""The ingress layer: OpenAI routes, validation of what can be checked without the model, SSE relay.

Never imports vllm or torch: it must start in a second and stay cheap per request.
"""
