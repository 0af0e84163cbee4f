"""Bounds on what one request may make the server do, and the service-rate estimate behind Retry-After.

Every string, list and object a client sends has a size bound, checked before any work is done on it (parsing
aside, which the body cap bounds). Bounds tied to the model derive from its context length, so a request that could
fit in the context is never refused by them:
  * prompt characters <= context x 32. A Gemma token is at most a few dozen characters (the longest are runs of
    whitespace); a prompt longer than that cannot fit and would only cost tokenizer time and memory (a 7.5 MB prompt
    took 6-10 s and 1.5 GB to tokenize before it was refused for its length);
  * chat messages <= context / 4 + 1: every turn costs at least 5 template tokens (`<start_of_turn>`, the role,
    `\\n`, `<end_of_turn>`, `\\n`) and only the first may be a (folded-in) system message;
  * body bytes <= 64 KiB + context x 96: the JSON of the longest prompt that can fit, escapes included
    (`\\n` is 2 bytes and a run of 31 of them is one token; a `\\uXXXX` escape is 6 bytes, a surrogate pair 12).
Fixed bounds: at most 4 stop strings (OpenAI's limit) of at most 1024 characters each, ids (`model`, `user`) of at
most 256 characters, a message `name` of at most 64 (OpenAI's limit), at most 256 content parts per message.
"""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

CHARS_PER_TOKEN = 32
BODY_BYTES_PER_TOKEN = 96
BODY_OVERHEAD_BYTES = 64 << 10
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 64
MAX_CONTENT_PARTS = 256
MAX_RETRY_AFTER_S = 600


@dataclass(frozen=True)
class RequestLimits:
    """Size bounds of one request for a model with `context_length` tokens (see the module docstring)."""

    context_length: int

    @property
    def prompt_chars(self) -> int:
        return self.context_length * CHARS_PER_TOKEN

    @property
    def messages(self) -> int:
        return self.context_length // 4 + 1

    @property
    def body_bytes(self) -> int:
        return BODY_OVERHEAD_BYTES + self.context_length * BODY_BYTES_PER_TOKEN


class ServiceRate:
    """Measured service rate of the generation slots, for Retry-After.

    Little's law on the slots: the time-integral of the number of running requests, divided by the number of requests
    that finished, is the mean time a request holds a slot (S). With every slot busy the server finishes
    `slots / S` requests per second, so a queue of `waiting` requests drains in about `(waiting + 1) * S / slots`.
    Both sums decay by `decay` at each finished request, so the estimate follows the recent load (about the last
    1 / (1 - decay) requests). The old estimate multiplied the mean end-to-end latency (which already includes the
    queueing) by the queue depth, and said 16-21 s for a queue that drained in 2-2.5 s.
    Called from the event loop and from worker-thread callbacks: a lock keeps the sums consistent."""

    def __init__(self, slots: int, decay: float = 0.8):
        self.slots, self.decay = max(1, slots), decay
        self._busy = 0.0  # slot-seconds
        self._finished = 0.0
        self._running = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def _advance(self, now: float) -> None:
        self._busy += self._running * (now - self._last)
        self._last = now

    def started(self) -> None:
        with self._lock:
            self._advance(time.monotonic())
            self._running += 1

    def finished(self) -> None:
        with self._lock:
            self._advance(time.monotonic())
            self._running = max(0, self._running - 1)
            self._finished += 1
            self._busy *= self.decay
            self._finished *= self.decay

    def mean_service_s(self) -> float | None:
        """Mean slot-holding time of recent requests; None before any request finished."""
        with self._lock:
            return self._busy / self._finished if self._finished > 0 else None

    def retry_after(self, waiting: int) -> int:
        """Whole seconds until the queue ahead of a new request has likely drained (at least 1)."""
        s = self.mean_service_s()
        if s is None:  # nothing measured yet: the shortest honest answer
            return 1
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil((waiting + 1) * s / self.slots))))


TRIM_ABOVE_BYTES = 64 << 10  # a request body this large (or larger) is followed by a heap trim
TRIM_DELAY_S = 0.5  # after the request's objects are gone; several large requests share one trim


def _load_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call, nothing retained the same way
        return None


_MALLOC_TRIM = _load_malloc_trim()


def trim_heap() -> bool:
    """Give freed heap memory back to the OS. glibc keeps what a thread freed in that thread's arena: after a
    65k-character prompt went through the prep threads and the tokenizer's own threads, the server kept ~40 MiB it
    no longer used (RSS 80 -> 120 MiB, for good); malloc_trim(0) returns it ("frees memory in all arenas", since
    glibc 2.8, man malloc_trim(3)). ctypes releases the GIL for the call. False where there is no malloc_trim."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True
