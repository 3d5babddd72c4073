"""The HTTP service (a real uvicorn server on 127.0.0.1) against the in-process retriever."""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time

import httpx
import pytest
import uvicorn
from retrieval_fixtures import ARTICLES

from retrieval.index import load_index
from retrieval.retriever import HttpRetriever, RetrieverUnavailable, web_search
from retrieval.service import ServiceConfig, make_app
from services.processes import free_port

QUERIES = [*ARTICLES, "what causes ocean waves after an earthquake?", "paper folding art from Japan"]
# Small limits, and batches of 2 queries, so that every limit and the chunking are reached by small requests.
TIGHT = ServiceConfig(max_body_bytes=4096, max_query_chars=50, max_queries=8, max_topk=6, max_passages=24,
                      max_response_bytes=3000, max_pending_queries=7, max_batch_queries=2, max_batch_passages=12,
                      max_batch_chars=100)


@pytest.fixture(scope="module")
def retriever(built_index):
    return load_index(built_index, "minilm-l6-v2", device="cpu")


@contextlib.contextmanager
def running(app):
    """Serve ``app`` on a free port of 127.0.0.1 in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server_url(retriever):
    with running(make_app(retriever)) as url:
        yield url


@pytest.fixture(scope="module")
def tight_url(retriever):
    with running(make_app(retriever, TIGHT)) as url:
        yield url


def same_hits(got: list[list], expected: list[list]) -> bool:
    """The same passages in the same order, with the same scores up to the embedder's precision: a query
    embedded in another batch (the service batches concurrent requests) goes through other kernels, and on a
    CPU with native bf16 the embedder runs in bf16 (8 bits of mantissa), where that moves a score by up to
    ~2e-4 (measured on a Sapphire Rapids Xeon; float32: ~1e-7)."""
    assert [[(p.id, p.title, p.text) for p in hits] for hits in got] == \
        [[(p.id, p.title, p.text) for p in hits] for hits in expected]
    assert [p.score for hits in got for p in hits] == pytest.approx([p.score for hits in expected for p in hits],
                                                                    abs=2e-3)
    return True


def metrics(url: str) -> dict[str, float]:
    """The server's /metrics samples: ``{'name{labels}': value}``."""
    text = httpx.get(f"{url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_http_and_in_process_return_the_same_ids_and_scores(retriever, server_url):
    local = retriever.search(QUERIES, k=4)
    remote = HttpRetriever(server_url).search(QUERIES, k=4)
    assert same_hits(remote, local)  # titles and texts survive the "Title"\ntext round trip too
    assert web_search(HttpRetriever(server_url), "Jazz") == web_search(retriever, "Jazz")


def test_one_search_with_a_topk_per_query_equals_a_search_per_topk(retriever, server_url):
    ks = [1 + i % 3 for i in range(len(QUERIES))]
    mixed = retriever.search(QUERIES, ks)
    assert [len(hits) for hits in mixed] == ks
    assert same_hits(mixed, [retriever.search([query], k)[0] for query, k in zip(QUERIES, ks)])
    assert same_hits(HttpRetriever(server_url).search(QUERIES, ks), mixed)  # the client: one request per k
    with pytest.raises(ValueError, match="3 values of k for 2 queries"):
        retriever.search(["a", "b"], [1, 2, 3])


def test_response_has_search_r1_shape(server_url):
    with_scores = httpx.post(
        f"{server_url}/retrieve", json={"queries": ["Chess"], "topk": 2, "return_scores": True}
    )
    assert with_scores.status_code == 200
    hits = with_scores.json()["result"]
    assert len(hits) == 1 and len(hits[0]) == 2
    assert set(hits[0][0]) == {"document", "score"}
    assert hits[0][0]["document"] == {"id": "doc4", "contents": f'"Chess"\n{ARTICLES["Chess"]}'}
    bare = httpx.post(f"{server_url}/retrieve", json={"queries": ["Chess", "Jazz"]}).json()["result"]
    assert [len(docs) for docs in bare] == [3, 3]  # Search-R1's default topk
    assert bare[0][0] == {"id": "doc4", "contents": f'"Chess"\n{ARTICLES["Chess"]}'}


def test_health_reports_the_index(server_url):
    body = HttpRetriever(server_url).health()
    assert body == {
        "status": "ok",
        "passages": 12,
        "embedder": "minilm-l6-v2",
        "dim": 384,
        "index_type": "Flat",
    }


@pytest.mark.parametrize("body, error", [
    (b"queries=x", "body: not valid JSON (Expecting value)"),
    (b'{"queries": "not a list"}', "body.queries: Input should be a valid list"),
    (b'{"queries": ["x", 7]}', "body.queries.1: Input should be a valid string"),
    (b'{"topk": 2}', "body.queries: Field required"),
    (b'{"queries": ["x"], "topk": 0}', "body.topk: Input should be greater than or equal to 1"),
    (b'[["x"]]', "body: Input should be a valid dictionary or object to extract fields from"),
])
def test_a_bad_request_body_is_a_422_naming_the_field_and_the_server_keeps_serving(server_url, body, error):
    response = httpx.post(f"{server_url}/retrieve", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == error
    assert response.json()["detail"]  # FastAPI's usual list is still there for generic clients
    assert HttpRetriever(server_url).health()["passages"] == 12
    assert [p.id for p in HttpRetriever(server_url).search(["Chess"], k=1)[0]] == ["doc4"]


def test_unreachable_server_is_a_clear_error():
    port = free_port()  # bound, then released: nothing listens there
    client = HttpRetriever(f"http://127.0.0.1:{port}", timeout_s=2, retries=1, retry_wait_s=0.01)
    with pytest.raises(RetrieverUnavailable, match=rf"cannot reach the retriever at http://127.0.0.1:{port}/retrieve "
                                                   r"after 2 attempt\(s\): ConnectError"):
        client.search(["x"], k=1)


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_max_body_bytes_is_413_before_it_is_parsed(tight_url, chunked):
    body = b"{not json at all" + b"x" * 5000  # malformed too: the size is checked first
    content = iter([body[:3000], body[3000:]]) if chunked else body
    before = metrics(tight_url)
    response = httpx.post(f"{tight_url}/retrieve", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413
    size = "received at least 5,016" if chunked else "declared 5,016"
    assert response.json() == {"error": f"body: {size} bytes, over max_body_bytes = 4,096",
                               "limit": "max_body_bytes", "value": 5016, "max": 4096}
    after = metrics(tight_url)
    assert after['retriever_rejected_total{limit="max_body_bytes"}'] == \
        before.get('retriever_rejected_total{limit="max_body_bytes"}', 0) + 1
    assert [p.id for p in HttpRetriever(tight_url).search(["Chess"], k=1)[0]] == ["doc4"]


@pytest.mark.parametrize("body, status, error", [
    ({"queries": ["Chess"] * 9}, 422, "body.queries: 9 queries, over max_queries = 8"),
    ({"queries": ["Chess", "x" * 51]}, 422, "body.queries.1: 51 characters, over max_query_chars = 50"),
    ({"queries": ["Chess"], "topk": 7}, 422, "body.topk: 7, over max_topk = 6"),
    ({"queries": ["Chess"] * 5, "topk": 5}, 422, "body: 5 queries × topk 5 = 25 passages, over max_passages = 24"),
    ({"queries": ["Chess"] * 8, "topk": 1}, 503,
     "busy: 8 queries waiting with this request's; retry later, over max_pending_queries = 7"),
])
def test_a_request_over_a_limit_is_refused_at_once_naming_the_limit_and_the_value(tight_url, body, status, error):
    response = httpx.post(f"{tight_url}/retrieve", json=body)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert response.json()["limit"] in error
    assert (response.headers.get("retry-after") == "1") == (status == 503)


def test_a_response_over_max_response_bytes_stops_the_search(tight_url):
    before = metrics(tight_url)
    queries = ["Chess", "Jazz", "Volcano", "Bicycle", "Origami", "Tsunami", "Penicillin"]  # ~3,600 bytes of hits
    response = httpx.post(f"{tight_url}/retrieve", json={"queries": queries, "topk": 3})
    assert response.status_code == 422
    match = re.fullmatch(r"response: [\d,]+ bytes after (\d) of 7 queries, over max_response_bytes = 3,000",
                         response.json()["error"])
    assert match, response.json()["error"]
    # Batches of 2 queries: the batch that went over was the last one searched.
    searched = metrics(tight_url)["retriever_queries_total"] - before["retriever_queries_total"]
    assert searched == min(7, 2 * ((int(match[1]) + 1) // 2)) < 7


def test_a_request_searched_in_chunks_gets_the_in_process_results(retriever, tight_url):
    before = metrics(tight_url)
    queries = QUERIES[:5]
    remote = HttpRetriever(tight_url).search(queries, k=2)
    assert same_hits(remote, retriever.search(queries, k=2))
    after = metrics(tight_url)
    assert after["retriever_batch_queries_count"] - before["retriever_batch_queries_count"] == 3  # 2 + 2 + 1


def test_concurrent_requests_share_batches_and_metrics_count_them(retriever, server_url):
    expected = {query: [p.id for p in hits] for query, hits in zip(QUERIES, retriever.search(QUERIES, k=2))}
    before = metrics(server_url)

    async def one(client, query):
        response = await client.post(f"{server_url}/retrieve", json={"queries": [query], "topk": 2})
        return query, [doc["id"] for doc in response.json()["result"][0]]

    async def all_at_once():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(one(client, QUERIES[i % len(QUERIES)]) for i in range(40)))

    answers = asyncio.run(all_at_once())
    assert all(ids == expected[query] for query, ids in answers)
    after = metrics(server_url)
    delta = {name: after[name] - before.get(name, 0) for name in after}
    assert delta['retriever_requests_total{path="/retrieve",code="200"}'] == 40
    assert delta["retriever_queries_total"] == 40 and delta["retriever_batch_queries_sum"] == 40
    assert delta["retriever_search_calls_total"] == delta["retriever_batch_queries_count"] < 40  # batched
    assert delta["retriever_request_seconds_count"] == 40 and delta["retriever_pending_queries"] == 0
    assert after['retriever_requests_total{path="/metrics",code="200"}'] >= 1


def test_limits_that_cannot_hold_one_query_in_a_batch_are_refused():
    with pytest.raises(ValueError, match=r"max_batch_passages \(100\) must be ≥ max_topk \(1000\)"):
        ServiceConfig(max_batch_passages=100)
