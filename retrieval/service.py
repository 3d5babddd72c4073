"""HTTP retrieval service compatible with Search-R1's ``retrieval_server.py``, with bounded work per request.

Endpoints:
- ``POST /retrieve`` ``{"queries": [...], "topk": k, "return_scores": bool}`` →
  ``{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}``; without ``return_scores`` each
  inner list holds the documents themselves (Search-R1's shape). ``topk`` defaults to 3.
- ``GET /health`` → ``{"status": "ok", "passages": N, "embedder": ..., "dim": ...}``.
- ``GET /metrics`` → counters in the Prometheus text format: requests by path and status, rejections by
  limit, queries, batches and their sizes, search and request seconds.

Limits (``ServiceConfig``, section ``retriever_service`` of a profile), each answered at once with
``{"error": "<one line naming the limit and the value>", "limit": name, "value": v, "max": m}``:
a body over ``max_body_bytes`` is 413 before it is parsed; more than ``max_queries`` queries, a query over
``max_query_chars`` characters, ``topk`` over ``max_topk``, or queries × topk over ``max_passages`` is 422;
a response that grows past ``max_response_bytes`` is 422 as soon as it does (the rest is not searched);
when ``max_pending_queries`` are already waiting, 503 with ``Retry-After`` (clients retry). A malformed
body (not JSON, ``queries`` missing or not a list of strings, ``topk`` < 1) is 422 with
``{"error": "<field>: <problem>", "detail": [...]}``: one line naming the culprit plus FastAPI's usual list.

Requests are searched by ``retrieval.batching.MicroBatcher``: concurrent requests share batches (one
embedding call each), and a large request is searched a batch at a time, taking turns with the others.

Run with ``distillery retriever serve --index ID --port P`` or ``serve(load_index(...), port=8000)``;
``retrieval.retriever.HttpRetriever`` is its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrieval.batching import BatchLimits, MicroBatcher, SearchJob
from retrieval.retriever import Passage, Retriever, SearchBackend
from services.asgi import BodySizeLimit, CountResponses
from services.metrics import CONTENT_TYPE, Counter, Histogram, exposition

DEFAULT_TOPK = 3
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServiceConfig(BaseModel):
    """Limits and batching of the retrieval service. A one-query request waits for about two batches beside
    the largest request allowed (the batch in progress, then its own), so batches are kept small: 64 short
    queries, 4 of the longest or 8,192 passages (about 0.1–0.2 s each with MiniLM on 2 idle CPU cores).
    Smaller batches cost throughput: each embedding call has a fixed cost (measured: 7 calls of 32 queries
    took 1.3x the CPU time of one call of 200), which grows when other processes share the cores."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(1 << 20, ge=1, description="request bodies over this are answered 413, unparsed")
    max_query_chars: int = Field(2048, ge=1, description="longest query in characters (MiniLM reads ~1,000)")
    max_queries: int = Field(1024, ge=1, description="queries per request")
    max_topk: int = Field(1000, ge=1, description="largest topk")
    max_passages: int = Field(16_384, ge=1, description="queries × topk of one request: the passages it may ask for")
    max_response_bytes: int = Field(16 << 20, ge=1, description="largest response body in bytes")
    max_pending_queries: int = Field(16_384, ge=1, description="queries waiting beyond which requests get 503")
    batch_wait_ms: float = Field(2.0, ge=0, description="how long a batch waits for more requests to join it")
    max_batch_queries: int = Field(64, ge=1, description="queries embedded in one batch")
    max_batch_passages: int = Field(8192, ge=1, description="queries × topk searched in one batch")
    max_batch_chars: int = Field(8192, ge=1, description="query characters embedded in one batch")

    @model_validator(mode="after")
    def _one_query_fits_a_batch(self) -> ServiceConfig:
        if self.max_batch_passages < self.max_topk:
            raise ValueError(f"max_batch_passages ({self.max_batch_passages}) must be ≥ max_topk ({self.max_topk})")
        if self.max_batch_chars < self.max_query_chars:
            raise ValueError(f"max_batch_chars ({self.max_batch_chars}) must be ≥ max_query_chars "
                             f"({self.max_query_chars})")
        return self

    def batch_limits(self) -> BatchLimits:
        return BatchLimits(max_queries=self.max_batch_queries, max_passages=self.max_batch_passages,
                           max_chars=self.max_batch_chars, wait_s=self.batch_wait_ms / 1000)


class RetrieveRequest(BaseModel):
    """Search-R1's request body (its sizes are checked against ``ServiceConfig`` after parsing)."""

    model_config = ConfigDict(extra="ignore")

    queries: list[str] = Field(..., description="queries to search")
    topk: int | None = Field(None, ge=1, description="passages per query (default 3)")
    return_scores: bool = Field(False, description="wrap each document as {document, score}")


class LimitExceeded(Exception):
    """A request over one of the service's limits; ``what`` says what was over, with the value."""

    def __init__(self, limit: str, value: int, maximum: int, what: str):
        super().__init__(f"{what}, over {limit} = {maximum:,}")
        self.limit, self.value, self.maximum = limit, value, maximum

    def body(self) -> dict:
        return {"error": str(self), "limit": self.limit, "value": self.value, "max": self.maximum}


def check_limits(request: RetrieveRequest, topk: int, cfg: ServiceConfig) -> None:
    """Raise LimitExceeded for the first limit ``request`` is over."""
    queries = request.queries
    if len(queries) > cfg.max_queries:
        raise LimitExceeded("max_queries", len(queries), cfg.max_queries, f"body.queries: {len(queries):,} queries")
    for i, query in enumerate(queries):
        if len(query) > cfg.max_query_chars:
            raise LimitExceeded("max_query_chars", len(query), cfg.max_query_chars,
                                f"body.queries.{i}: {len(query):,} characters")
    if topk > cfg.max_topk:
        raise LimitExceeded("max_topk", topk, cfg.max_topk, f"body.topk: {topk:,}")
    passages = len(queries) * topk
    if passages > cfg.max_passages:
        raise LimitExceeded("max_passages", passages, cfg.max_passages,
                            f"body: {len(queries):,} queries × topk {topk:,} = {passages:,} passages")


class ResponseWriter:
    """Renders each query's hits to JSON as its chunk is searched, and stops past ``max_bytes``."""

    def __init__(self, count: int, with_scores: bool, max_bytes: int):
        self.parts: list[bytes] = [b"[]"] * count
        self.with_scores = with_scores
        self.max_bytes = max_bytes
        self.size = len(b'{"result":[]}') + max(count - 1, 0)  # the envelope and the commas

    def add(self, start: int, results: list[list[Passage]]) -> None:
        """Render the hits of queries ``start, start + 1, ...`` (called by the batcher)."""
        for i, passages in enumerate(results, start):
            part = _dumps([_hit(p, self.with_scores) for p in passages])
            self.size += len(part) - len(self.parts[i])
            self.parts[i] = part
            if self.size > self.max_bytes:
                raise LimitExceeded("max_response_bytes", self.size, self.max_bytes,
                                    f"response: {self.size:,} bytes after {i + 1:,} of {len(self.parts):,} queries")

    def body(self) -> bytes:
        return b'{"result":[' + b",".join(self.parts) + b"]}"


def make_app(retriever: SearchBackend, cfg: ServiceConfig | None = None, info: dict | None = None):
    """An ASGI (FastAPI) app serving ``retriever`` within ``cfg``'s limits; ``info`` (default: an
    in-process index's size and embedder) is added to the health response."""
    from fastapi import FastAPI
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    cfg = cfg or ServiceConfig()
    if info is None and isinstance(retriever, Retriever):
        meta = retriever.meta
        info = {
            "passages": len(retriever.passages),
            "embedder": meta["embedder"],
            "dim": meta["dim"],
            "index_type": meta["index_type"],
        }
    batcher = MicroBatcher(retriever, cfg.batch_limits())
    requests = Counter("retriever_requests_total", "requests answered, by path and status", ("path", "code"))
    rejected = Counter("retriever_rejected_total", "requests refused, by the limit they were over", ("limit",))
    latency = Histogram("retriever_request_seconds", "seconds to answer a successful /retrieve", LATENCY_BUCKETS)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(batcher.close)

    app = FastAPI(title="distillery retriever", version="1", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=cfg.max_body_bytes,
                       on_reject=lambda: rejected.inc(limit="max_body_bytes"))
    app.add_middleware(CountResponses, counter=requests, paths=("/retrieve", "/health", "/metrics"))

    def refuse(exc: LimitExceeded, status: int = 422, headers: dict | None = None) -> JSONResponse:
        rejected.inc(limit=exc.limit)
        return JSONResponse(exc.body(), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    def bad_request(request, exc: RequestValidationError) -> JSONResponse:
        rejected.inc(limit="malformed")
        errors = jsonable_encoder(exc.errors())
        return JSONResponse({"error": request_error(errors), "detail": errors}, status_code=422)

    @app.post("/retrieve")
    async def retrieve(request: RetrieveRequest) -> Response:
        started = time.perf_counter()
        topk = request.topk or DEFAULT_TOPK
        try:
            check_limits(request, topk, cfg)
        except LimitExceeded as exc:
            return refuse(exc)
        pending = batcher.pending_queries()
        if pending + len(request.queries) > cfg.max_pending_queries:
            waiting = pending + len(request.queries)
            busy = LimitExceeded("max_pending_queries", waiting, cfg.max_pending_queries,
                                 f"busy: {waiting:,} queries waiting with this request's; retry later")
            return refuse(busy, 503, {"Retry-After": "1"})
        writer = ResponseWriter(len(request.queries), request.return_scores, cfg.max_response_bytes)
        if request.queries:
            try:
                await asyncio.wrap_future(batcher.submit(SearchJob(request.queries, topk, writer.add)))
            except LimitExceeded as exc:
                return refuse(exc)
        latency.observe(time.perf_counter() - started)
        return Response(writer.body(), media_type="application/json")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **(info or {})}

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(exposition([requests, rejected, latency, *batcher.metrics()]), media_type=CONTENT_TYPE)

    return app


def serve(retriever: SearchBackend, host: str = "127.0.0.1", port: int = 8000,
          cfg: ServiceConfig | None = None, info: dict | None = None) -> None:
    """Serve ``retriever`` over HTTP until interrupted (blocks)."""
    import uvicorn

    uvicorn.run(make_app(retriever, cfg, info), host=host, port=port, log_level="info")


def request_error(errors: list[dict]) -> str:
    """One line for a rejected request: the first problem's location and message, e.g.
    ``body.queries.0: Input should be a valid string``."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"body: not valid JSON ({first['ctx']['error']})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{'.'.join(str(part) for part in first['loc'])}: {first['msg']}{more}"


def _hit(passage: Passage, with_score: bool) -> dict:
    document = {"id": passage.id, "contents": passage.contents}
    return {"document": document, "score": passage.score} if with_score else document


def _dumps(value: object) -> bytes:
    """JSON as FastAPI's JSONResponse writes it."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
