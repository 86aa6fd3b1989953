"""`mistral-ray bench` against the real app: a small bounded run gives sane, complete numbers."""

import pytest

from mistral_ray import bench

pytestmark = pytest.mark.integration


def test_bench_small_run(base_url, model_name):
    results = bench.run(base_url, model_name, [1, 2], requests=4, input_len=16, output_len=8,
                        vocab=900, seed=0, target="test", warmup=1)
    assert [r.concurrency for r in results] == [1, 2]
    for r in results:
        assert r.errors == 0 and r.requests == 4
        assert r.out_tok_per_s == pytest.approx(8 * r.req_per_s, rel=0.01)  # ignore_eos: 8 tokens each
        assert 0 < r.ttft_ms_p50 <= r.ttft_ms_p99 and r.itl_ms_p50 > 0
    assert "test" in bench.table(results)
