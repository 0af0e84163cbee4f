"""OpenAI-compatible HTTP server with memory telemetry, Prometheus metrics and backpressure (FastAPI + uvicorn).

Concurrency model: the event loop only parses, validates and streams. Each admitted request holds one of
`max_concurrency` generation slots while a worker thread runs `backend.stream()` (numpy releases the GIL in its
matmuls); tokens cross to the loop with `call_soon_threadsafe`. At most `max_queue` more requests may wait for a
slot; beyond that the answer is 429 with Retry-After (Ollama answers 503, vLLM queues without bound: §6 of
serving-telemetry.md). A slot is given back when its worker thread has actually returned, so a client that
disconnects mid-stream (its generator is cancelled -> the cancel flag the backend polls each step) frees it for real.

Health: /health is 503 while the model loads, 200 when serving, and 503 after the backend is found broken: an
unexpected exception inside one request is answered with a 500 for that request only, then a one-token probe
(`backend.check()`) decides whether the backend itself is dead.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from trt_gemma.backends.base import Backend, GenerationParams, Step
from trt_gemma.errors import ResourceError, TrtGemmaError
from trt_gemma.serve_metrics import CONTENT_TYPE, ServerMetrics
from trt_gemma.serve_protocol import (APIError, Completion, StopMatcher, chat_messages, parse_json, sse, stop_list,
                                      validate)
from trt_gemma.telemetry import snapshot

log = logging.getLogger("trt_gemma.serve")
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_MAX_QUEUE = 16
DEFAULT_STREAM_INTERVAL_S = 0.05  # at most 20 SSE chunks/s per stream; tokens in between share a chunk
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the rest of the context
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
# A request body is held in memory whole: cap it. 8 MiB is ~100x the text of an 8192-token Gemma 2 context.
MAX_BODY_BYTES = 8 << 20
_END = object()


class Admission:
    """Bounded admission: `max_concurrency` slots plus `max_queue` waiting places. Used on the event loop only."""

    def __init__(self, max_concurrency: int, max_queue: int):
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self.running = self.waiting = 0
        self._sem = asyncio.Semaphore(max_concurrency)

    def try_enter(self) -> bool:
        if self.running + self.waiting >= self.max_concurrency + self.max_queue:
            return False
        self.waiting += 1
        return True

    async def wait_slot(self) -> None:
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def leave_queue(self) -> None:
        """An admitted request that never started waiting (failed before streaming)."""
        self.waiting -= 1

    def release(self) -> None:
        self.running -= 1
        self._sem.release()


class Generation:
    """One request's generation on a worker thread, observed from the event loop as batches of Steps.

    Hand-over is a locked list: the loop wakes once per flush (its interval timer), never per token, and flushes
    at most every `stream_interval_s` (the first token and the last one go out at once, so TTFT and end-to-end
    latency are untouched). Measured with benchmarks/serve_overhead.py on a busy 2-core host: one chunk per token
    cost 15-25% of decode throughput (each chunk is a GIL hand-over between the loop and the generating thread,
    plus the client's parsing); with 50 ms intervals it is a few percent, about the run-to-run noise there."""

    def __init__(self, server: "Server", prompt_ids: list[int], params: GenerationParams):
        self.server, self.prompt_ids, self.params = server, prompt_ids, params
        self.cancelled = threading.Event()
        self.failure: BaseException | None = None
        self.started = False  # batches() began: from then on it owns the admission bookkeeping
        self._lock = threading.Lock()
        self._items: list = []
        self._loop_waiting = False  # the loop sleeps on _ready: the next push must wake it
        self._ready = asyncio.Event()
        self._final = asyncio.Event()  # the last item is in: flush without waiting for the interval

    def _push(self, loop: asyncio.AbstractEventLoop, item, final: bool) -> None:
        """Worker thread side: wake the loop only if it is idle-waiting for items (not during its interval)."""
        with self._lock:
            self._items.append(item)
            wake, self._loop_waiting = self._loop_waiting, False
        if wake:
            loop.call_soon_threadsafe(self._ready.set)
        if final:
            loop.call_soon_threadsafe(self._final.set)

    def _work(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for step in self.server.backend.stream(self.prompt_ids, self.params, cancel=self.cancelled.is_set):
                self._push(loop, step, step.finish_reason is not None)
        except BaseException as e:  # reported to the request, never to the server
            self._push(loop, e, True)
        finally:
            self._push(loop, _END, True)

    async def _take(self, interval: float, last_flush: float) -> list:
        """Sleep out the rest of the interval (the final item cuts it short), then take what came, or wait for it."""
        delay = last_flush + interval - asyncio.get_running_loop().time()
        if delay > 0 and not self._final.is_set():
            try:
                await asyncio.wait_for(self._final.wait(), delay)
            except asyncio.TimeoutError:
                pass
        while True:
            with self._lock:
                if self._items:
                    items, self._items = self._items, []
                    return items
                self._loop_waiting = True
                self._ready.clear()
            await self._ready.wait()

    async def batches(self) -> AsyncIterator[list[Step]]:
        """Waits for a slot, starts the worker, yields the steps gathered at each flush."""
        srv = self.server
        self.started = True
        await srv.admission.wait_slot()
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(srv.pool, self._work, loop)
        fut.add_done_callback(lambda _f: srv.admission.release())
        last_flush = float("-inf")
        try:
            while True:
                items = await self._take(srv.stream_interval_s, last_flush)
                last_flush = loop.time()
                steps = [i for i in items if isinstance(i, Step)]
                if steps:
                    yield steps
                errors = [i for i in items if isinstance(i, BaseException)]
                if errors:
                    self.failure = errors[0]
                    return
                if _END in items:
                    return
        finally:
            self.cancelled.set()  # client gone or we stopped early (stop string): the worker ends at its next step


class Server:
    def __init__(self, backend: Backend | Callable[[], Backend], model_name: str, api_key: str | None,
                 max_queue: int, max_concurrency: int, stream_interval_s: float = 0.0):
        self.model_name, self.api_key = model_name, api_key
        self.stream_interval_s = max(0.0, stream_interval_s)
        self.backend: Backend | None = backend if isinstance(backend, Backend) else None
        self._loader = None if isinstance(backend, Backend) else backend
        self.state = "ready" if self.backend is not None else "loading"
        self.failure_reason: str | None = None
        self.max_concurrency, self.max_queue = max(1, max_concurrency), max(0, max_queue)
        self.admission: Admission | None = None
        self.pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="trt-gemma-gen")
        self.mean_e2e = 1.0
        self.metrics = ServerMetrics(
            model_name, running=lambda: self.admission.running if self.admission else 0,
            waiting=lambda: self.admission.waiting if self.admission else 0,
            kv_usage=lambda: self.backend.kv_usage().usage_perc if self.backend else 0.0,
            memory=lambda: snapshot(self.backend)["memory_bytes"])

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.admission = Admission(self.max_concurrency, self.max_queue)
        if self._loader is not None:
            asyncio.get_running_loop().run_in_executor(None, self._load)

    def _load(self) -> None:
        try:
            self.backend = self._loader()
            self.state = "ready"
        except Exception as e:  # the server stays up and says why on /health
            log.error("model failed to load: %s", e)
            self.state, self.failure_reason = "failed", str(e)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._loader is not None and self.backend is not None:  # close only what this app loaded
            self.backend.close()

    async def verify_backend(self, error: BaseException) -> None:
        """After an unexpected error: is the backend broken, or was it this request? Probe once to find out."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.check)
        except Exception as e:
            log.error("backend failed its health probe after %r: %s", error, e)
            self.state, self.failure_reason = "failed", f"{type(e).__name__}: {e}"

    # ---- request preparation ---------------------------------------------------------------------------------------
    def require_ready(self) -> Backend:
        if self.state != "ready":
            msg = "Loading model" if self.state == "loading" else f"Backend failed: {self.failure_reason}"
            raise APIError(503, msg, type="unavailable_error", code="service_unavailable")
        return self.backend

    def prepare(self, body: dict, kind: str) -> tuple[Completion, list[int], GenerationParams, dict]:
        req = validate(body, kind)
        if req["model"] != self.model_name:
            raise APIError(404, f"The model `{req['model']}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        backend = self.require_ready()
        try:
            if kind == "chat":
                ids = backend.encode_chat(chat_messages(req["messages"]))
            else:
                ids = self._completion_prompt(backend, req["prompt"])
        except TrtGemmaError as e:
            raise APIError(400, e.message, param="messages" if kind == "chat" else "prompt") from None
        ctx = backend.info.context_length
        param = "messages" if kind == "chat" else "prompt"
        if len(ids) >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} "
                                f"resulted in {len(ids)} tokens.", param=param, code="context_length_exceeded")
        max_tokens = req.get("max_completion_tokens") or req["max_tokens"]
        if max_tokens is None:
            max_tokens = ctx - len(ids) if kind == "chat" else min(DEFAULT_COMPLETION_MAX_TOKENS, ctx - len(ids))
        if len(ids) + max_tokens > ctx:
            raise APIError(400, f"max_tokens is too large: {max_tokens}. This model's maximum context length is "
                                f"{ctx} tokens and your {param} has {len(ids)}, so at most {ctx - len(ids)} "
                                "completion tokens fit.", param="max_tokens", code="invalid_value")
        top_k = req["top_k"] if req["top_k"] and req["top_k"] > 0 else 0
        params = GenerationParams(max_tokens=max_tokens, temperature=float(req["temperature"]),
                                  top_p=float(req["top_p"]), top_k=top_k, seed=req["seed"],
                                  ignore_eos=bool(req["ignore_eos"]))
        return Completion(kind, self.model_name, len(ids)), ids, params, req

    @staticmethod
    def _completion_prompt(backend: Backend, prompt) -> list[int]:
        if isinstance(prompt, str):
            return backend.encode(prompt)
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < backend.info.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {backend.info.vocab_size}).", param="prompt")
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return backend.encode(prompt[0])
        raise APIError(400, "prompt must be a string, one string in a list, or a list of token ids "
                            "(one prompt per request).", param="prompt", code="invalid_type")

    def retry_after(self) -> int:
        """Seconds until a place is likely free: mean request time x queue depth / slots."""
        depth = (self.admission.waiting + 1) / self.max_concurrency
        return max(1, math.ceil(self.mean_e2e * depth))

    # ---- generation ------------------------------------------------------------------------------------------------
    async def run(self, comp: Completion, gen: Generation, stops: list[str]) -> AsyncIterator[tuple[str, str | None]]:
        """Yields (text delta, None) while generating, then (last text, finish_reason); records metrics once however
        the request ends (finished, stop string, client gone = "cancelled", failure)."""
        arrival = time.monotonic()
        matcher, finish = StopMatcher(stops), None
        try:
            async with contextlib.aclosing(gen.batches()) as batches:
                async for steps in batches:
                    if comp.completion_tokens == 0:
                        self.metrics.ttft.observe(time.monotonic() - arrival)
                        self.metrics.prompt_tokens.inc(comp.prompt_tokens)
                    text = []
                    for s in steps:
                        comp.completion_tokens += 1
                        self.metrics.generation_tokens.inc()
                        if not s.is_prompt_step:
                            self.metrics.tpot.observe(s.step_seconds)
                        out, stopped = matcher.push(s.text)
                        text.append(out)
                        if stopped or s.finish_reason:
                            finish = "stop" if stopped else s.finish_reason
                            break
                    if finish:
                        yield "".join(text) + matcher.flush(), finish
                        return
                    yield "".join(text), None
            if gen.failure is not None:
                raise gen.failure
        finally:
            if gen.failure is None:
                e2e = time.monotonic() - arrival
                self.metrics.e2e.observe(e2e)
                self.metrics.success(finish or "cancelled")
                self.mean_e2e = 0.8 * self.mean_e2e + 0.2 * e2e

    async def stream_sse(self, comp: Completion, gen: Generation, stops: list[str], include_usage: bool):
        if comp.kind == "chat":
            yield sse(comp.chunk(None, first=True))
        try:
            async for text, finish in self.run(comp, gen, stops):
                if text:
                    yield sse(comp.chunk(text))
                if finish:
                    yield sse(comp.chunk(None, finish_reason=finish))
        except Exception as e:  # headers are sent: report in-band as OpenAI does, keep the server up
            err = self.generation_error(e)
            yield sse(err.body())
        if include_usage:
            yield sse(comp.usage_chunk())
        yield sse("[DONE]")

    async def complete(self, comp: Completion, gen: Generation, stops: list[str]) -> dict:
        parts, finish = [], "cancelled"
        try:
            async for text, f in self.run(comp, gen, stops):
                parts.append(text)
                finish = f or finish
        except Exception as e:
            raise self.generation_error(e) from None
        return comp.response("".join(parts), finish)

    def generation_error(self, e: BaseException) -> APIError:
        """A typed error is the request's fault (400); anything else is ours (500) and triggers a backend probe."""
        if isinstance(e, TrtGemmaError):
            self.metrics.error(400)
            return APIError(400, e.message)
        log.exception("generation failed", exc_info=e)
        self.metrics.error(500)
        asyncio.get_running_loop().create_task(self.verify_backend(e))
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")

    async def handle(self, request: Request, kind: str) -> Response:
        comp, ids, params, req = self.prepare(parse_json(await read_body(request)), kind)
        if not self.admission.try_enter():
            raise APIError(429, f"Server busy: {self.admission.running} requests generating and "
                                f"{self.admission.waiting} queued (max_queue {self.max_queue}). Retry later.",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(self.retry_after())})
        gen = Generation(self, ids, params)
        stops = stop_list(req["stop"])
        if req["stream"]:
            include_usage = bool((req["stream_options"] or {}).get("include_usage"))
            body = self.stream_sse(comp, gen, stops, include_usage)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(_close_stream, body, gen))
        return JSONResponse(await self.complete_unless_gone(request, comp, gen, stops))

    async def complete_unless_gone(self, request: Request, comp: Completion, gen: Generation,
                                   stops: list[str]) -> dict:
        """Non-streaming: poll for a client that hung up and cancel its generation (streams notice it themselves)."""
        task = asyncio.ensure_future(self.complete(comp, gen, stops))
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return {}  # nobody is listening


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or as received), never buffered whole."""
    too_large = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _close_stream(body, gen: Generation) -> None:
    """Runs after the response ends, also when the client left: stop the worker, finalize the generator now."""
    gen.cancelled.set()
    await body.aclose()
    if not gen.started:  # the client left before the body was iterated: it still holds a queue place
        gen.started = True
        gen.server.admission.leave_queue()


def create_app(backend: Backend | Callable[[], Backend], model_name: str, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
               stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S) -> FastAPI:
    """The ASGI app. `backend` is a loaded Backend, or a zero-argument loader run in a thread at startup (then
    /health answers 503 "Loading model" until it returns). `stream_interval_s`: minimum time between two SSE
    chunks of one stream (0 = one chunk per token)."""
    srv = Server(backend, model_name, api_key, max_queue, max_concurrency, stream_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await srv.startup()
        yield
        srv.shutdown()

    app = FastAPI(title="trt_gemma", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        if e.status != 500:  # 500s were counted where they happened
            srv.metrics.error(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error in %s", request.url.path, exc_info=e)
        srv.metrics.error(500)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    _add_routes(app, srv)
    return app


def _add_routes(app: FastAPI, srv: Server) -> None:
    async def auth(request: Request) -> None:
        """--api-key guards /v1 only (as vLLM does): /health and /metrics stay open for probes and scrapers.
        A dependency rather than an HTTP middleware, which would sit in the path of every streamed chunk."""
        sent = request.headers.get("authorization", "").encode("utf-8", "replace")
        if srv.api_key and not hmac.compare_digest(sent, f"Bearer {srv.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(auth)])

    @app.get("/health")
    async def health():
        if srv.state == "ready":
            return {"status": "ok"}
        msg = "Loading model" if srv.state == "loading" else f"Backend failed: {srv.failure_reason}"
        err = APIError(503, msg, type="unavailable_error", code="service_unavailable")
        return JSONResponse(err.body(), status_code=503)

    @v1.get("/models")
    async def models():
        ctx = srv.backend.info.context_length if srv.backend else None
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": 0,
                                            "owned_by": "trt_gemma", "max_model_len": ctx}]}

    @v1.post("/chat/completions")
    async def chat(request: Request):
        return await srv.handle(request, "chat")

    @v1.post("/completions")
    async def completions(request: Request):
        return await srv.handle(request, "completion")

    @app.get("/metrics")
    async def metrics():
        body = await asyncio.get_running_loop().run_in_executor(None, srv.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    @v1.get("/telemetry")
    async def telemetry():
        return await asyncio.get_running_loop().run_in_executor(None, snapshot, srv.backend)

    app.include_router(v1)


def _check_bindable(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as e:
        raise ResourceError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                            fix="choose another --port (or --host), or stop the server already using it") from e


def run_server(model_path, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
               log_level: str = "info", backend: str = "auto") -> None:
    """Serve `model_path` (any dir `load_backend` accepts) on `backend` (backends.BACKENDS); the port opens before
    the model finishes loading."""
    import uvicorn

    from trt_gemma.backends import detect_kind, load_backend

    detect_kind(Path(model_path))  # a wrong path fails here, before the port opens
    _check_bindable(host, port)  # a busy port is a typed error here, not uvicorn's exit after the model loads
    name = model_name or Path(model_path).name
    app = create_app(lambda: load_backend(model_path, slots=max_concurrency, backend=backend), name, api_key=api_key,
                     max_queue=max_queue, max_concurrency=max_concurrency, stream_interval_s=stream_interval_s)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=5)
