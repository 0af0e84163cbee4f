"""ShieldGemma beside the chat model in `trt-gemma serve --guard SHIELD`: `/v1/moderations` and guarded chat.

Registered into the app by one hook in serve.create_app (`install_guard`); everything else lives here. The guard
scores on the CPU backend `auto` picks (safety.load_moderator: onnxruntime where installed, else the reference).

- `POST /v1/moderations` takes OpenAI's request (`input`: a string, a list of strings, or a list of
  `{"type": "text", "text": ...}` parts) and answers OpenAI's shape: one `results[]` entry per input with `flagged`,
  `categories`, `category_scores` and `category_applied_input_types`, keyed by our four policy ids (dangerous, hate,
  sexual, harassment; trt_gemma/safety.py). Each input costs one prefill per policy, so a request holds at most
  MAX_MODERATION_INPUTS inputs (more: 400 naming the limit). The body has the chat routes' bound (serve/limits.py).
- Guarded chat (`--guard-mode block|annotate`): the chat request is admitted as any chat request first (503, 429,
  413, 400, 404 unknown model: Server.admit), then every text the client wrote (system, user and assistant
  messages, an assistant prefill included) is scored as one prompt (prompt-only template) before generation.
  block: a flagged prompt is answered with an OpenAI-shaped 400 naming the policies; annotate: the scores are added
  to the response in the shape of OpenAI's moderated chat completions (`moderation.input` / `moderation.output`,
  each `moderation_results` or an `error` entry when not checked; on streams the same JSON is the
  `x-trt-gemma-moderation` header). `--guard-response` also scores the completion (prompt-response template), which
  needs the whole text: streamed requests are refused with 400 then.
- The guard's budget (GuardQueue): one scoring thread; chat checks go ahead of moderation inputs, which are
  scored one policy per job (so a chat check waits for one forward pass at most); at most `max_queue` moderation
  inputs are admitted at once (a request that does not fit: 429 + Retry-After, before its body is read when the
  guard is full); work whose client hung up is dropped (a running check stops before its next policy).
- /metrics: `guard_latency_seconds{stage}`, `guard_verdicts_total{stage, verdict}`, `guard_requests_waiting`,
  `guard_requests_running`, `guard_rejected_total` (429s), `guard_dropped_total` (client gone); the guard's weights
  appear as `memory_bytes{kind="guard_weights"}`.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from trt_gemma.errors import InputError, TrtGemmaError
from trt_gemma.safety import POLICIES, Cancelled, Moderator, Verdict
from trt_gemma.serve.conn import ClientGone, done_unless_gone, read_body
from trt_gemma.serve.limits import TRIM_ABOVE_BYTES, RequestLimits, ServiceRate
from trt_gemma.serve.protocol import APIError, parse_json

log = logging.getLogger("trt_gemma.serve.app")
MAX_MODERATION_INPUTS = 32
DEFAULT_GUARD_QUEUE = MAX_MODERATION_INPUTS  # moderation inputs that may wait: one largest request fits
GUARD_MODES = ("block", "annotate")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CHAT_CHECK, MODERATION = 0, 1  # GuardQueue priorities: lower first
# While chats generate, a moderation job waits this long before it runs: on a CPU host the guard thread and the
# generation share the cores, and an always-busy guard doubled a guarded chat's latency (benchmarks/serve_abuse.py)
MODERATION_YIELD_S = 0.2
YIELD_POLL_S = 0.02


def check_mode(mode: str) -> None:
    if mode not in GUARD_MODES:
        raise InputError(f"--guard-mode {mode!r} is not one of {', '.join(GUARD_MODES)}", fix="block or annotate")


@dataclass(frozen=True)
class GuardConfig:
    """What `trt-gemma serve --guard ...` asks for; the model loads in a background thread at startup."""
    model: str | None  # ShieldGemma dir / hub id / checkpoint; "default" or None: the embedded model
    mode: str = "block"
    check_response: bool = False
    thresholds_file: str | None = None
    backend: str = "auto"  # safety.MODERATION_BACKENDS; auto: onnxruntime where installed, as the chat model's
    max_queue: int = DEFAULT_GUARD_QUEUE  # moderation inputs that may wait for the guard thread

    def check(self) -> None:
        """What can be wrong without loading the weights, as typed errors before the port opens: the mode, the
        thresholds file, a tokenizer without usable Yes/No tokens."""
        from trt_gemma.checkpoint.hf import resolve_model
        from trt_gemma.safety import MODERATION_BACKENDS, answer_tokens, load_thresholds
        from trt_gemma.runtime.tokenizer import GemmaTokenizer

        check_mode(self.mode)
        if self.backend not in MODERATION_BACKENDS:
            raise InputError(f"the guard's backend {self.backend!r} is not one of {', '.join(MODERATION_BACKENDS)}",
                             fix="use auto, reference or onnxruntime")
        load_thresholds(self.thresholds_file)
        answer_tokens(GemmaTokenizer.from_dir(resolve_model(self.model)))


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    fn: Callable[[Callable[[], bool]], Verdict] = field(compare=False)
    future: Future = field(compare=False, default_factory=Future)
    left: threading.Event = field(compare=False, default_factory=threading.Event)  # its client hung up


class GuardQueue:
    """The guard's own admission: one scoring thread (checks queue here instead of competing with generation for
    the cores); chat checks (CHAT_CHECK, already bounded by the chat admission) run before moderation jobs
    (MODERATION; at most `max_queue` moderation inputs admitted at once: `admit` refuses more). A job whose client
    left is skipped; a running one is asked before each policy (Moderator.score's `cancelled`)."""

    def __init__(self, max_queue: int = DEFAULT_GUARD_QUEUE):
        self.max_queue = max(0, max_queue)
        self.rate = ServiceRate(1)  # Retry-After from the measured time per job, as the chat route's
        self.running = self.rejected = self.dropped = 0
        self.inputs = 0  # moderation inputs admitted and not finished
        self.chats_running: Callable[[], bool] = lambda: False  # set by install_guard: the server's generations
        self._heap: list[_Job] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        threading.Thread(target=self._work, name="trt-gemma-guard", daemon=True).start()

    @property
    def waiting(self) -> int:
        return len(self._heap)

    def admit(self, n: int) -> None:
        """Reserve places for `n` moderation inputs (queued or being scored) until `release(n)`, else 429 with
        Retry-After; n = 0 only checks that a place is left (before a body is read)."""
        with self._cv:
            if self.inputs + max(n, 1) <= self.max_queue:
                self.inputs += n
                return
            self.rejected += 1
            held = self.inputs
        raise APIError(429, f"Guard busy: {held} moderation inputs are queued or being scored (at most "
                            f"{self.max_queue}); this request has {n or 'more'}. Retry later.",
                       type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(self.rate.retry_after(self.waiting))})

    def release(self, n: int) -> None:
        with self._cv:
            self.inputs -= n

    def submit(self, fn: Callable[[Callable[[], bool]], Verdict], priority: int) -> _Job:
        job = _Job(priority, next(self._seq), fn)
        with self._cv:
            heapq.heappush(self._heap, job)
            self._cv.notify()
        return job

    def drop(self, job: _Job) -> None:
        """Its client left: a queued job is skipped, a running one stops before its next policy."""
        job.left.set()
        if job.future.cancel():
            self.dropped += 1

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _next(self) -> _Job | None:
        """Under the lock: the next job (None once closed). While chats generate, a moderation job first waits up to
        MODERATION_YIELD_S, giving generation the cores (a chat check arriving meanwhile goes first)."""
        deadline = None
        while True:
            while not self._heap and not self._closed:
                self._cv.wait()
            if self._closed:
                return None
            if self._heap[0].priority == MODERATION and self.chats_running():
                deadline = deadline or time.monotonic() + MODERATION_YIELD_S
                if time.monotonic() < deadline:
                    self._cv.wait(YIELD_POLL_S)
                    continue
            return heapq.heappop(self._heap)

    def _work(self) -> None:
        while True:
            with self._cv:
                job = self._next()
                if job is None:
                    return
                if not job.future.set_running_or_notify_cancel():  # dropped while queued
                    continue
                self.running = 1
            self.rate.started()
            try:
                job.future.set_result(job.fn(job.left.is_set))
            except Cancelled as e:
                self.dropped += 1
                job.future.set_exception(e)
            except BaseException as e:  # handed to the awaiting request (a typed error becomes its 400)
                job.future.set_exception(e)
            finally:
                self.rate.finished()
                with self._cv:
                    self.running = 0


class Guard:
    def __init__(self, moderator: Moderator | Callable[[], Moderator], mode: str = "block",
                 check_response: bool = False, max_queue: int = DEFAULT_GUARD_QUEUE):
        check_mode(mode)
        self.mode, self.check_response = mode, check_response
        self.queue = GuardQueue(max_queue)
        self.moderator: Moderator | None = moderator if isinstance(moderator, Moderator) else None
        self.failure: str | None = None
        self._loaded = threading.Event()
        if self.moderator is not None:
            self._loaded.set()
        else:
            threading.Thread(target=self._load, args=(moderator,), name="trt-gemma-guard-load", daemon=True).start()

    @classmethod
    def from_config(cls, cfg: GuardConfig) -> "Guard":
        from trt_gemma.safety import load_moderator

        model = None if cfg.model in (None, "default") else cfg.model
        return cls(lambda: load_moderator(model, cfg.thresholds_file, backend=cfg.backend), cfg.mode,
                   cfg.check_response, cfg.max_queue)

    def _load(self, loader) -> None:
        try:
            self.moderator = loader()
            log.info("guard %s loaded on the %s backend", self.moderator.name, self.moderator.backend)
            for note in self.moderator.notices:  # e.g. "the embedded model is not a safety classifier"
                log.warning("guard %s: %s", self.moderator.name, note)
        except Exception as e:  # reported on every guarded request, the chat model keeps serving /health
            self.failure = f"{type(e).__name__}: {e}"
            log.error("the guard model failed to load: %s", self.failure)
        finally:
            self._loaded.set()

    def ready(self) -> Moderator:
        """Wait for the guard (worker thread); 503 when it failed to load."""
        self._loaded.wait()
        if self.moderator is None:
            raise APIError(503, f"The guard model failed to load: {self.failure}", type="unavailable_error",
                           code="service_unavailable")
        return self.moderator

    @property
    def loaded(self) -> bool:
        """Loading has ended (the guard is ready, or failed)."""
        return self._loaded.is_set()

    @property
    def weight_bytes(self) -> int:
        return self.moderator.weight_bytes if self.moderator is not None else 0


class _GuardMetrics:
    def __init__(self, registry, model_name: str, queue: GuardQueue):
        self.model_name = m = model_name
        self.latency = Histogram("guard_latency_seconds", "Guard (ShieldGemma) scoring time per checked text.",
                                 ["model_name", "stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.verdicts = Counter("guard_verdicts", "Guard verdicts by stage (prompt, response, moderation).",
                                ["model_name", "stage", "verdict"], registry=registry)
        registry.register(_QueueCollector(m, queue))

    def record(self, stage: str, v: Verdict) -> None:
        self.latency.labels(self.model_name, stage).observe(v.seconds)
        self.verdicts.labels(self.model_name, stage, "flagged" if v.flagged else "ok").inc()


class _QueueCollector:
    """The guard queue's depth and counts, read from the queue at each scrape."""

    def __init__(self, model_name: str, queue: GuardQueue):
        self.model_name, self.queue = model_name, queue

    def collect(self):
        q = self.queue
        for name, doc, value, family in (
                ("guard_requests_waiting", "Guard jobs waiting for the guard thread.", q.waiting, GaugeMetricFamily),
                ("guard_requests_running", "Guard jobs running now (0 or 1).", q.running, GaugeMetricFamily),
                ("guard_rejected", "Moderation requests answered 429 (guard queue full).", q.rejected,
                 CounterMetricFamily),
                ("guard_dropped", "Guard jobs (a chat check, or one policy of a moderation input) dropped because "
                 "their client hung up.", q.dropped,
                 CounterMetricFamily)):
            f = family(name, doc, labels=["model_name"])
            f.add_metric([self.model_name], float(value))
            yield f

    def describe(self):
        return []


def install_guard(app: FastAPI, srv, guard: Guard | GuardConfig) -> Guard:
    """Add /v1/moderations and the guarded chat route to `app` (built by serve.create_app around `srv`)."""
    guard = guard if isinstance(guard, Guard) else Guard.from_config(guard)
    routes = _GuardRoutes(srv, guard)
    srv.extra_memory["guard_weights"] = lambda: guard.weight_bytes
    guard.queue.chats_running = lambda: srv.admission.running > 0
    app.state.guard = guard
    app.add_api_route("/v1/moderations", routes.moderations, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])
    guarded = app.router.routes.pop()  # ahead of the plain chat route: the first matching route answers
    app.router.routes.insert(0, guarded)
    return guard


class _GuardRoutes:
    def __init__(self, srv, guard: Guard):
        self.srv, self.guard = srv, guard
        self.metrics = _GuardMetrics(srv.metrics.registry, srv.model_name, guard.queue)

    async def moderator(self) -> Moderator:
        if self.guard.loaded:  # no thread hop once loaded: a flood of 429s must stay cheap
            return self.guard.ready()
        return await asyncio.get_running_loop().run_in_executor(None, self.guard.ready)

    async def score(self, request: Request, stage: str, texts: list[tuple[str, str | None]]) -> list[Verdict]:
        """Score (prompt, response) pairs on the guard thread; all or nothing: when the client leaves, the rest is
        dropped and the request ends (499). A moderation input is one job per policy (a chat check queued behind it
        waits for one forward pass at most); a chat check is one job."""
        mod, q = await self.moderator(), self.guard.queue
        split = [[p] for p in POLICIES] if stage == "moderation" else [None]
        prio = MODERATION if stage == "moderation" else CHAT_CHECK
        jobs = [q.submit(lambda gone, t=t, r=r, ps=ps: mod.score(t, r, ps, cancelled=gone), prio)
                for t, r in texts for ps in split]
        together = asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs))
        try:
            if not await done_unless_gone(request, together):
                raise ClientGone()
            parts = together.result()
        except TrtGemmaError as e:
            raise APIError(400, f"guard: {e.message}", param="input" if stage == "moderation" else "messages",
                           code="guard_input_invalid") from None
        finally:
            for j in jobs:
                if not j.future.done():
                    q.drop(j)
            together.cancel()
        verdicts = [_merged(parts[i:i + len(split)]) for i in range(0, len(parts), len(split))]
        for v in verdicts:
            self.metrics.record(stage, v)
        return verdicts

    async def moderations(self, request: Request):
        self.srv.check_api_key(request)  # the same check as the server's /v1 routes
        q = self.guard.queue
        q.admit(0)  # a full guard: 429 before the body is read
        mod = await self.moderator()
        limits = RequestLimits(mod.context_length)
        raw = await read_body(request, limits.body_bytes, self.srv.body_timeout_s)  # the chat routes' bound
        if len(raw) >= TRIM_ABOVE_BYTES:
            self.srv.trim_soon()
        inputs = moderation_inputs(parse_json(raw), limits)
        q.admit(len(inputs))
        try:
            verdicts = await self.score(request, "moderation", [(text, None) for text in inputs])
        finally:
            q.release(len(inputs))
        return {"id": f"modr-{uuid.uuid4().hex}", "model": mod.name,
                "results": [moderation_result(v) for v in verdicts]}

    async def chat(self, request: Request):
        """Admit as any chat request, score what the client wrote (block or annotate), generate through the
        server's own path, then score the completion with --guard-response."""
        self.srv.check_api_key(request)  # the same check as the server's /v1 routes
        prepared = await self.srv.admit(request, "chat")  # 503 / 429 / 413 / 400 / 404 before any guard work
        req, guard = prepared[3], self.guard
        if guard.check_response and req["stream"]:
            raise APIError(400, "This server checks completions with its guard (--guard-response), which needs the "
                                "whole text: send stream: false.", param="stream", code="unsupported_value")
        name, prompt = (await self.moderator()).name, client_text(req["messages"])
        found = {"input": self.check("prompt", (await self.score(request, "prompt", [(prompt, None)]))[0], name),
                 "output": _not_checked("this server checks prompts only (start it with --guard-response)")}
        resp = await self.srv.start(request, prepared)
        if req["stream"] or not isinstance(resp, JSONResponse) or resp.status_code != 200:
            if guard.mode == "annotate":
                resp.headers["x-trt-gemma-moderation"] = json.dumps(found, separators=(",", ":"))
            return resp
        data = json.loads(bytes(resp.body))
        if guard.check_response and data.get("choices"):
            text = data["choices"][0]["message"].get("content") or ""
            found["output"] = self.check("completion",
                                         (await self.score(request, "response", [(prompt, text)]))[0], name)
        if guard.mode == "annotate":
            data["moderation"] = found
        return JSONResponse(data)

    def check(self, what: str, verdict: Verdict, name: str) -> dict:
        """Block mode: a flagged text ends the request here. Otherwise: the result for the annotation."""
        if self.guard.mode == "block" and verdict.flagged:
            raise _blocked(what, verdict)
        return moderation_results(verdict, name)


def _merged(parts: list[Verdict]) -> Verdict:
    """The verdicts of one text's per-policy jobs as one."""
    if len(parts) == 1:
        return parts[0]
    return Verdict({p: v for part in parts for p, v in part.scores.items()}, parts[0].thresholds, parts[0].mode,
                   sum(part.seconds for part in parts), [n for part in parts for n in part.prompt_tokens])


def _blocked(what: str, verdict: Verdict) -> APIError:
    names = ", ".join(f"{POLICIES[p].name} ({verdict.scores[p]:.2f} >= {verdict.thresholds[p]:g})"
                      for p in verdict.violated)
    return APIError(400, f"The {what} was flagged by this server's safety guard: {names}.",
                    param="messages", code="content_policy_violation")


def client_text(messages: list[dict]) -> str:
    """Every text the client wrote, as one prompt for the guard: the messages' contents in order (system, user,
    assistant turns and a prefill alike: all of it reaches the model), a blank line between them."""
    return "\n\n".join(m["content"] for m in messages)


def moderation_inputs(body: dict, limits: RequestLimits) -> list[str]:
    """OpenAI's `input`: a string, a list of strings, or a list of text parts; bounded to MAX_MODERATION_INPUTS,
    each to the characters that can fit the guard's context (before anything is tokenized)."""
    x = body.get("input")
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, list) or not x:
        raise APIError(400, "input must be a string or a non-empty list of strings.", param="input",
                       code="invalid_type")
    if len(x) > MAX_MODERATION_INPUTS:
        raise APIError(400, f"Too many inputs: {len(x)}. At most {MAX_MODERATION_INPUTS} inputs per moderation "
                            "request (each one is scored once per policy).", param="input", code="too_many_inputs")
    out = []
    for i, item in enumerate(x):
        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
            item = item["text"]
        if not isinstance(item, str):
            raise APIError(400, f"input[{i}] must be a string or a text part (images are not supported by "
                                "ShieldGemma 2b).", param=f"input.[{i}]", code="invalid_type")
        if len(item) > limits.prompt_chars:
            raise APIError(400, f"input[{i}] has {len(item)} characters, more than can fit the guard's context of "
                                f"{limits.context_length} tokens.", param=f"input.[{i}]",
                           code="string_above_max_length")
        out.append(item)
    return out


def moderation_result(v: Verdict) -> dict:
    return {"flagged": v.flagged, "categories": v.flags, "category_scores": v.scores,
            "category_applied_input_types": {p: ["text"] for p in v.scores}}


def moderation_results(v: Verdict, model: str) -> dict:
    """One side of a chat completion's `moderation` field (openai-python 3.57 `types/chat/chat_completion.py`
    `Moderation.input` / `.output`: `moderation_results` holding `moderation_result` entries)."""
    return {"type": "moderation_results", "model": model,
            "results": [{**moderation_result(v), "model": model, "type": "moderation_result"}]}


def _not_checked(why: str) -> dict:
    return {"type": "error", "code": "not_moderated", "message": why}
