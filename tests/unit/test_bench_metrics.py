"""`k2serve bench` aggregation on hand-made records, with the expected numbers worked out."""

from __future__ import annotations

import random

import numpy as np
import pytest

from k2serve.bench.metrics import RequestRecord, aggregate, format_table, percentile


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 90) == pytest.approx(3.7)  # order of input is irrelevant
    assert percentile([7.0], 99) == 7.0
    assert percentile([10, 20], 0) == 10 and percentile([10, 20], 100) == 20
    with pytest.raises(ValueError):
        percentile([], 50)


def test_percentile_agrees_with_numpy():
    rng = random.Random(3)
    for size in (1, 2, 5, 17, 100):
        values = [rng.uniform(0, 1000) for _ in range(size)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def _records():
    return [
        RequestRecord(success=True, prompt_tokens=10, output_tokens=5, ttft=0.1,
                      itl=[0.05, 0.05, 0.05, 0.05], latency=0.3),
        RequestRecord(success=True, prompt_tokens=20, output_tokens=3, ttft=0.2,
                      itl=[0.1, 0.3], latency=0.6),
        RequestRecord(success=True, prompt_tokens=30, output_tokens=1, ttft=0.3, latency=0.3),
        RequestRecord(success=False, prompt_tokens=99, error="HTTP 500: boom"),
    ]


def test_tpot_needs_two_output_tokens():
    first, second, single, _ = _records()
    assert first.tpot == pytest.approx((0.3 - 0.1) / 4)
    assert second.tpot == pytest.approx((0.6 - 0.2) / 2)
    assert single.tpot is None


def test_aggregate_counts_and_throughput():
    m = aggregate(_records(), duration_s=2.0)
    assert (m["completed"], m["failed"]) == (3, 1)
    assert m["duration_s"] == 2.0
    # The failed request's tokens are not counted.
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (60, 9)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(34.5)
    assert m["errors"] == {"HTTP 500: boom": 1}


@pytest.mark.parametrize("name, expected", [
    # TTFT ms [100, 200, 300]
    ("ttft", (200.0, 200.0, 280.0, 298.0)),
    # TPOT ms [50, 200]; the one-token request has none
    ("tpot", (125.0, 125.0, 185.0, 198.5)),
    # ITL ms pooled over requests: [50, 50, 50, 50, 100, 300]
    ("itl", (100.0, 50.0, 200.0, 290.0)),
    # E2E ms [300, 300, 600]
    ("e2el", (400.0, 300.0, 540.0, 594.0)),
])
def test_aggregate_latency_statistics(name, expected):
    m = aggregate(_records(), duration_s=2.0)
    got = tuple(m[f"{stat}_{name}_ms"] for stat in ("mean", "median", "p90", "p99"))
    assert got == pytest.approx(expected)


def test_aggregate_with_no_successes_has_no_latencies():
    m = aggregate([RequestRecord(success=False, error="x")] * 2, duration_s=0.0)
    assert (m["completed"], m["failed"]) == (0, 2)
    assert m["request_throughput"] == 0.0 and m["output_throughput"] == 0.0
    assert m["mean_ttft_ms"] is None and m["p99_e2el_ms"] is None
    assert m["errors"] == {"x": 2}
    assert "Mean TTFT (ms):                          -" in format_table(m)


def test_table_layout():
    m = aggregate(_records(), duration_s=2.0)
    m.update(max_concurrency=2, request_rate="inf")
    table = format_table(m).splitlines()
    assert table[0] == "============ Serving Benchmark Result ============"
    assert table[-2] == "=" * 50
    assert table[-1] == "error x1: HTTP 500: boom"
    assert "Successful requests:                     3" in table
    assert "Failed requests:                         1" in table
    assert "Maximum request concurrency:             2" in table
    assert "Request rate (req/s):                    inf" in table
    assert "Output token throughput (tok/s):         4.50" in table
    assert "P90 TTFT (ms):                           280.00" in table
    assert "Median ITL (ms):                         50.00" in table
    assert "P99 E2EL (ms):                           594.00" in table
    assert "-----Time per Output Token (excl. 1st token)------" in table
