"""The HTTP service (a real uvicorn server on 127.0.0.1) against the in-process retriever."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import uvicorn
from retrieval_fixtures import ARTICLES

from retrieval.index import load_index
from retrieval.retriever import HttpRetriever, RetrieverUnavailable, web_search
from retrieval.service import make_app
from services.processes import free_port

QUERIES = [*ARTICLES, "what causes ocean waves after an earthquake?", "paper folding art from Japan"]


@pytest.fixture(scope="module")
def retriever(built_index):
    return load_index(built_index, "minilm-l6-v2", device="cpu")


@pytest.fixture(scope="module")
def server_url(retriever):
    server = uvicorn.Server(
        uvicorn.Config(make_app(retriever), host="127.0.0.1", port=0, log_level="warning")
    )
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


def test_http_and_in_process_return_the_same_ids_and_scores(retriever, server_url):
    local = retriever.search(QUERIES, k=4)
    remote = HttpRetriever(server_url).search(QUERIES, k=4)
    assert [[p.id for p in hits] for hits in remote] == [[p.id for p in hits] for hits in local]
    assert [[p.score for p in hits] for hits in remote] == [[p.score for p in hits] for hits in local]
    assert remote == local  # titles and texts survive the "Title"\ntext round trip too
    assert web_search(HttpRetriever(server_url), "Jazz") == web_search(retriever, "Jazz")


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
