"""What we add to Ray's HTTP proxy (HAProxy): the stream guard and OpenAI-shaped error files."""

# In the Ray cluster's environment (read by proxy/haproxy.py): the largest request body the stream guard
# holds (`router.limits.max_body_bytes`), or "0" when `router.stream_guard` is off.
GUARD_ENV = "MISTRAL_RAY_STREAM_GUARD"
# In the Ray cluster's environment: `router.migration_limit`, the continuations the stream guard tries per stream.
MIGRATION_ENV = "MISTRAL_RAY_MIGRATION_LIMIT"
