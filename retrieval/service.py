"""HTTP retrieval service compatible with Search-R1's ``retrieval_server.py``.

Endpoints:
- ``POST /retrieve`` ``{"queries": [...], "topk": k, "return_scores": bool}`` →
  ``{"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}``; without ``return_scores`` each
  inner list holds the documents themselves (Search-R1's shape). ``topk`` defaults to 3.
- ``GET /health`` → ``{"status": "ok", "passages": N, "embedder": ..., "dim": ...}``.

A malformed request body (not JSON, ``queries`` missing or not a list of strings, ``topk`` out of range)
is answered 422 with ``{"error": "<field>: <problem>", "detail": [...]}``: one line naming the culprit,
plus FastAPI's usual list; the server keeps serving.

Run with ``distillery retriever serve --index ID --port P`` or ``serve(load_index(...), port=8000)``;
``retrieval.retriever.HttpRetriever`` is its client.
"""

from __future__ import annotations

import threading

from pydantic import BaseModel, ConfigDict, Field

from retrieval.retriever import Passage, Retriever, SearchBackend

DEFAULT_TOPK = 3
# A single request may not ask for more than this (protects the server from accidental huge batches).
MAX_QUERIES = 4096
MAX_TOPK = 1000


class RetrieveRequest(BaseModel):
    """Search-R1's request body."""

    model_config = ConfigDict(extra="ignore")

    queries: list[str] = Field(..., max_length=MAX_QUERIES, description="queries to search")
    topk: int | None = Field(None, ge=1, le=MAX_TOPK, description="passages per query (default 3)")
    return_scores: bool = Field(False, description="wrap each document as {document, score}")


def make_app(retriever: SearchBackend, info: dict | None = None):
    """An ASGI (FastAPI) app serving ``retriever``; ``info`` (default: an in-process index's size and
    embedder) is added to the health response."""
    from fastapi import FastAPI
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    if info is None and isinstance(retriever, Retriever):
        meta = retriever.meta
        info = {
            "passages": len(retriever.passages),
            "embedder": meta["embedder"],
            "dim": meta["dim"],
            "index_type": meta["index_type"],
        }

    app = FastAPI(title="distillery retriever", version="1")
    # FastAPI runs sync endpoints in a thread pool; one search at a time keeps the embedder and the
    # passage cache single-threaded, and each search is already batched.
    lock = threading.Lock()

    @app.exception_handler(RequestValidationError)
    def bad_request(request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors())
        return JSONResponse({"error": request_error(errors), "detail": errors}, status_code=422)

    @app.post("/retrieve")
    def retrieve(request: RetrieveRequest) -> dict:
        with lock:
            results = retriever.search(request.queries, request.topk or DEFAULT_TOPK)
        return {"result": [[_hit(p, request.return_scores) for p in passages] for passages in results]}

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", **(info or {})}

    return app


def serve(
    retriever: SearchBackend, host: str = "127.0.0.1", port: int = 8000, info: dict | None = None
) -> None:
    """Serve ``retriever`` over HTTP until interrupted (blocks)."""
    import uvicorn

    uvicorn.run(make_app(retriever, info), host=host, port=port, log_level="info")


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
