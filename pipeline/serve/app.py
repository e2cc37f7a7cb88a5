"""`pipeline serve`'s HTTP API: search, embeddings and similarity over index folders loaded
once, with concurrent requests batched into shared forward passes (batching.py).

The routes are thin: they check the request (schema.py), hand a Job to the index's batcher
and shape its Answer. Every refusal is JSON {"error": "one line"}, never a traceback. The API
key, the body-size limit and the request metrics sit in one ASGI middleware (Guard) around it
all; CORS, when asked for, outside that, so a browser's preflight needs no key.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from pipeline.errors import IndexBusy, IndexFolderError, PipelineError
from pipeline.serve import schema
from pipeline.serve.batching import NO_BATCHING, Batcher, Limits, QueueFull
from pipeline.serve.engine import Answer, Job, estimated_tokens, run_jobs
from pipeline.serve.metrics import CONTENT_TYPE, Metrics
from pipeline.serve.schema import (
    ApiError,
    EmbedBody,
    OpenAIEmbedBody,
    SearchBody,
    SimilarityBody,
    busy,
    check_k,
    check_texts,
)
from pipeline.serve.slots import IndexSlot, load_slots

log = logging.getLogger("pipeline.serve")

PAGE = Path(__file__).parent / "static" / "index.html"
PLACEHOLDER = ("<!doctype html><meta charset=utf-8><title>pipeline serve</title>"
               "<p>The search page is not installed. The API answers at "
               "<a href=search?q=example>/search?q=...</a> and <a href=info>/info</a>.")
MAX_BODY_BYTES = 8 << 20  # 256 long texts fit many times over


class Service:
    """The indexes, their batchers and the metrics: what the routes answer with."""

    def __init__(self, slots: dict[str, IndexSlot], limits: Limits, poll_seconds: float):
        self.slots = slots
        self.default = next(iter(slots))
        self.metrics = Metrics()
        self.poll_seconds = poll_seconds
        self.batchers = {name: self._batcher(slot, limits) for name, slot in slots.items()}
        self.reload_now: asyncio.Event | None = None  # set by SIGHUP

    def _batcher(self, slot: IndexSlot, limits: Limits) -> Batcher:
        def observe(jobs: list[Job]) -> None:
            self.metrics.observe_batch(slot.name, len(jobs), sum(len(j.texts) for j in jobs))

        # slot.searcher is looked up per batch: a reload's swap reaches the next batch.
        return Batcher(lambda jobs: run_jobs(slot.searcher, jobs),
                       lambda job: estimated_tokens(job.texts, slot.searcher.encoder.max_tokens),
                       limits, slot.name, observe)

    def slot(self, name: str | None) -> IndexSlot:
        name = name or self.default
        if name not in self.slots:
            raise ApiError(f"unknown index {name!r}: this server has {', '.join(self.slots)}",
                           404)
        return self.slots[name]

    def slot_for_model(self, model: str | None) -> IndexSlot:
        """/v1/embeddings' model: an index's name, or the model of one (None: the default)."""
        if not model or model in self.slots:
            return self.slot(model)
        for slot in self.slots.values():
            if model in (slot.info["model"], slot.searcher.encoder.spec):
                return slot
        raise ApiError(f"unknown model {model!r}: give an index's name "
                       f"({', '.join(self.slots)}) or its model", 404)

    async def answer(self, index: str | None, job: Job) -> tuple[IndexSlot, Answer]:
        """The job's answer from the named index; 503 when it cannot be had just now."""
        slot = self.slot(index)
        try:
            return slot, await self.batchers[slot.name].submit(job)
        except QueueFull as err:
            raise busy(f"the server is busy ({err}): try again shortly") from None
        except IndexBusy as err:  # a rebuild holds the folder: its text cannot be read now
            raise busy(schema.one_line(str(err))) from None
        except IndexFolderError as err:
            if slot.changed():  # rewritten since loaded: the watcher is loading it anew
                raise busy(f"index {slot.name} changed on disk and is being reloaded: try "
                           "again shortly") from None
            raise busy(schema.one_line(str(err))) from None

    def depths(self) -> dict[str, int]:
        return {name: batcher.depth for name, batcher in self.batchers.items()}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        for batcher in self.batchers.values():
            await batcher.start()
        self.reload_now = asyncio.Event()
        watcher = asyncio.create_task(self.watch())
        hup = listen_for_sighup(self.reload_now.set)
        try:
            yield
        finally:
            watcher.cancel()
            if hup:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            for batcher in self.batchers.values():
                await batcher.stop()

    async def watch(self) -> None:
        """Every poll_seconds (or at once on SIGHUP), load anew the folders that changed."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.reload_now.wait(), self.poll_seconds)
            forced = self.reload_now.is_set()
            self.reload_now.clear()
            for slot in self.slots.values():
                try:
                    if forced or slot.changed():
                        # Off the loop: searches go on with the old Searcher meanwhile.
                        outcome = await asyncio.to_thread(slot.reload)
                        self.metrics.observe_reload(slot.name, outcome)
                except Exception:  # a folder read mid-rewrite must not end the watching
                    log.exception("%s: checking the folder for changes failed", slot.name)


def listen_for_sighup(callback) -> bool:
    """Call `callback` on SIGHUP; False where that cannot be (not the main thread, as a
    test's server in a thread, or a system without SIGHUP)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, callback)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError):
        return False
    return True


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": schema.one_line(message)}, status, headers)


def key_matches(authorization: str | None, api_key: str) -> bool:
    scheme, _, given = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              api_key.encode())


# Routes without the key: the health check, and the page itself (static, it holds no data;
# it asks for the key when the API answers 401).
OPEN_PATHS = {"/health", "/"}


class Guard:
    """ASGI middleware: the API key (every route but OPEN_PATHS), the body-size limit, and
    each request's route, status and time for /metrics."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, routes: set[str]):
        self.app, self.metrics, self.api_key, self.routes = app, metrics, api_key, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # 500: what the client gets if we raise

        async def noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await (self.refusal(scope) or self.app)(scope, receive, noting_status)
        finally:
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.observe_request(route, status, time.perf_counter() - start)

    def refusal(self, scope) -> Response | None:
        headers = Headers(scope=scope)
        if (self.api_key and scope["path"] not in OPEN_PATHS
                and not key_matches(headers.get("authorization"), self.api_key)):
            return error_response(401, "missing or wrong API key: send the header "
                                  "Authorization: Bearer KEY", {"WWW-Authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return error_response(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
        return None


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return error_response(err.status, str(err), err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return error_response(422, schema.validation_message(err.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        message = f"{err.detail}: {request.method} {request.url.path}"
        return error_response(err.status_code, message, getattr(err, "headers", None))

    @app.exception_handler(PipelineError)
    async def user_error(request: Request, err: PipelineError):
        return error_response(422, str(err) or type(err).__name__)

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=err)
        return error_response(500, "internal error: the server's log has the details")


def create_app(index_dirs: Sequence[str | Path], api_key: str | None = None,
               batching: bool = True, cors_origins: Sequence[str] = (),
               poll_seconds: float = 1.0, limits: Limits | None = None) -> FastAPI:
    """The app over `index_dirs` (each asked for by its folder's name; the first is the
    default), loaded now: a folder that cannot be searched is refused here (PipelineError).

    batching=False answers one request per forward pass (the benchmark's comparison);
    `limits` sets the batcher's window, budget and queue length.
    """
    limits = limits or (Limits() if batching else NO_BATCHING)
    if not batching:
        limits = dataclasses.replace(limits, window_s=0.0, max_items=1)
    service = Service(load_slots(index_dirs), limits, poll_seconds)
    app = FastAPI(title="pipeline serve", lifespan=service.lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.service = service
    add_error_handlers(app)
    app.include_router(router)
    app.add_middleware(Guard, metrics=service.metrics, api_key=api_key,
                       routes={route.path for route in router.routes})
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


# --- routes ----------------------------------------------------------------------------------

router = APIRouter()


def service_of(request: Request) -> Service:
    return request.app.state.service


@router.get("/", include_in_schema=False)
async def page():
    return FileResponse(PAGE) if PAGE.is_file() else HTMLResponse(PLACEHOLDER)


@router.get("/health")
async def health():
    return {"status": "ok"}


@router.get("/info")
async def info(request: Request):
    service = service_of(request)
    return {"indexes": {name: slot.info for name, slot in service.slots.items()},
            "default_index": service.default}


@router.get("/metrics")
async def metrics(request: Request):
    service = service_of(request)
    return Response(service.metrics.render(service.depths()), media_type=CONTENT_TYPE)


@router.get("/search")
async def search_get(request: Request, q: str, k: int = 10, index: str | None = None):
    texts = check_texts([q], "q")
    slot, answer = await service_of(request).answer(index, Job(texts, check_k(k)))
    return JSONResponse({"index": slot.name, "query": q, "k": k,
                         "hits": schema.hits_json(answer.hits[0]),
                         "truncated": answer.truncated[0]})


@router.post("/search")
async def search_post(request: Request, body: SearchBody):
    texts = schema.search_texts(body)
    slot, answer = await service_of(request).answer(body.index, Job(texts, check_k(body.k)))
    return JSONResponse({"index": slot.name, "results": [
        {"query": text, "hits": schema.hits_json(hits), "truncated": cut}
        for text, hits, cut in zip(texts, answer.hits, answer.truncated, strict=True)]})


@router.post("/embed")
async def embed(request: Request, body: EmbedBody):
    texts = check_texts(schema.as_texts(body.input, "input"), "input")
    _, answer = await service_of(request).answer(body.index, Job(texts))
    return JSONResponse({"embeddings": answer.vectors.tolist(), "dim": answer.vectors.shape[1],
                         "model": answer.model, "truncated": answer.truncated})


@router.post("/v1/embeddings")
async def openai_embeddings(request: Request, body: OpenAIEmbedBody):
    """OpenAI's embeddings API, for its clients: `model` is an index's name or model."""
    service = service_of(request)
    texts = check_texts(schema.as_texts(body.input, "input"), "input")
    slot = service.slot_for_model(body.model)
    _, answer = await service.answer(slot.name, Job(texts))
    tokens = sum(answer.tokens)
    return JSONResponse({
        "object": "list", "model": answer.model,
        "data": [{"object": "embedding", "index": i,
                  "embedding": schema.openai_embedding(vector, body.encoding_format)}
                 for i, vector in enumerate(answer.vectors)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@router.post("/similarity")
async def similarity(request: Request, body: SimilarityBody):
    texts = schema.similarity_texts(body)
    _, answer = await service_of(request).answer(body.index, Job(texts))
    return JSONResponse(schema.similarity_answer(answer.vectors, body.metric,
                                                 pairs=body.pairs is not None))
