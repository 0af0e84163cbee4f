"""ShieldGemma beside the chat model in `trt-gemma serve --guard SHIELD`: `/v1/moderations` and guarded chat.

Registered into the app by one hook in serve.create_app (`install_guard`); everything else lives here. The guard
scores on the CPU backend `auto` picks (safety.load_moderator: onnxruntime where installed, else the reference).

- `POST /v1/moderations` takes OpenAI's request (`input`: a string, a list of strings, or a list of
  `{"type": "text", "text": ...}` parts) and answers OpenAI's shape: one `results[]` entry per input with `flagged`,
  `categories`, `category_scores` and `category_applied_input_types`, keyed by our four policy ids (dangerous, hate,
  sexual, harassment; trt_gemma/safety.py). Each input costs one prefill per policy, so a request holds at most
  MAX_MODERATION_INPUTS inputs (more: 400 naming the limit).
- Guarded chat (`--guard-mode block|annotate`): the last user message is scored before generation (prompt-only
  template). block: a flagged prompt is answered with an OpenAI-shaped 400 naming the policies; annotate: the scores
  are added to the response in the shape of OpenAI's moderated chat completions (`moderation.input` /
  `moderation.output`, each `moderation_results` or an `error` entry when not checked; on streams the same JSON is
  the `x-trt-gemma-moderation` header).
  `--guard-response` also scores the completion (prompt-response template), which needs the whole text: streamed
  requests are refused with 400 then.
- /metrics: `guard_latency_seconds{stage}` and `guard_verdicts_total{stage, verdict}`; the guard's weights appear as
  `memory_bytes{kind="guard_weights"}`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter, Histogram

from trt_gemma.errors import InputError, TrtGemmaError
from trt_gemma.safety import POLICIES, Moderator, Verdict
from trt_gemma.serve.conn import DEFAULT_BODY_BYTES, read_body
from trt_gemma.serve.protocol import APIError, parse_json

log = logging.getLogger("trt_gemma.serve.app")
MAX_MODERATION_INPUTS = 32
GUARD_MODES = ("block", "annotate")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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


class Guard:
    def __init__(self, moderator: Moderator | Callable[[], Moderator], mode: str = "block",
                 check_response: bool = False):
        check_mode(mode)
        self.mode, self.check_response = mode, check_response
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trt-gemma-guard")
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
                   cfg.check_response)

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
    def weight_bytes(self) -> int:
        return self.moderator.weight_bytes if self.moderator is not None else 0


class _GuardMetrics:
    def __init__(self, registry, model_name: str):
        self.model_name = model_name
        self.latency = Histogram("guard_latency_seconds", "Guard (ShieldGemma) scoring time per checked text.",
                                 ["model_name", "stage"], buckets=LATENCY_BUCKETS, registry=registry)
        self.verdicts = Counter("guard_verdicts", "Guard verdicts by stage (prompt, response, moderation).",
                                ["model_name", "stage", "verdict"], registry=registry)

    def record(self, stage: str, v: Verdict) -> None:
        self.latency.labels(self.model_name, stage).observe(v.seconds)
        self.verdicts.labels(self.model_name, stage, "flagged" if v.flagged else "ok").inc()


def install_guard(app: FastAPI, srv, guard: Guard | GuardConfig) -> Guard:
    """Add /v1/moderations and the guarded chat route to `app` (built by serve.create_app around `srv`)."""
    guard = guard if isinstance(guard, Guard) else Guard.from_config(guard)
    routes = _GuardRoutes(srv, guard)
    srv.extra_memory["guard_weights"] = lambda: guard.weight_bytes
    app.state.guard = guard
    app.add_api_route("/v1/moderations", routes.moderations, methods=["POST"])
    app.add_api_route("/v1/chat/completions", routes.chat, methods=["POST"])
    guarded = app.router.routes.pop()  # ahead of the plain chat route: the first matching route answers
    app.router.routes.insert(0, guarded)
    return guard


class _GuardRoutes:
    def __init__(self, srv, guard: Guard):
        self.srv, self.guard = srv, guard
        self.metrics = _GuardMetrics(srv.metrics.registry, srv.model_name)

    async def read_body(self, request: Request) -> bytes:
        """The server's bounded reader (413 over the limit, 408 when too slow); the chat handler re-checks the
        replayed body against the model's own limit."""
        return await read_body(request, DEFAULT_BODY_BYTES, self.srv.body_timeout_s)

    async def moderator(self) -> Moderator:
        return await asyncio.get_running_loop().run_in_executor(None, self.guard.ready)

    async def score(self, stage: str, prompt: str, response: str | None = None) -> Verdict:
        mod = await self.moderator()
        try:  # one guard thread: checks queue there instead of competing with generation for the cores
            v = await asyncio.get_running_loop().run_in_executor(self.guard.pool, mod.score, prompt, response)
        except TrtGemmaError as e:
            raise APIError(400, f"guard: {e.message}", param="input" if stage == "moderation" else "messages",
                           code="guard_input_invalid") from None
        self.metrics.record(stage, v)
        return v

    async def moderations(self, request: Request):
        self.srv.check_api_key(request)  # the same check as the server's /v1 routes
        inputs = moderation_inputs(parse_json(await self.read_body(request)))
        verdicts = [await self.score("moderation", text) for text in inputs]
        return {"id": f"modr-{uuid.uuid4().hex}", "model": (await self.moderator()).name,
                "results": [moderation_result(v) for v in verdicts]}

    async def chat(self, request: Request):
        """Score the prompt (block or annotate), generate through the server's own chat handler, then score the
        completion with --guard-response."""
        self.srv.check_api_key(request)  # the same check as the server's /v1 routes
        raw = await self.read_body(request)
        body = parse_json(raw)
        prompt, stream, guard = last_user_text(body), body.get("stream") is True, self.guard
        if guard.check_response and stream:
            raise APIError(400, "This server checks completions with its guard (--guard-response), which needs the "
                                "whole text: send stream: false.", param="stream", code="unsupported_value")
        name = (await self.moderator()).name
        found = {"input": _not_checked("the request has no user message"),
                 "output": _not_checked("this server checks prompts only (start it with --guard-response)")}
        if prompt is not None:
            found["input"] = self.check("prompt", await self.score("prompt", prompt), name)
        resp = await self.srv.handle(_replay(request, raw), "chat")
        if stream or not isinstance(resp, JSONResponse) or resp.status_code != 200:
            if guard.mode == "annotate":
                resp.headers["x-trt-gemma-moderation"] = json.dumps(found, separators=(",", ":"))
            return resp
        data = json.loads(bytes(resp.body))
        if guard.check_response and prompt is not None and data.get("choices"):
            text = data["choices"][0]["message"].get("content") or ""
            found["output"] = self.check("completion", await self.score("response", prompt, text), name)
        if guard.mode == "annotate":
            data["moderation"] = found
        return JSONResponse(data)

    def check(self, what: str, verdict: Verdict, name: str) -> dict:
        """Block mode: a flagged text ends the request here. Otherwise: the result for the annotation."""
        if self.guard.mode == "block" and verdict.flagged:
            raise _blocked(what, verdict)
        return moderation_results(verdict, name)


def _replay(request: Request, raw: bytes) -> Request:
    """A request whose body is `raw` again (ours was read to score the prompt)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await request.receive()  # after the body: disconnect notices come from the real client

    return Request(request.scope, receive)


def _blocked(what: str, verdict: Verdict) -> APIError:
    names = ", ".join(f"{POLICIES[p].name} ({verdict.scores[p]:.2f} >= {verdict.thresholds[p]:g})"
                      for p in verdict.violated)
    return APIError(400, f"The {what} was flagged by this server's safety guard: {names}.",
                    param="messages", code="content_policy_violation")


def last_user_text(body: dict) -> str | None:
    """The text the guard checks: the last user message's content (a string, or its text parts joined as the chat
    handler joins them). None when there is none or it is malformed: the chat handler then answers the validation
    error itself."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        return None
    content = users[-1].get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    return content if isinstance(content, str) else None


def moderation_inputs(body: dict) -> list[str]:
    """OpenAI's `input`: a string, a list of strings, or a list of text parts; bounded to MAX_MODERATION_INPUTS."""
    x = body.get("input")
    if isinstance(x, str):
        return [x]
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
