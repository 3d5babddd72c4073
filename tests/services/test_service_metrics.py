"""The Prometheus text the services expose on /metrics."""

import pytest

from services.metrics import Counter, Gauge, Histogram, exposition


def test_counters_gauges_and_histograms_render_in_the_text_format():
    requests = Counter("x_requests_total", "requests answered", ("path", "code"))
    requests.inc(path="/a", code="200")
    requests.inc(2, path="/a", code="200")
    requests.inc(path="/a", code="413")
    queries = Counter("x_queries_total", "queries")
    pending = Gauge("x_pending", "waiting")
    pending.set(2.5)
    sizes = Histogram("x_batch", "batch sizes", (1, 4))
    for size in (1, 3, 3, 9):
        sizes.observe(size)
    assert exposition([requests, queries, pending, sizes]) == (
        "# HELP x_requests_total requests answered\n# TYPE x_requests_total counter\n"
        'x_requests_total{path="/a",code="200"} 3\nx_requests_total{path="/a",code="413"} 1\n'
        "# HELP x_queries_total queries\n# TYPE x_queries_total counter\nx_queries_total 0\n"
        "# HELP x_pending waiting\n# TYPE x_pending gauge\nx_pending 2.5\n"
        "# HELP x_batch batch sizes\n# TYPE x_batch histogram\n"
        'x_batch_bucket{le="1"} 1\nx_batch_bucket{le="4"} 3\nx_batch_bucket{le="+Inf"} 4\n'
        "x_batch_sum 16\nx_batch_count 4\n"
    )
    assert requests.value(path="/a", code="200") == 3 and sizes.count == 4


def test_a_counter_refuses_labels_it_was_not_declared_with():
    with pytest.raises(ValueError, match=r"x_total takes labels \('code',\), got \('status',\)"):
        Counter("x_total", "x", ("code",)).inc(status="200")
