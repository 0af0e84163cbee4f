"""OpenAI wire format for the server: request validation (one field table), error envelopes, response and chunk
shapes, stop-string matching. No I/O here, so every rule is unit-testable.

Every string, list and object field has a size bound (`Field.bound`, see serve/limits.py), checked before its value
is looked at: the work a request causes is bounded by its size, and its size is bounded by the model's context.

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

from trt_gemma.serve.limits import (MAX_CONTENT_PARTS, MAX_ID_CHARS, MAX_NAME_CHARS, MAX_STOP_CHARS, MAX_STOP_STRINGS,
                                    RequestLimits)

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
    # most characters (str) / items (list) / keys (dict): an int, a function of the request limits, or a dict of
    # those by type when the field takes several
    bound: int | Callable[[RequestLimits], int] | dict | None = None

    def limit(self, value, limits: RequestLimits) -> int | None:
        b = self.bound.get(type(value)) if isinstance(self.bound, dict) else self.bound
        return b(limits) if callable(b) else b


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
    if not all(isinstance(s, str) for s in v):
        return f"must be a string or a list of at most {MAX_STOP_STRINGS} strings"
    long = [i for i, s in enumerate(v) if len(s) > MAX_STOP_CHARS]
    return f"stop[{long[0]}] is longer than {MAX_STOP_CHARS} characters" if long else None


def _stream_options(v):
    if v is None:
        return None
    if not set(v) <= {"include_usage"}:
        return "the only key is include_usage"
    return None if isinstance(v.get("include_usage", False), bool) else "include_usage must be true or false"


_COMMON = {
    "model": Field((str,), required=True, bound=MAX_ID_CHARS),
    "max_tokens": Field((int, type(None)), check=lambda v: None if v is None or v >= 1 else "must be >= 1"),
    "temperature": Field(_NUMBER + (type(None),), 1.0, _range(0, 2)),
    "top_p": Field(_NUMBER + (type(None),), 1.0, _range(0, 1, lo_open=True)),
    "top_k": Field((int, type(None)), 0, lambda v: None if v is None or v >= -1 else "must be >= -1 (-1 or 0 = off)"),
    # unsigned 64-bit: TRT-LLM's SamplingConfig seed and numpy's Generator both refuse negatives
    "seed": Field((int, type(None)), check=lambda v: None if v is None or 0 <= v < 2**64 else "must be in [0, 2^64)"),
    "stream": Field((bool, type(None)), False),
    "stream_options": Field((dict, type(None)), check=_stream_options, bound=1),
    "stop": Field((str, list, type(None)), check=_stop,  # each string of a list is checked by _stop
                  bound={str: MAX_STOP_CHARS, list: MAX_STOP_STRINGS}),
    "n": Field((int, type(None)), 1, lambda v: None if v in (None, 1) else "only n=1 is supported"),
    "user": Field((str, type(None)), bound=MAX_ID_CHARS),
    "ignore_eos": Field((bool, type(None)), False),  # TRT-LLM / vLLM extension
    "presence_penalty": Field(_NUMBER + (type(None),), 0, _zero_only("presence_penalty")),
    "frequency_penalty": Field(_NUMBER + (type(None),), 0, _zero_only("frequency_penalty")),
    "logprobs": Field((bool, int, type(None)), check=lambda v: None if not v else "logprobs are not supported"),
    "logit_bias": Field((dict, type(None)), check=lambda v: None if not v else "logit_bias is not supported",
                        bound=MAX_ID_CHARS),
}
SCHEMAS = {
    "chat": {**_COMMON, "messages": Field((list,), required=True, bound=lambda lim: lim.messages),
             "max_completion_tokens": Field((int, type(None)),
                                            check=lambda v: None if v is None or v >= 1 else "must be >= 1"),
             "top_logprobs": Field((int, type(None)), check=_zero_only("top_logprobs"))},
    # a list prompt is token ids (the context check follows in the server) or one string (checked there too)
    "completion": {**_COMMON, "prompt": Field((str, list), required=True, bound=lambda lim: lim.prompt_chars),
                   "echo": Field((bool, type(None)), False, lambda v: None if not v else "echo is not supported"),
                   "suffix": Field((str, type(None)), check=lambda v: None if v is None else "suffix is not supported",
                                   bound=lambda lim: lim.prompt_chars),
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


def too_long(param: str, value, limit: int) -> APIError:
    """OpenAI's codes for an over-long string / array (its own 400s use these names)."""
    what, code = ("characters", "string_above_max_length") if isinstance(value, str) else \
        ("items", "array_above_max_length")
    return APIError(400, f"Invalid '{param}': {len(value)} {what}, more than the maximum of {limit}.",
                    param=param, code=code)


def validate(body: dict, kind: str, limits: RequestLimits) -> dict:
    """Typed, size-bounded, range-checked fields with defaults filled in; APIError(400, param=field) otherwise."""
    schema = SCHEMAS[kind]
    for name in body:
        if name not in schema:
            raise APIError(400, f"Unrecognized request argument supplied: {name[:MAX_ID_CHARS]}",
                           param=name[:MAX_ID_CHARS])
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
        limit = f.limit(v, limits) if isinstance(v, (str, list, dict)) else None
        if limit is not None and len(v) > limit:
            raise too_long(name, v, limit)
        why = f.check(v) if f.check else None
        if why:
            raise APIError(400, f"Invalid value for '{name}': {why}.", param=name, code="invalid_value")
        out[name] = f.default if v is None and f.default is not None else v
    if out["stream_options"] is not None and not out["stream"]:
        raise APIError(400, "stream_options is only allowed when stream is true.", param="stream_options")
    return out


_MESSAGE_KEYS = {"role", "content", "name"}


def _message_content(i: int, m) -> str:
    """One message's text, its keys and sizes checked before its parts are read."""
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
        raise APIError(400, f"messages[{i}] needs a role of system, user or assistant.", param=f"messages.[{i}]")
    if not _MESSAGE_KEYS.issuperset(m):  # stops at the first unknown key
        key = next(k for k in m if k not in _MESSAGE_KEYS)[:MAX_ID_CHARS]
        raise APIError(400, f"messages[{i}]: unrecognized key '{key}' (allowed: content, name, role).",
                       param=f"messages.[{i}].{key}")
    name = m.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
        raise APIError(400, f"messages[{i}].name must be a string of at most {MAX_NAME_CHARS} characters.",
                       param=f"messages.[{i}].name", code="invalid_value")
    content = m.get("content")
    param = f"messages.[{i}].content"
    if isinstance(content, list):
        if len(content) > MAX_CONTENT_PARTS:
            raise too_long(param, content, MAX_CONTENT_PARTS)
        if not all(isinstance(p, dict) and len(p) == 2 and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, f"messages[{i}].content: only text parts ({{type: text, text}}) are supported.",
                           param=param)
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string.", param=param, code="invalid_type")
    return content


def chat_messages(messages: list, limits: RequestLimits) -> list[dict]:
    """Messages as {"role", "content": str}; text content parts are joined (images etc. are refused). The total text
    is bounded by `limits.prompt_chars` (the message count was bounded by `validate`)."""
    out, total = [], 0
    for i, m in enumerate(messages):
        content = _message_content(i, m)
        total += len(content)
        if total > limits.prompt_chars:
            raise APIError(400, f"Invalid 'messages': more than {limits.prompt_chars} characters of text in all, "
                                f"which cannot fit in this model's {limits.context_length}-token context.",
                           param="messages", code="context_length_exceeded")
        out.append({"role": m["role"], "content": content})
    if not out:
        raise APIError(400, "messages must not be empty.", param="messages")
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
