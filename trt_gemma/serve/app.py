"""OpenAI-compatible HTTP server with memory telemetry, Prometheus metrics and backpressure (FastAPI + uvicorn).

Concurrency model: the event loop only parses, validates and streams; generation goes through the same objects the
Python API uses: a `trt_gemma.runtime.scheduler.Scheduler` (`max_concurrency` slots on worker threads, admission,
cancellation) and the API's `AsyncStream` (text pieces, stop strings). This module keeps the HTTP side only:
parsing and bounds, SSE, metrics, authentication, health, the guard hook. At most `max_queue` more requests may
wait for a slot; beyond that the answer is 429 with Retry-After (Ollama answers 503, vLLM queues without bound:
docs/facts/serving-telemetry.md §6). A slot is given back when its worker thread has actually returned, so a
client that disconnects mid-stream (its generator is cancelled -> the cancel flag the backend polls each step) frees
it for real.

Health: /health is 503 while the model loads, 200 when serving, and 503 after the backend is found broken: an
unexpected exception inside one request is answered with a 500 for that request only, then a one-token probe
(`backend.check()`) decides whether the backend itself is dead. With run_server's `exit_on_load_failure` (on by
default under systemd or in a container, where a supervisor restarts the process) a failed load or probe stops the
server instead.

No single request may stall the others: every size a client controls is bounded before any work (serve/limits.py),
the body is parsed, validated and tokenized on a worker thread (the tokenizer releases the GIL), stop strings are
matched in linear time (runtime/stops.StopMatcher), and sockets that never send a request are closed
(serve/conn.py). A client that hangs up before its request is read counts as request_error_total{http_code="499"}
(nginx's "client closed request"), not as a server error.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Callable, cast

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from trt_gemma.api import AsyncStream, Run
from trt_gemma.runtime.base import Backend, GenerationParams
from trt_gemma.errors import ConfigError, ResourceError, TrtGemmaError
from trt_gemma.runtime.scheduler import Admission, QueueFull, Scheduler
from trt_gemma.serve.conn import (DEFAULT_BODY_BYTES, DEFAULT_BODY_TIMEOUT_S, DEFAULT_HEADER_TIMEOUT_S,
                                  DEFAULT_KEEP_ALIVE_TIMEOUT_S, ClientGone, check_bindable, done_unless_gone,
                                  install_repeat_filter, loop_exception_handler, raise_nofile_limit, read_body,
                                  supervisor, uvicorn_config)
from trt_gemma.serve.limits import TRIM_ABOVE_BYTES, TRIM_DELAY_S, RequestLimits, ServiceRate, trim_heap
from trt_gemma.serve.metrics import CONTENT_TYPE, ServerMetrics
from trt_gemma.runtime.stops import stop_list
from trt_gemma.serve.protocol import APIError, Completion, chat_messages, parse_json, sse, too_long, validate
from trt_gemma.telemetry import snapshot

log = logging.getLogger("trt_gemma.serve.app")
DEFAULT_MAX_CONCURRENCY = 2
DEFAULT_MAX_QUEUE = 16
DEFAULT_STREAM_INTERVAL_S = 0.05  # at most 20 SSE chunks/s per stream; tokens in between share a chunk
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat defaults to the rest of the context
PREP_THREADS = 1  # requests parsed and tokenized at once; more wait (each is bounded by RequestLimits)
MAX_BODY_BYTES = DEFAULT_BODY_BYTES  # read_body's default; the model routes pass RequestLimits.body_bytes


class _MeasuredAdmission(Admission):
    """Admission that tells the service-rate estimate when a slot is taken and given back (for Retry-After)."""

    def __init__(self, max_concurrency: int, max_queue: int, rate: ServiceRate):
        super().__init__(max_concurrency, max_queue)
        self.rate = rate

    async def wait_slot(self) -> None:
        await super().wait_slot()
        self.rate.started()

    def acquire(self, cancelled) -> bool:  # threads (the Python API's path), same bookkeeping
        got = super().acquire(cancelled)
        if got:
            self.rate.started()
        return got

    def release(self) -> None:
        self.rate.finished()
        super().release()


class Server:
    def __init__(self, backend: Backend | Callable[[], Backend], model_name: str, api_key: str | None,
                 max_queue: int, max_concurrency: int, stream_interval_s: float = 0.0,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
                 on_failure: Callable[[BaseException], None] | None = None, metrics_auth: bool = False):
        if api_key is not None and not api_key.strip():
            raise ConfigError("the API key is empty: authentication would be off",
                              fix="set a non-empty key, or pass none (no key: no authentication)")
        self.model_name, self.api_key = model_name, api_key
        self.body_timeout_s, self.on_failure, self.metrics_auth = body_timeout_s, on_failure, metrics_auth
        self._loader = None if isinstance(backend, Backend) else backend
        self.failure_reason: str | None = None
        self.max_concurrency, self.max_queue = max(1, max_concurrency), max(0, max_queue)
        self.rate = ServiceRate(self.max_concurrency)
        # the Python API's scheduling object: slots, admission (measured here, for Retry-After), cancellation
        self.scheduler = Scheduler.create(
            backend if isinstance(backend, Backend) else None, self.max_concurrency, self.max_queue,
            max(0.0, stream_interval_s), admission=_MeasuredAdmission(self.max_concurrency, self.max_queue, self.rate))
        self.state = "ready" if self.backend is not None else "loading"
        self.prep_pool = ThreadPoolExecutor(max_workers=PREP_THREADS, thread_name_prefix="trt-gemma-prep")
        self._trim_pending = False
        self.extra_memory: dict[str, Callable[[], int]] = {}  # memory_bytes kinds added by plug-ins (serve/guard.py)
        self.metrics = ServerMetrics(
            model_name, running=lambda: self.admission.running if self.admission else 0,
            waiting=lambda: self.admission.waiting if self.admission else 0,
            kv_usage=lambda: self.backend.kv_usage().usage_perc if self.backend else 0.0,
            memory=lambda: {**snapshot(self.backend)["memory_bytes"],
                            **{k: f() for k, f in self.extra_memory.items()}})

    @property
    def backend(self) -> Backend | None:
        return self.scheduler.backend

    @property
    def admission(self) -> _MeasuredAdmission:
        return cast(_MeasuredAdmission, self.scheduler.admission)

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        asyncio.get_running_loop().set_exception_handler(loop_exception_handler)
        if self._loader is not None:
            asyncio.get_running_loop().run_in_executor(None, self._load)

    def _load(self) -> None:
        try:
            self.scheduler.backend = self._loader()
            self.state = "ready"
            choice = getattr(self.backend, "choice", None)  # a bundle's: why its TensorRT engine is used or not
            log.info("serving %s: %s backend, %s%s", self.model_name, self.backend.name, self.backend.info.path,
                     f" ({choice})" if choice else "")
        except Exception as e:  # the server stays up and says why on /health (or stops, with on_failure)
            log.error("model failed to load: %s", e)
            self.state, self.failure_reason = "failed", str(e)
            if self.on_failure is not None:
                self.on_failure(e)

    def shutdown(self) -> None:
        self.scheduler.close(wait=False)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)
        if self._loader is not None and self.backend is not None:  # close only what this app loaded
            self.backend.close()

    async def verify_backend(self, error: BaseException) -> None:
        """After an unexpected error: is the backend broken, or was it this request? Probe once to find out."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.check)
        except Exception as e:
            log.error("backend failed its health probe after %r: %s", error, e)
            self.state, self.failure_reason = "failed", f"{type(e).__name__}: {e}"
            if self.on_failure is not None:
                self.on_failure(e)

    # ---- request preparation ---------------------------------------------------------------------------------------
    def require_ready(self) -> Backend:
        if self.state != "ready":
            msg = "Loading model" if self.state == "loading" else f"Backend failed: {self.failure_reason}"
            raise APIError(503, msg, type="unavailable_error", code="service_unavailable")
        return self.backend

    def prepare(self, raw: bytes, kind: str, backend: Backend) -> tuple[Completion, list[int], GenerationParams, dict]:
        """Parse, bound, validate and tokenize: runs on a prep thread, never on the event loop."""
        limits = RequestLimits(backend.info.context_length)
        req = validate(parse_json(raw), kind, limits)
        if req["model"] != self.model_name:
            raise APIError(404, f"The model `{req['model']}` does not exist or you do not have access to it.",
                           param="model", code="model_not_found")
        try:
            if kind == "chat":
                req["messages"] = chat_messages(req["messages"], limits)  # text, checked: what the guard scores
                ids = backend.encode_chat(req["messages"])
            else:
                ids = self._completion_prompt(backend, req["prompt"], limits)
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
    def _completion_prompt(backend: Backend, prompt, limits: RequestLimits) -> list[int]:
        if isinstance(prompt, str):
            return backend.encode(prompt)
        ctx = limits.context_length
        if len(prompt) >= ctx:  # before looking at the items: such a list cannot fit, whatever it holds
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your prompt "
                                f"resulted in {len(prompt)} tokens.", param="prompt", code="context_length_exceeded")
        if prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < backend.info.vocab_size for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {backend.info.vocab_size}).", param="prompt")
            return list(prompt)
        if len(prompt) == 1 and isinstance(prompt[0], str):
            if len(prompt[0]) > limits.prompt_chars:
                raise too_long("prompt", prompt[0], limits.prompt_chars)
            return backend.encode(prompt[0])
        raise APIError(400, "prompt must be a string, one string in a list, or a list of token ids "
                            "(one prompt per request).", param="prompt", code="invalid_type")

    def trim_soon(self) -> None:
        """Return the heap a large request freed to the OS shortly after it (serve/limits.trim_heap)."""
        if not self._trim_pending:
            self._trim_pending = True
            asyncio.get_running_loop().call_later(TRIM_DELAY_S, self._trim)

    def _trim(self) -> None:
        self._trim_pending = False
        self.prep_pool.submit(trim_heap)

    def check_api_key(self, request: Request) -> None:
        """401 unless the request carries `Authorization: Bearer <--api-key>` (no key set: everyone is let in)."""
        sent = request.headers.get("authorization", "").encode("utf-8", "replace")
        if self.api_key and not hmac.compare_digest(sent, f"Bearer {self.api_key}".encode()):
            raise APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def busy(self) -> APIError:
        return APIError(429, f"Server busy: {self.admission.running} requests generating and "
                             f"{self.admission.waiting} queued (max_queue {self.max_queue}). Retry later.",
                        type="rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(self.retry_after())})

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained, from the measured service rate (serve/limits.ServiceRate)."""
        return self.rate.retry_after(self.admission.waiting)

    # ---- generation ------------------------------------------------------------------------------------------------
    async def run(self, comp: Completion, stream: AsyncStream) -> AsyncIterator[tuple[str, str | None]]:
        """Yields (text delta, None) while generating, then (last text, finish_reason); records metrics once however
        the request ends (finished, stop string, client gone = "cancelled", failure)."""
        arrival = time.monotonic()
        finish, failed = None, False
        try:
            async for piece in stream:
                if comp.completion_tokens == 0:
                    self.metrics.ttft.observe(time.monotonic() - arrival)
                    self.metrics.prompt_tokens.inc(comp.prompt_tokens)
                comp.completion_tokens += len(piece.steps)
                self.metrics.generation_tokens.inc(len(piece.steps))
                for s in piece.steps:
                    if not s.is_prompt_step:
                        self.metrics.tpot.observe(s.step_seconds)
                finish = piece.finish_reason
                yield piece.text, finish
                if finish:
                    return
        except Exception:
            failed = True
            raise
        finally:
            if not failed:  # before the stream is closed: a scrape that sees the slot free sees this request counted
                self.metrics.e2e.observe(time.monotonic() - arrival)
                self.metrics.success(finish or "cancelled")
            await stream.aclose()

    async def stream_sse(self, comp: Completion, stream: AsyncStream, include_usage: bool):
        if comp.kind == "chat":
            yield sse(comp.chunk(None, first=True))
        try:
            async for text, finish in self.run(comp, stream):
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

    async def complete(self, comp: Completion, stream: AsyncStream) -> dict:
        parts, finish = [], "cancelled"
        try:
            async for text, f in self.run(comp, stream):
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
        return await self.start(request, await self.admit(request, kind))

    async def admit(self, request: Request, kind: str) -> tuple[Completion, list[int], GenerationParams, dict]:
        """Everything before generation, cheapest refusal first: loaded (503), a queue place (429), the body within
        the model's bound (413/408), then parsed, validated, the model looked up (404) and tokenized on a prep
        thread. The guard (serve/guard.py) scores only what got through here."""
        backend = self.require_ready()  # first: the body's size bound comes from the model's context
        if self.admission.full():
            raise self.busy()  # before reading and tokenizing a body that could not be admitted anyway
        raw = await read_body(request, RequestLimits(backend.info.context_length).body_bytes, self.body_timeout_s)
        if len(raw) >= TRIM_ABOVE_BYTES:
            self.trim_soon()
        return await asyncio.get_running_loop().run_in_executor(self.prep_pool, self.prepare, raw, kind, backend)

    async def start(self, request: Request, prepared: tuple[Completion, list[int], GenerationParams, dict]) -> Response:
        comp, ids, params, req = prepared
        try:
            stream = AsyncStream(Run(self.scheduler.submit(ids, params), stop_list(req["stop"])))
        except QueueFull:
            raise self.busy() from None
        if req["stream"]:
            include_usage = bool((req["stream_options"] or {}).get("include_usage"))
            body = self.stream_sse(comp, stream, include_usage)
            return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"},
                                     background=BackgroundTask(_close_stream, body, stream))
        return JSONResponse(await self.complete_unless_gone(request, comp, stream))

    async def complete_unless_gone(self, request: Request, comp: Completion, stream: AsyncStream) -> dict:
        """Non-streaming: poll for a client that hung up and cancel its generation (streams notice it themselves)."""
        task = asyncio.ensure_future(self.complete(comp, stream))
        if await done_unless_gone(request, task):
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return {}  # nobody is listening


async def _close_stream(body, stream: AsyncStream) -> None:
    """Runs after the response ends, also when the client left: stop the worker, finalize the generators now (a
    stream whose body was never iterated gives its queue place back)."""
    stream.cancel()
    await body.aclose()
    await stream.aclose()


def create_app(backend: Backend | Callable[[], Backend], model_name: str, api_key: str | None = None,
               max_queue: int = DEFAULT_MAX_QUEUE, max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
               stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S, metrics_auth: bool = False,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               on_failure: Callable[[BaseException], None] | None = None, guard=None) -> FastAPI:
    """The ASGI app. `backend` is a loaded Backend, or a zero-argument loader run in a thread at startup (then
    /health answers 503 "Loading model" until it returns). `stream_interval_s`: minimum time between two SSE
    chunks of one stream (0 = one chunk per token). `metrics_auth`: /metrics needs the API key too.
    `on_failure(exc)`: called (from any thread) when the model fails to load or the backend fails its probe."""
    srv = Server(backend, model_name, api_key, max_queue, max_concurrency, stream_interval_s, body_timeout_s,
                 on_failure, metrics_auth)

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

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: Exception):
        log.info("client hung up before its request to %s was read", request.url.path)
        srv.metrics.error(499)
        return Response(status_code=499)  # nobody reads it: the status is for the access log

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("unexpected error in %s", request.url.path, exc_info=e)
        srv.metrics.error(500)
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    _add_routes(app, srv)
    if guard is not None:  # ShieldGemma beside the chat model: /v1/moderations, guarded chat (serve/guard.py)
        from trt_gemma.serve.guard import install_guard

        install_guard(app, srv, guard)
    return app


def _add_routes(app: FastAPI, srv: Server) -> None:
    async def auth(request: Request) -> None:
        """--api-key guards /v1 (and /metrics with metrics_auth); /health stays open for probes, /metrics by
        default (as vLLM and NIM do: it holds counts and byte sizes, no request text; Prometheus can send the key
        with `authorization: {credentials_file: ...}`). A dependency rather than an HTTP middleware, which would
        sit in the path of every streamed chunk."""
        srv.check_api_key(request)

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

    @app.get("/metrics", dependencies=[Depends(auth)] if srv.metrics_auth else [])
    async def metrics():
        body = await asyncio.get_running_loop().run_in_executor(None, srv.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    @v1.get("/telemetry")
    async def telemetry():
        snap = await asyncio.get_running_loop().run_in_executor(None, snapshot, srv.backend)
        if "model" in snap:  # the id clients send (--model-name), not the directory the weights came from
            snap["model"]["name"] = srv.model_name
        return snap

    app.include_router(v1)


def run_server(model_path, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
               api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
               log_level: str = "info", header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S,
               keep_alive_timeout_s: int = DEFAULT_KEEP_ALIVE_TIMEOUT_S,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S,
               max_connections: int | None = None, exit_on_load_failure: bool | None = None,
               metrics_auth: bool = False, guard=None, backend: str = "auto", device: str = "cpu",
               prefill_chunk: int | None = None) -> None:
    """Serve `model_path` (any dir `load_backend` accepts) on `backend` (backends.BACKENDS); the port opens before
    the model finishes loading.
    `exit_on_load_failure`: None = on when a supervisor restarts the process (serve/conn.supervisor); then a model
    that fails to load (or a backend that fails its health probe) stops the server and raises the error here, instead
    of leaving it up with /health 503. `max_connections`: None = from the process's file limit."""
    import uvicorn

    from trt_gemma.runtime.backends import detect_kind, load_backend

    detect_kind(Path(model_path))  # a wrong path fails here, before the port opens
    check_bindable(host, port)  # a busy port is a typed error here, not uvicorn's exit after the model loads
    why = supervisor() if exit_on_load_failure is None else None
    if exit_on_load_failure is None:
        exit_on_load_failure = why is not None
    failures: list[BaseException] = []
    servers: list[uvicorn.Server] = []

    def stop(e: BaseException) -> None:
        failures.append(e)
        servers[0].should_exit = True  # uvicorn polls it; the error is raised below once it has shut down

    name = model_name or Path(model_path).name
    app = create_app(lambda: load_backend(model_path, slots=max_concurrency, backend=backend, device=device,
                                          prefill_chunk=prefill_chunk), name, api_key=api_key,
                     max_queue=max_queue, max_concurrency=max_concurrency, stream_interval_s=stream_interval_s,
                     metrics_auth=metrics_auth, body_timeout_s=body_timeout_s,
                     on_failure=stop if exit_on_load_failure else None, guard=guard)
    install_repeat_filter()
    raise_nofile_limit()  # before the connection limit is derived from it
    server = uvicorn.Server(uvicorn_config(app, host, port, header_timeout=header_timeout_s,
                                           keep_alive_timeout=keep_alive_timeout_s, max_connections=max_connections,
                                           log_level=log_level))
    servers.append(server)
    if why:
        log.info("supervised by %s: a model that fails to load stops the server (--no-exit-on-load-failure: "
                 "stay up with /health 503)", why)
    server.run()
    if failures:
        e = failures[0]
        if isinstance(e, TrtGemmaError):
            raise e
        raise ResourceError(f"the model backend failed: {type(e).__name__}: {e}",
                            fix="see the log above; with --no-exit-on-load-failure the server stays up "
                                "with /health 503 instead") from e
