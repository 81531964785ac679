"""The HTTP application: typed requests and responses, one-line JSON errors, the model loaded once.

Endpoints (the OpenAPI description is at ``/openapi.json``, the interactive page at ``/docs``):

- ``GET /health``: ``{"status": "ok", "model": ..., "kind": "lm" | "cllm4rec", "items": N, ...}``;
  answers while a recommendation is being computed;
- ``POST /recommend``: ``{"history": [titles], "k": 10, "candidates": null, "method": "exact",
  "explain": false, "user": null}`` -> ranked items with scores (and rationales);
- ``POST /explain``: ``{"history": [titles], "item": title}`` -> a short rationale.

Every error is one JSON line ``{"error": "<one line>"}`` with a 4xx status: 400 for a body that is not
valid JSON, 413 for a body over ``max_body_bytes``, 422 for a well-formed body that cannot be served
(missing or mistyped fields, an empty history, ``k`` out of range, an unknown or ambiguous title), 404 and
405 for unknown routes and methods. Unexpected failures are 500 with the same shape.

The session is not thread-safe and a CPU model gains nothing from running two requests at once, so model
calls are serialised by a lock; request parsing, validation and ``/health`` are not.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from recalign.errors import RecalignInputError

#: largest ``k`` a request may ask for
MAX_K = 100
#: longest history / candidate list a request may hold
MAX_TITLES = 200
#: request bodies above this many bytes are refused with 413
MAX_BODY_BYTES = 64 * 1024


# ---------------------------------------------------------------------- request / response models
class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[str] = Field(
        ..., min_length=1, max_length=MAX_TITLES, description="titles the user enjoyed, oldest first"
    )
    k: int = Field(10, ge=1, le=MAX_K, description="how many recommendations")
    candidates: list[str] | None = Field(
        None, min_length=1, max_length=MAX_TITLES, description="rank only these titles (candidate prompt)"
    )
    method: Literal["exact", "two-stage"] = Field(
        "exact",
        description="exact: exact top-k of the whole catalogue; two-stage: the server's retriever "
        "retrieves, the LM re-ranks",
    )
    explain: bool = Field(False, description="add a short rationale per item")
    user: str | None = Field(None, description="CLLM4Rec: a known user id whose user token to use")


class RecommendationOut(BaseModel):
    rank: int
    item_id: str
    title: str
    score: float = Field(description="log-probability of the title (LM) or of the item (ID-based model)")
    explanation: str | None = None


class RecommendResponse(BaseModel):
    recommendations: list[RecommendationOut]
    method: str
    seconds: float


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    history: list[str] = Field(..., min_length=1, max_length=MAX_TITLES)
    item: str = Field(..., min_length=1, description="the title to explain")


class ExplainResponse(BaseModel):
    item_id: str
    title: str
    explanation: str
    seconds: float


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    kind: str
    items: int
    retriever: str | None
    requests: int


class ErrorBody(BaseModel):
    error: str


_ERRORS = {400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}}


# ---------------------------------------------------------------------- errors
def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[int, str]:
    errors = exc.errors()
    for e in errors:
        if e.get("type") == "json_invalid":
            ctx = e.get("ctx") or {}
            return 400, f"malformed JSON body: {ctx.get('error', e.get('msg', 'invalid JSON'))}"
    parts = []
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "missing" and not loc:
            parts.append("request body is required")
            continue
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return 422, "; ".join(parts) + more


class _BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, whether announced by
    ``Content-Length`` or streamed in chunks."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._refuse(scope, receive, send)
        # Read the (small) body here, whether announced or streamed, so that an oversized stream is
        # refused before the application sees any of it; then hand it on as one message.
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body.extend(message.get("body", b""))
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
            if not message.get("more_body", False):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        resp = _error(413, f"request body over {self.limit} bytes")
        await resp(scope, receive, send)


# ---------------------------------------------------------------------- the app
def create_app(session, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving ``session`` (a loaded
    :class:`~recalign.lm.recommend.RecommendSession`)."""
    from recalign import __version__

    app = FastAPI(
        title="recalign",
        version=__version__,
        description=f"Recommendations and explanations from `{session.label or 'a model'}` over "
        f'{session.n_items} {session.dataset.name} items. Errors are `{{"error": "..."}}` with a 4xx status.',
    )
    lock = threading.Lock()
    counter = {"requests": 0}

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_request: Request, exc: RequestValidationError):
        return _error(*_validation_message(exc))

    @app.exception_handler(RecalignInputError)
    async def _on_input(_request: Request, exc: RecalignInputError):
        return _error(422, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail))

    @app.exception_handler(Exception)
    async def _on_bug(_request: Request, exc: Exception):  # pragma: no cover - a bug, logged by uvicorn
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health", response_model=Health, summary="liveness and what is being served")
    def health() -> Health:
        return Health(
            status="ok", model=session.label, kind=session.kind, items=session.n_items,
            retriever=session.retriever_name, requests=counter["requests"],
        )  # fmt: skip

    @app.post(
        "/recommend", response_model=RecommendResponse, responses=_ERRORS, summary="top-k items for a history"
    )
    def recommend(req: RecommendRequest) -> RecommendResponse:
        t0 = time.perf_counter()
        with lock:
            counter["requests"] += 1
            recs = session.recommend(
                req.history, k=req.k, candidates=req.candidates, method=req.method, user=req.user,
                explain=req.explain,
            )  # fmt: skip
            method = session.last_stats.get("method", req.method)
        return RecommendResponse(
            recommendations=[
                RecommendationOut(
                    rank=r.rank, item_id=r.item_id, title=r.title, score=r.score, explanation=r.explanation
                )
                for r in recs
            ],
            method=method,
            seconds=round(time.perf_counter() - t0, 3),
        )

    @app.post("/explain", response_model=ExplainResponse, responses=_ERRORS, summary="why an item fits")
    def explain(req: ExplainRequest) -> ExplainResponse:
        t0 = time.perf_counter()
        j = session.item(req.item, "item")
        with lock:
            counter["requests"] += 1
            text = session.explain(req.history, req.item)
        return ExplainResponse(
            item_id=session.item_ids[j],
            title=session.titles[j],
            explanation=text,
            seconds=round(time.perf_counter() - t0, 3),
        )

    return _BodyLimitApp(app, max_body_bytes)


class _BodyLimitApp(_BodyLimit):
    """The FastAPI app behind the body limit; attribute access (``openapi()``, ``routes``, ...) goes
    to the FastAPI app, so it can be used like one."""

    def __getattr__(self, name):
        return getattr(self.app, name)


# ---------------------------------------------------------------------- running it
def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket on ``host:port`` (``port=0``: a free port, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RecalignInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(
        app, log_level=log_level, access_log=log_level in ("info", "debug"), lifespan="off"
    )
    return uvicorn.Server(config)


def serve(
    app, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "warning", announce=print
) -> None:
    """Run ``app`` in the foreground until interrupted (Ctrl-C / SIGTERM)."""
    sock = bind(host, port)
    real_host, real_port = sock.getsockname()[:2]
    shown = f"[{real_host}]" if ":" in str(real_host) else real_host
    announce(f"serving on http://{shown}:{real_port} (OpenAPI page: http://{shown}:{real_port}/docs)")
    try:
        _server(app, log_level).run(sockets=[sock])
    finally:
        sock.close()


class BackgroundServer:
    """Run ``app`` on ``host:port`` (default: a free port on 127.0.0.1) in a thread; a context manager.

    ``url`` is the base address once started; leaving the ``with`` block stops the server and waits
    for its thread.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning") -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server = None
        self.thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self._sock = bind(self.host, self.port)
        self.port = self._sock.getsockname()[1]
        self.server = _server(self.app, self.log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
