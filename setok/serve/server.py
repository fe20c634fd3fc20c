"""`setok serve`: the runtime behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

Routes: POST /v1/chat/completions (OpenAI's, streaming too), POST /v1/segment and
POST /v1/tokenize (setok's own), GET /v1/models, GET /health (the process is up), GET /ready
(sessions warmed), GET /metrics (Prometheus). At most `max_concurrency` requests are admitted at
once (the next gets 429 with Retry-After); concurrent greedy answers are batched into
`Pipeline.answer_batch` (`setok.serve.batcher`). Every refusal is OpenAI's error object with a
one-line message: 400 bad input, 401 bad key, 413 too large, 429 busy. SIGTERM / Ctrl-C stop
accepting connections and finish the requests in flight before the process exits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from setok.errors import InputError, SetokError
from setok.optional import require
from setok.runtime.pipeline import Pipeline
from setok.runtime.preprocess import to_rgb_array
from setok.serve import chat as C
from setok.serve.batcher import Batcher, Job, answer_jobs
from setok.serve.generate import Completion, Generation, check_context, prompt_length
from setok.serve.images import (
    PayloadTooLarge,
    box,
    image_bytes,
    open_image,
    png,
    rle,
)
from setok.serve.metrics import SERVE_HINT, Metrics

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 24 * 1024 * 1024  # one 16 MiB image in base64 fits, with room for the rest
BATCH_WINDOW_S = 0.005  # how long the first request of a batch waits for company
WORKERS = 4  # threads for work that is not batched (images, streams, sampling, segment, tokenize)
GRACEFUL_S = 30  # in-flight requests get this long after SIGTERM


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_concurrency: int = 64
    max_batch: int = 8
    api_key: str | None = None
    batch_window_s: float = BATCH_WINDOW_S
    max_body_bytes: int = MAX_BODY_BYTES


class Busy(SetokError):
    """More requests in flight than --max-concurrency: answered 429 with Retry-After."""


class Unauthorized(SetokError):
    """A missing or wrong bearer token: answered 401."""


STATUS = [(PayloadTooLarge, 413, "invalid_request_error"), (InputError, 400, "invalid_request_error"),
          (Busy, 429, "rate_limit_error"), (Unauthorized, 401, "authentication_error")]


def error_body(message: str, kind: str, code: int) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(e: Exception):
    from fastapi.responses import JSONResponse

    code, kind = next(((c, k) for cls, c, k in STATUS if isinstance(e, cls)), (500, "server_error"))
    headers = {"Retry-After": "1"} if code == 429 else {"WWW-Authenticate": "Bearer"} if code == 401 else None
    message = str(e) if code != 500 else f"internal error ({type(e).__name__}); see the server log"
    return JSONResponse(error_body(message, kind, code), status_code=code, headers=headers)


class Slot:
    """One admitted request; leaving twice is harmless (a stream leaves from two places)."""

    def __init__(self, service: Service):
        self.service, self.left = service, False

    def leave(self) -> None:
        if not self.left:
            self.left = True
            self.service.in_flight -= 1
            self.service.metrics.in_flight.set(self.service.in_flight)


class Service:
    """Everything the routes share: the pipeline, admission, the batcher, metrics."""

    def __init__(self, pipe: Pipeline, model: str, options: ServeOptions):
        self.pipe, self.model, self.opts = pipe, model, options
        self.metrics = Metrics(options.max_batch)
        self.batcher = Batcher(lambda jobs: answer_jobs(pipe, jobs), options.max_batch, options.batch_window_s,
                               self._on_batch)
        self.pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="setok-serve")
        self.in_flight = 0
        self.ready = False

    # ---- admission and plumbing -------------------------------------------------------------
    def admit(self) -> Slot:
        if self.in_flight >= self.opts.max_concurrency:
            raise Busy(f"{self.in_flight} requests in flight, the limit is {self.opts.max_concurrency} "
                       "(--max-concurrency); retry after the Retry-After seconds")
        self.in_flight += 1
        self.metrics.in_flight.set(self.in_flight)
        return Slot(self)

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _on_batch(self, results: list) -> None:
        self.metrics.batch.observe(len(results))
        self.metrics.queue_depth.set(self.batcher.depth)
        done = [r for r in results if isinstance(r, Completion)]
        if done:
            self.metrics.observe_stages(done[0].timings)  # one batch is one run of each stage

    def fit(self, raw: bytes) -> np.ndarray:
        return to_rgb_array(open_image(raw), self.pipe.size)

    async def startup(self) -> None:
        self.batcher.start()
        await self.call(self._warm)
        self.ready = True
        log.info("setok serve: %s ready", self.model)

    def _warm(self) -> None:
        self.pipe.warmup()
        blank = np.zeros((self.pipe.size, self.pipe.size, 3), np.uint8)
        if self.opts.max_batch > 1:  # the batched path's first run is slower too
            answer_jobs(self.pipe, [Job(blank, "warm up", 1), Job(blank, "warm up", 1)])

    async def shutdown(self) -> None:
        await self.batcher.stop()
        self.pool.shutdown(wait=True)
        self.pipe.close()

    # ---- chat completions -------------------------------------------------------------------
    async def chat(self, body: Any):
        req = C.parse_chat(body, self.model)
        slot = self.admit()
        try:
            image = await self.call(self.fit, req.image)
            if req.stream:
                slot, held = None, slot  # the stream owns the slot from here on
                return await self._stream(req, image, held)
            if req.schema is not None:
                c = await self.call(self._structured, image, req)
                self.metrics.observe_stages(c.timings)
            elif req.sampling.greedy:
                check_context(self.pipe, prompt_length(self.pipe, req.question, 1), req.sampling.max_tokens)
                self.metrics.queue_depth.set(self.batcher.depth + 1)
                c = await self.batcher.submit(Job(image, req.question, req.sampling.max_tokens, req.sampling.stop))
            else:
                c = await self.call(lambda: self._generation(image, req).run())
                self.metrics.observe_stages(c.timings)
            self.metrics.observe_completion(c)
            return C.response(c, self.model)
        finally:
            if slot is not None:
                slot.leave()

    def _structured(self, image: np.ndarray, req: C.ChatRequest) -> Completion:
        """A response_format json_schema answer: Pipeline.answer's schema-constrained decode."""
        vt = self.pipe.tokenize(image)
        t = self.pipe.answer(vt, req.question, sampling=req.sampling.params, schema=req.schema)
        return Completion(t.text, t.token_ids, "stop" if t.complete else "length",
                          prompt_length(self.pipe, req.question, vt.num_tokens), vt.num_tokens, {**vt.timings, **t.timings})

    def _generation(self, image: np.ndarray, req: C.ChatRequest) -> Generation:
        return Generation(self.pipe, self.pipe.tokenize(image), req.question, req.sampling)

    async def _stream(self, req: C.ChatRequest, image: np.ndarray, slot: Slot):
        from fastapi.responses import StreamingResponse
        from starlette.background import BackgroundTask

        try:  # a bad prompt fails here, before the 200 of a stream is sent
            gen = await self.call(self._generation, image, req)
        except BaseException:
            slot.leave()
            raise
        return StreamingResponse(self._events(gen, req, slot), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"}, background=BackgroundTask(slot.leave))

    async def _events(self, gen: Generation, req: C.ChatRequest, slot: Slot):
        cid, cancelled = C.completion_id(), threading.Event()
        try:
            yield _sse(C.chunk(cid, self.model, {"role": "assistant", "content": ""}))
            async for piece in self._pieces(gen, cancelled):
                if piece:
                    yield _sse(C.chunk(cid, self.model, {"content": piece}))
            c = Completion(gen.text, gen.ids, gen.finish_reason, int(gen.embeds.shape[1]), gen.vt.num_tokens,
                           gen.vt.timings)
            yield _sse(C.chunk(cid, self.model, {}, c.finish_reason))
            if req.include_usage:
                yield _sse(C.chunk(cid, self.model, {}, usage_=C.usage(c), choices=False))
            yield "data: [DONE]\n\n"
            self.metrics.observe_completion(c)
            self.metrics.observe_stages(c.timings)
        except InputError as e:  # the status line is sent: the error travels as an event
            yield _sse(error_body(str(e), "invalid_request_error", 400))
        finally:
            cancelled.set()  # a client that left stops the decode at the next token
            slot.leave()

    async def _pieces(self, gen: Generation, cancelled: threading.Event):
        """Generation.pieces on a worker thread, handed to the event loop as they come."""
        loop, queue, end = asyncio.get_running_loop(), asyncio.Queue(), object()

        def produce() -> None:
            try:
                for piece in gen.pieces(cancelled):
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, end)

        worker = loop.run_in_executor(self.pool, produce)
        try:
            while (item := await queue.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await worker

    # ---- setok's own routes -----------------------------------------------------------------
    async def vision(self, body: Any, route: str):
        if not isinstance(body, dict):
            raise InputError(f"body: got {type(body).__name__}; expected a JSON object")
        C.check_model(body.get("model", self.model), self.model)  # optional here: one model is served
        raw = image_bytes(body.get("image"))
        slot = self.admit()
        try:
            if route == "segment":
                return await self.call(self._segment, raw, body.get("expression"), body.get("format", "rle"))
            return await self.call(self._tokenize, raw)
        finally:
            slot.leave()

    def _segment(self, raw: bytes, expression: Any, fmt: Any) -> dict:
        if fmt not in ("rle", "png"):
            raise InputError(f"format: got {fmt!r}; expected 'rle' or 'png'")
        result = self.pipe.segment(open_image(raw), expression)  # the runtime maps it to the client's frame
        mask = result.mask  # (H, W) of the client's image, borders redrawn at its resolution
        self.metrics.observe_stages(result.timings)
        return {"model": self.model, "size": list(result.frame.frame_size), "num_tokens": int(result.selected.size),
                "selected_tokens": np.flatnonzero(result.selected).tolist(), "area": int(mask.sum()),
                "box": box(mask), "centroid": _point(result.centroid), "frame": result.frame.to_dict(),
                "mask": rle(mask) if fmt == "rle" else png(mask), "timings_ms": _ms(result.timings)}

    def _tokenize(self, raw: bytes) -> dict:
        vt = self.pipe.tokenize(open_image(raw))
        grid, patch = self.pipe.grid, self.pipe.patch
        xs, ys = vt.frame.to_frame((vt.centers % grid + 0.5) * patch, (vt.centers // grid + 0.5) * patch)
        self.metrics.observe_stages(vt.timings)
        return {"model": self.model, "size": list(vt.frame_size), "num_tokens": vt.num_tokens,
                "centers": [[round(float(x), 2), round(float(y), 2)] for x, y in zip(xs, ys)],
                "boxes": [None if b[0] < 0 else [int(v) for v in b] for b in vt.boxes],
                "centroids": [_point(c) for c in vt.centroids], "frame": vt.frame.to_dict(), "timings_ms": _ms(vt.timings)}

    def models(self) -> dict:
        created = int(self.pipe.bundle.joinpath("manifest.json").stat().st_mtime)
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": created,
                                            "owned_by": "setok", "max_model_len": self.pipe.manifest.text["max_positions"]}]}


def _point(xy) -> list[float] | None:
    """(x, y) in frame pixels, rounded; None for a token or mask with no pixel (NaN)."""
    if xy is None or not np.all(np.isfinite(xy)):
        return None
    return [round(float(xy[0]), 2), round(float(xy[1]), 2)]


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _ms(timings: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1000, 3) for k, v in timings.items()}


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; over `limit` bytes is 413 (counted as it arrives: chunked bodies too)."""
    size, chunks = 0, []
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks.append(part)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"body: malformed JSON ({e})") from None


# ---- the app --------------------------------------------------------------------------------------
def create_app(pipe: Pipeline, model: str, options: ServeOptions = ServeOptions()) -> FastAPI:
    fastapi = require("fastapi", SERVE_HINT)
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException

    service = Service(pipe, model, options)

    @asynccontextmanager
    async def lifespan(app):
        await service.startup()
        yield
        await service.shutdown()

    app = fastapi.FastAPI(title="setok", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.middleware("http")(_guard(service))

    @app.exception_handler(SetokError)
    async def user_error(request, e: SetokError):
        if not isinstance(e, (InputError, Busy, Unauthorized)):  # a bad deployment (BundleError): the log keeps why
            log.error("%s %s failed: %s", request.method, request.url.path, e)
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {e.detail}", "invalid_request_error",
                                       e.status_code), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(request, e: Exception):  # the traceback goes to the log; the client gets one line
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(e)

    async def chat_completions(request):
        out = await service.chat(await read_json(request, options.max_body_bytes))
        return out if isinstance(out, Response) else JSONResponse(out)  # a stream is a Response already

    async def segment(request):
        return JSONResponse(await service.vision(await read_json(request, options.max_body_bytes), "segment"))

    async def tokenize(request):
        return JSONResponse(await service.vision(await read_json(request, options.max_body_bytes), "tokenize"))

    async def ready(request):
        if not service.ready:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return JSONResponse({"status": "ready", "model": model})

    async def metrics(request):
        service.metrics.queue_depth.set(service.batcher.depth)
        data, kind = service.metrics.exposition()
        return Response(data, media_type=kind)

    # Plain routes (the handler gets the request): bodies are parsed and refused by our own
    # checks, with 400 and one line, instead of FastAPI's 422 validation documents.
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/segment", segment, methods=["POST"])
    app.add_route("/v1/tokenize", tokenize, methods=["POST"])
    app.add_route("/v1/models", lambda request: JSONResponse(service.models()), methods=["GET"])
    app.add_route("/health", lambda request: JSONResponse({"status": "ok"}), methods=["GET"])
    app.add_route("/ready", ready, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    return app


def _guard(service: Service):
    """Auth (every /v1 route; probes and scrapers stay open), the body limit, metrics."""
    key = service.opts.api_key

    async def guard(request, call_next):
        start, route = time.perf_counter(), service.metrics.route(request.url.path)
        try:
            if key is not None and request.url.path.startswith("/v1/"):
                _check_key(request.headers.get("authorization", ""), key)
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > service.opts.max_body_bytes:
                raise PayloadTooLarge(f"request body of {length} bytes; at most {service.opts.max_body_bytes}")
        except SetokError as e:
            response = error_response(e)
        else:
            response = await call_next(request)
        if hasattr(response, "body_iterator"):  # what call_next returns: streamed through the middleware
            response.body_iterator = _timed(response.body_iterator, response.status_code, service.metrics, route, start)
        else:
            _record(service.metrics, route, response.status_code, start)
        return response

    return guard


def _check_key(header: str, key: str) -> None:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise Unauthorized("missing or wrong API key; send the header 'Authorization: Bearer <key>'")


async def _timed(body, status: int, metrics: Metrics, route: str, start: float):
    """The body passed through; latency and status are recorded once the last byte is out."""
    try:
        async for part in body:
            yield part
    finally:
        _record(metrics, route, status, start)


def _record(metrics: Metrics, route: str, status: int, start: float) -> None:
    metrics.requests.labels(route, str(status)).inc()
    metrics.latency.labels(route).observe(time.perf_counter() - start)


# ---- the process ----------------------------------------------------------------------------------
def model_name(bundle: Path) -> str:
    return Path(bundle).resolve().name


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one clear error, not a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from None
    return sock


def serve(bundle: str | Path, options: ServeOptions = ServeOptions()) -> None:
    """Open the bundle and serve it until SIGTERM / Ctrl-C (in-flight requests finish first)."""
    uvicorn = require("uvicorn", SERVE_HINT)
    if options.max_concurrency < 1 or options.max_batch < 1:
        raise InputError(f"max_concurrency={options.max_concurrency}, max_batch={options.max_batch}; expected >= 1")
    # No spinning: idle ORT threads busy-waiting for the next run starve the event loop and the
    # other lanes (measured here: 2-4x fewer requests/s at 16 clients with spinning on).
    pipe = Pipeline.open(bundle, spin=False)
    app = create_app(pipe, model_name(Path(bundle)), options)
    sock = bind(options.host, options.port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACEFUL_S)
    uvicorn.Server(config).run(sockets=[sock])
