"""OpenAI wire format for the server: request validation (one field table), error envelopes, response and chunk
shapes, stop-string matching. No I/O here, so every rule is unit-testable.

Error envelope (docs/facts/serving-telemetry.md §6, the `openai` client's APIError fields):
  {"error": {"message": str, "type": str, "param": str|None, "code": str|None}}
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

_NUMBER = (int, float)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Field:
    types: tuple  # accepted JSON types (bool is never accepted as int/float)
    default: Any = None
    check: Callable[[Any], str | None] | None = None  # returns why the value is invalid
    required: bool = False


def _range(lo, hi, lo_open=False):
    def check(v):
        if v is None:
            return None
        ok = (lo < v if lo_open else lo <= v) and v <= hi
        return None if ok and math.isfinite(v) else f"must be in {'(' if lo_open else '['}{lo}, {hi}]"
    return check


def _zero_only(what):
    return lambda v: None if v in (None, 0, 0.0) else f"{what} is not supported by this server"


def _stop(v):
    if v is None or isinstance(v, str):
        return None
    if isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v):
        return None
    return "must be a string or a list of at most 4 strings"


def _stream_options(v):
    if v is None:
        return None
    if not set(v) <= {"include_usage"}:
        return "the only key is include_usage"
    return None if isinstance(v.get("include_usage", False), bool) else "include_usage must be true or false"


_COMMON = {
    "model": Field((str,), required=True),
    "max_tokens": Field((int, type(None)), check=lambda v: None if v is None or v >= 1 else "must be >= 1"),
    "temperature": Field(_NUMBER + (type(None),), 1.0, _range(0, 2)),
    "top_p": Field(_NUMBER + (type(None),), 1.0, _range(0, 1, lo_open=True)),
    "top_k": Field((int, type(None)), 0, lambda v: None if v is None or v >= -1 else "must be >= -1 (-1 or 0 = off)"),
    # unsigned 64-bit: TRT-LLM's SamplingConfig seed and numpy's Generator both refuse negatives
    "seed": Field((int, type(None)), check=lambda v: None if v is None or 0 <= v < 2**64 else "must be in [0, 2^64)"),
    "stream": Field((bool, type(None)), False),
    "stream_options": Field((dict, type(None)),
                            check=_stream_options),
    "stop": Field((str, list, type(None)), check=_stop),
    "n": Field((int, type(None)), 1, lambda v: None if v in (None, 1) else "only n=1 is supported"),
    "user": Field((str, type(None))),
    "ignore_eos": Field((bool, type(None)), False),  # TRT-LLM / vLLM extension
    "presence_penalty": Field(_NUMBER + (type(None),), 0, _zero_only("presence_penalty")),
    "frequency_penalty": Field(_NUMBER + (type(None),), 0, _zero_only("frequency_penalty")),
    "logprobs": Field((bool, int, type(None)), check=lambda v: None if not v else "logprobs are not supported"),
    "logit_bias": Field((dict, type(None)), check=lambda v: None if not v else "logit_bias is not supported"),
}
SCHEMAS = {
    "chat": {**_COMMON, "messages": Field((list,), required=True),
             "max_completion_tokens": Field((int, type(None)),
                                            check=lambda v: None if v is None or v >= 1 else "must be >= 1"),
             "top_logprobs": Field((int, type(None)), check=_zero_only("top_logprobs"))},
    "completion": {**_COMMON, "prompt": Field((str, list), required=True),
                   "echo": Field((bool, type(None)), False, lambda v: None if not v else "echo is not supported"),
                   "suffix": Field((str, type(None)), check=lambda v: None if v is None else "suffix is not supported"),
                   "best_of": Field((int, type(None)), check=lambda v: None if v in (None, 1) else "only best_of=1")},
}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: arrays/objects nested thousands deep
        raise APIError(400, f"We could not parse the JSON body of your request ({e}).") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:  # a lone "\ud800" escape decodes to a str no tokenizer or UTF-8 response can hold
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        raise APIError(400, "The JSON body holds a lone UTF-16 surrogate escape (e.g. \"\\ud800\"): "
                            "strings must be valid Unicode.") from None
    return body


def validate(body: dict, kind: str) -> dict:
    """Typed, range-checked fields with defaults filled in; APIError(400, param=field) otherwise."""
    schema = SCHEMAS[kind]
    for name in body:
        if name not in schema:
            raise APIError(400, f"Unrecognized request argument supplied: {name}", param=name)
    out = {}
    for name, f in schema.items():
        if name not in body:
            if f.required:
                raise APIError(400, f"Missing required parameter: '{name}'.", param=name,
                               code="missing_required_parameter")
            out[name] = f.default
            continue
        v = body[name]
        if isinstance(v, bool) and bool not in f.types or not isinstance(v, f.types):
            names = "/".join(t.__name__.replace("NoneType", "null") for t in f.types)
            raise APIError(400, f"Invalid type for '{name}': expected {names}, got {type(v).__name__}.",
                           param=name, code="invalid_type")
        why = f.check(v) if f.check else None
        if why:
            raise APIError(400, f"Invalid value for '{name}': {why}.", param=name, code="invalid_value")
        out[name] = f.default if v is None and f.default is not None else v
    if out["stream_options"] is not None and not out["stream"]:
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    return out


def chat_messages(messages: list) -> list[dict]:
    """Messages as {"role", "content": str}; text content parts are joined (images etc. are refused)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}] needs a role of system, user or assistant.", param=f"messages.[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported.",
                               param=f"messages.[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string.", param=f"messages.[{i}].content",
                           code="invalid_type")
        out.append({"role": m["role"], "content": content})
    if not out:
        raise APIError(400, "messages must not be empty.", param="messages")
    return out


def stop_list(stop) -> list[str]:
    return [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]


class StopMatcher:
    """Withholds text that could still become a stop string; cuts the text before the first stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.buf = stops, ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, stopped)."""
        if not self.stops:
            return text, False
        self.buf += text
        hits = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buf = self.buf[:min(hits)], ""
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buf.endswith(s[:k])), default=0)
        out, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


@dataclass
class Completion:
    """What a finished (or streaming) request has produced so far; builds the OpenAI objects."""

    kind: str  # "chat" | "completion"
    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def response(self, text: str, finish_reason: str) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.object_id, "object": obj, "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage()}


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()
