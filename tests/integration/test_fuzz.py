"""Fuzzing the HTTP API with hypothesis: >= 1,000 malformed or hostile requests against the real app.

Every generated request is invalid by construction (broken bytes, wrong JSON shape, a wrong type or an
out-of-range value in a field the API defines, deep nesting, oversized bodies, odd headers), so every answer
must be a 4xx with an OpenAI error body — never a 5xx, never a generation — and the server then still
answers a normal request.
"""

import json
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration

EXAMPLES = 1100
ROUTES = ["/v1/chat/completions", "/v1/completions"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**40, max_value=10**40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                           max_leaves=12)

letters = st.text(alphabet="abcdeghjkmpqrsuvwxz", min_size=1, max_size=8)  # never parses as a number/bool
non_integral = st.floats(allow_nan=True, allow_infinity=True).filter(lambda f: not float(f).is_integer())

# Per field, values that are always invalid there (pydantic's lax mode accepts "5" or 2.0 for an int and
# "yes" for a bool, so those are left out). Each generated object carries at least one of them.
COMMON = {
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(min_value=10**6, max_value=10**40), letters,
                            non_integral, st.just([1]), st.just({})),
    "n": st.one_of(st.integers(max_value=0), st.integers(min_value=9, max_value=10**30), letters, non_integral),
    "temperature": st.one_of(st.floats(max_value=-0.01), letters, st.just({}), st.just([0.5])),
    "top_p": st.one_of(st.floats(min_value=1.01), st.floats(max_value=-0.01), letters, st.just([])),
    "stop": st.one_of(st.integers(), st.just({}), st.lists(st.integers(), min_size=1, max_size=3)),
    "stream": st.one_of(letters, st.integers(min_value=2), st.just({}), st.just([])),
    "model": st.text(min_size=1, max_size=20).filter(lambda m: m != "tiny-mistral"),
    "seed": st.one_of(letters, non_integral, st.just({})),
}
WRONG = {
    "/v1/chat/completions": {**COMMON, "logprobs": st.one_of(st.just({}), st.integers(min_value=2)),
                             "messages": st.one_of(scalars, st.lists(st.one_of(scalars, st.just({})), min_size=1,
                                                                     max_size=3),
                                                   st.just([{"role": "wizard", "content": "hi"}]),
                                                   st.just([{"content": "no role"}]))},
    "/v1/completions": {**COMMON, "logprobs": st.one_of(st.just({}), st.integers(min_value=10**6), letters),
                        "prompt": st.one_of(st.none(), st.booleans(), non_integral, st.just({}),
                                            st.just([{"a": 1}]))},
}


@st.composite
def invalid_request(draw):
    route = draw(st.sampled_from(ROUTES))
    wrong = WRONG[route]
    fields = draw(st.lists(st.sampled_from(sorted(wrong)), min_size=1, max_size=3, unique=True))
    body = {"model": "tiny-mistral", "max_tokens": 2}
    body.update({"messages": [{"role": "user", "content": "x"}]} if "chat" in route else {"prompt": "x"})
    for _ in range(draw(st.integers(0, 2))):  # unknown junk beside
        body[draw(st.text(min_size=1, max_size=10))] = draw(json_values)
    body.update({f: draw(wrong[f]) for f in fields})
    return route, json.dumps(body, allow_nan=True).encode()


def nested(depth: int) -> bytes:
    return b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}"


any_route = st.sampled_from(ROUTES)
requests = st.one_of(
    st.tuples(any_route, st.binary(max_size=300).filter(lambda b: not b.strip().startswith(b"{"))),  # not JSON
    st.tuples(any_route, st.binary(min_size=1, max_size=60).map(lambda b: b'{"prompt": "' + b + b'\xff\xfe"}')),
    st.tuples(any_route, json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode())),
    invalid_request(),
    invalid_request(),
    st.tuples(any_route, st.integers(1000, 200_000).map(nested)),  # deep nesting
    st.tuples(any_route, st.integers(2 * 1024 * 1024 + 1, 3 * 1024 * 1024).map(
        lambda n: b'{"prompt": "' + b"a" * n + b'"}')),  # beyond router.limits.max_body_bytes
)
header_sets = st.one_of(
    st.just({"content-type": "application/json"}),
    st.sampled_from(["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                     "application/json; charset=latin-1"]).map(lambda c: {"content-type": c}),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40).map(
        lambda v: {"authorization": v, "x-session-id": v}),
)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def test_hostile_requests_get_4xx_with_openai_errors_and_the_server_still_serves(http, model_name):
    seen = Counter()  # this test's own count: it passes alone and in any order

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(request=requests, headers=header_sets)
    def hostile(request, headers):
        route, body = request
        r = http.post(route, content=body, headers=headers)
        seen[r.status_code] += 1
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300], body[:200])
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"]

    hostile()
    print(f"\nfuzz: {sum(seen.values())} hostile requests, statuses {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= 1000
    r = http.post("/v1/chat/completions", json={"model": model_name, "max_tokens": 3,
                                                "messages": [{"role": "user", "content": "still there?"}]})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
