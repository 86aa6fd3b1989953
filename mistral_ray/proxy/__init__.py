"""What we add to Ray's HTTP proxy (HAProxy): the stream guard and OpenAI-shaped error files."""

# Set to "0" in the Ray cluster's environment when `router.stream_guard` is off (read by proxy/haproxy.py).
GUARD_ENV = "MISTRAL_RAY_STREAM_GUARD"
