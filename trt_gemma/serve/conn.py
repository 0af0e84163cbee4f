"""Connection-level defences of the server: header and body timeouts, a connection limit that sheds idle sockets,
repeated log lines collapsed, and the supervisor detection behind `--exit-on-load-failure`.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but a connection that has not sent a
complete request yet has no timer at all (nor one that keeps sending a byte at a time): 3,000 such sockets were held
for minutes, and 300 of them exhausted a 256-file limit and locked every client out. `uvicorn.Config` offers
`limit_concurrency`, which answers 503 to new *requests* but still accepts and keeps the idle sockets. So the HTTP
protocol here is uvicorn's h11 one with two additions:
  * header timeout: from the moment a connection opens (or its previous response ends) the complete request headers
    must arrive within `header_timeout` seconds, or the connection is closed;
  * connection limit: a new connection beyond `max_connections` closes the oldest connection that has not sent a
    complete request yet (an idle socket, a slow-loris one), else the oldest keep-alive one between two requests;
    only when every connection is inside a request is the new one closed instead. A client that sends its request
    promptly is never starved by sockets that do not, and a kept-alive client (a prober, a scraper) goes last.
The body then has `body_timeout` seconds to arrive (`read_body`, answered 408).
"""
from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

from trt_gemma.errors import ResourceError
from trt_gemma.serve.protocol import APIError

log = logging.getLogger("trt_gemma.serve.app")
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_KEEP_ALIVE_TIMEOUT_S = 5  # uvicorn's own default
DEFAULT_BODY_TIMEOUT_S = 30.0
DEFAULT_BODY_BYTES = 1 << 20  # for routes without a model-derived bound (the generation routes use RequestLimits)
LOG_REPEAT_INTERVAL_S = 10.0
_FD_RESERVE = 64  # model files, log files, executor threads' pipes, the listening socket


class ClientGone(Exception):
    """The client hung up (or broke the HTTP framing) before its request was read: a client fault, not a 500."""


def _nofile() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(nofile: int | None = None) -> int:
    """What fits in the process's file limit next to a reserve, at most 1024. (asyncio accepts every pending socket
    before any reaches the protocol, so a burst can still touch the limit: asyncio then pauses accepting for 1 s and
    logs it once, and the shedding here brings the count back down. A smaller listen backlog would cap that burst,
    but Linux then drops SYNs and every client connecting in a burst waits a 1 s retransmit.)"""
    nofile = nofile or _nofile()
    return max(8, min(1024, nofile - _FD_RESERVE))


def guarded_h11_protocol(header_timeout: float, max_connections: int) -> type:
    """uvicorn's h11 protocol with the header timeout and the connection limit (see the module docstring)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # connections waiting for request headers, oldest first: those that never sent a request, then kept-alive ones
    fresh: OrderedDict = OrderedDict()
    kept: OrderedDict = OrderedDict()

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _served = False  # has completed a request: evicted after the fresh ones

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                victim = next(iter(fresh), None) or next(iter(kept), None)
                if victim is None:  # every connection is inside a request: refuse the new one
                    log.warning("connection limit (%d) reached and every connection is busy: closing a new one",
                                max_connections)
                    self.transport.close()
                    return
                log.warning("connection limit (%d) reached: closing the oldest connection that has not sent "
                            "its request", max_connections)
                victim._drop()
            self._await_headers()

        def _await_headers(self) -> None:
            self._headers_done()
            (kept if self._served else fresh)[self] = None
            self._header_timer = self.loop.call_later(header_timeout, self._header_timeout)

        def _headers_done(self) -> None:
            fresh.pop(self, None)
            kept.pop(self, None)
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _drop(self) -> None:
            self._headers_done()
            if not self.transport.is_closing():
                self.transport.close()

        def _header_timeout(self) -> None:
            if self.conn.their_state is h11.IDLE:
                log.info("closed a connection that sent no complete request headers within %.0f s", header_timeout)
                self._drop()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._headers_done()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._served = True
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_headers()

        def connection_lost(self, exc) -> None:
            self._headers_done()
            super().connection_lost(exc)

    return GuardedH11Protocol


def raise_nofile_limit(cap: int = 65536) -> int:
    """Raise this process's soft open-file limit to its hard limit (at most `cap`), as Go's runtime does at start:
    systemd's default soft limit is 1024 while the hard one is 524288, and each connection costs one file.
    Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(cap, hard if hard != resource.RLIM_INFINITY else cap)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError):
            pass
    return soft


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000, *, header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
                   keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_TIMEOUT_S, max_connections: int | None = None,
                   log_level: str = "info"):
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_keep_alive=keep_alive_timeout,
                            http=guarded_h11_protocol(header_timeout, max_connections or default_max_connections()))
    uv = logging.getLogger("uvicorn.error")  # configured by Config(): our lines get its format, level and stream
    if uv.handlers or logging.getLogger("uvicorn").handlers:
        log.handlers = list(uv.handlers or logging.getLogger("uvicorn").handlers)
        log.setLevel(uv.level)
        log.propagate = False
    return config


DISCONNECT_POLL_S = 0.5  # how often a request that is not streaming checks that its client is still there


async def done_unless_gone(request, fut: asyncio.Future) -> bool:
    """Wait for `fut`, asking every DISCONNECT_POLL_S whether the client is still there: True when `fut` is done,
    False when the client left first (the caller cancels the work)."""
    while True:
        done, _ = await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
        if done:
            return True
        if await request.is_disconnected():
            return False


async def read_body(request, limit: int = DEFAULT_BODY_BYTES, timeout: float = DEFAULT_BODY_TIMEOUT_S) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or as received), never buffered whole;
    408 when it takes longer than `timeout`; ClientGone when the client hangs up or breaks the chunked framing."""
    from starlette.requests import ClientDisconnect

    too_large = APIError(413, f"Request body too large: the limit is {limit} bytes.", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"The request body did not arrive within {timeout:g} s.", code="request_timeout") from None
    except ClientDisconnect:
        raise ClientGone() from None


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """asyncio's handler, except that running out of file descriptors in accept() (which asyncio reports with a
    traceback and retries after 1 s) is one line saying what to change."""
    exc = context.get("exception")
    if context.get("message", "").startswith("socket.accept() out of system resource") and isinstance(exc, OSError):
        log.warning("accepting connections paused for 1 s: %s (open-file limit %d); lower --max-connections or "
                    "raise the limit (ulimit -n / LimitNOFILE=)", exc.strerror or exc, _nofile())
        return
    loop.default_exception_handler(context)


class RepeatFilter(logging.Filter):
    """Lets one record of a kind (logger, level, first line of the message template) through per `interval`
    seconds; the next one let through says how many were dropped. 300 idle sockets under a 256-file limit wrote 42 MB of identical
    "Too many open files" lines in 10 s."""

    def __init__(self, interval: float = LOG_REPEAT_INTERVAL_S):
        super().__init__()
        self.interval = interval
        self._seen: dict[tuple, list] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:160])  # the template, not the values
        now = time.monotonic()
        entry = self._seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        if len(self._seen) > 1000:  # bounded: kinds are few unless messages embed ever-changing values
            self._seen.clear()
        self._seen[key] = [now, 0]
        if entry is not None and entry[1]:
            record.msg = f"{record.getMessage()} ({entry[1]} more like this in the last {self.interval:.0f} s)"
            record.args = ()
        return True


def install_repeat_filter(interval: float = LOG_REPEAT_INTERVAL_S) -> None:
    """On the loggers that report per-connection events (not the access log: one line per request is its job)."""
    for name in ("asyncio", "uvicorn.error", "trt_gemma.serve.app"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RepeatFilter) for f in logger.filters):
            logger.addFilter(RepeatFilter(interval))


# (environment variable, what sets it) and (file, what creates it): evidence that a supervisor restarts the process.
# INVOCATION_ID: systemd.exec(5) "$INVOCATION_ID"; /.dockerenv: Docker; /run/.containerenv and container=podman:
# Podman; container=...: systemd-nspawn and others (systemd's container interface); KUBERNETES_SERVICE_HOST: every
# Kubernetes pod.
SUPERVISOR_ENV = (("INVOCATION_ID", "systemd"), ("KUBERNETES_SERVICE_HOST", "Kubernetes"), ("container", "a container"))
SUPERVISOR_FILES = ((".dockerenv", "Docker"), ("run/.containerenv", "Podman"))


def supervisor(env: Mapping[str, str] | None = None, root: Path = Path("/")) -> str | None:
    """What restarts this process when it exits (systemd, a container runtime), or None when nothing says so."""
    values = os.environ if env is None else env
    for var, what in SUPERVISOR_ENV:
        if values.get(var):
            return f"{what} (${var} is set)"
    for rel, what in SUPERVISOR_FILES:
        if (root / rel).exists():
            return f"{what} (/{rel} exists)"
    return None


def check_bindable(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind(infos[0][4])
    except OSError as e:
        raise ResourceError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                            fix="choose another --port (or --host), or stop the server already using it") from e
