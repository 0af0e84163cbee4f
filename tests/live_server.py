"""A real uvicorn server on a free loopback port in a background thread, and the tiny served model (serve tests)."""
from __future__ import annotations

import functools
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from trt_gemma.serve.conn import uvicorn_config

SERVE_CONTEXT = 2048  # longer than TINY's 256 so a stream can outlive a client that disconnects


class LiveServer:
    def __init__(self, app, log_level: str = "warning", **conn):
        """`conn`: serve/conn.uvicorn_config's connection settings (header_timeout, max_connections, ...).
        `log_level` also becomes trt_gemma.serve.app's level (uvicorn_config routes that logger to uvicorn's handlers)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level=log_level, **conn))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Prometheus samples keyed by (name, sorted labels without model_name)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
                out[(s.name, labels)] = s.value
        return out

    def wait_for(self, predicate, timeout: float = 20.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if predicate(m):
                return m
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last metrics: {m}")


@pytest.fixture(scope="session")
def served_checkpoint(tmp_path_factory) -> Path:
    """The tiny Gemma 2 (2048-token context) converted to a TensorRT-LLM checkpoint by trt_gemma.checkpoint.convert."""
    from tiny import make_tiny_hf_model

    from trt_gemma.checkpoint.convert import convert_checkpoint

    hf = make_tiny_hf_model(tmp_path_factory.mktemp("serve_hf"), max_position_embeddings=SERVE_CONTEXT)
    out = tmp_path_factory.mktemp("serve_ckpt") / "tiny-gemma2"
    convert_checkpoint(hf, out, dtype=None, show_progress=False)
    return out


def make_backend(ckpt: Path, slots: int):
    from trt_gemma.runtime.reference import ReferenceBackend

    return ReferenceBackend.load(ckpt, slots=slots)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m trt_gemma serve ...` as its own process on a free loopback port, its output in `log`;
    `nofile` caps its open-file limit (the soft and hard RLIMIT_NOFILE of the child only)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, nofile: int | None = None):
        import os
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.args = [sys.executable, "-m", "trt_gemma", "serve", *args, "--port", str(self.port)]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.nofile = nofile
        self.proc = None

    def start(self) -> "ServerProcess":
        import subprocess
        import sys

        args = self.args
        if self.nofile:  # set by a tiny launcher that then execs the server (no preexec_fn in a threaded parent)
            launcher = ("import os, resource, sys; n = int(sys.argv[1]); "
                        "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.executable, sys.argv[2:])")
            args = [sys.executable, "-c", launcher, str(self.nofile), *self.args]
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen(args, stdout=self._out, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_healthy(self, timeout: float = 90.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"server exited {self.proc.returncode}: {self.output()[-3000:]}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not healthy in {timeout} s: {self.output()[-3000:]}"
            time.sleep(0.1)

    metrics = LiveServer.metrics
    wait_for = LiveServer.wait_for

    def output(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc is not None:
            self._out.close()

    def __enter__(self) -> "ServerProcess":
        return self.start().wait_healthy()

    def __exit__(self, *exc) -> None:
        self.stop()


@functools.lru_cache(maxsize=2)
def hostile_requests(context_length: int, model: str) -> dict[str, tuple[str, bytes, int]]:
    """name -> (path, raw JSON body, expected status): one request of each kind that froze the event loop or
    bloated the process before its size was bounded (shared by the tests and benchmarks/serve_abuse.py)."""
    import base64
    import json
    import random

    from trt_gemma.serve.limits import MAX_STOP_CHARS, RequestLimits

    lim = RequestLimits(context_length)
    chat, comp = "/v1/chat/completions", "/v1/completions"
    hi = [{"role": "user", "content": "hi"}]

    def body(**kw) -> bytes:
        return json.dumps({"model": model, **kw}).encode()

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(lim.messages)]
    # text the tokenizer cannot take from its word cache (a repeated word is cheap): random 7-letter words
    words = base64.b64encode(random.Random(0).randbytes(6 << 20)).decode()

    def text(n: int) -> str:
        return " ".join(words[i:i + 7] for i in range(0, n * 7 // 8, 7))[:n]

    stops = [("ab" * MAX_STOP_CHARS)[i:i + MAX_STOP_CHARS] for i in range(4)]
    return {
        "stop_1MB": (chat, body(messages=hi, max_tokens=2, stop="x" * 1_000_000), 413),
        "stop_100k": (chat, body(messages=hi, max_tokens=2, stop="x" * 100_000), 400),
        "4_stops_at_bound": (chat, body(messages=hi, max_tokens=32, stop=stops, ignore_eos=True), 200),
        "prompt_7.5MB": (comp, body(prompt=text(7_500_000), max_tokens=2), 413),
        "prompt_at_char_bound": (comp, body(prompt=text(lim.prompt_chars), max_tokens=2), 400),
        "token_ids_30k": (comp, body(prompt=[1] * 30_000, max_tokens=2), 400),
        "messages_100k": (chat, body(messages=hi * 100_000, max_tokens=2), 413),
        "messages_5k": (chat, body(messages=hi * 5_000, max_tokens=2), 400),
        "messages_at_bound": (chat, body(messages=turns, max_tokens=2), 400),
        "content_parts_5k": (chat, body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 5000}],
                                        max_tokens=2), 400),
        "user_100k": (chat, body(messages=hi, max_tokens=2, user="u" * 100_000), 400),
        "nested_100k": (comp, b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400),
    }


def health_during(url: str, path: str, raw: bytes, headers: dict | None = None, repeat_s: float = 0.0,
                  timeout: float = 120.0) -> tuple[list, list[float]]:
    """Sends the request (again and again for `repeat_s` seconds) on one thread while another polls /health over
    a kept-alive connection; returns (statuses, /health latencies in seconds observed while it ran)."""
    statuses: list = []
    hdrs = {"content-type": "application/json", **(headers or {})}

    def hostile() -> None:
        end = time.monotonic() + repeat_s
        with httpx.Client(timeout=timeout) as c:
            while True:
                try:
                    statuses.append(c.post(url + path, content=raw, headers=hdrs).status_code)
                except httpx.HTTPError as e:  # a refused body may end in a reset: record it, do not hide it
                    statuses.append(type(e).__name__)
                if time.monotonic() >= end:
                    return

    lat: list[float] = []
    with httpx.Client(timeout=timeout) as c:
        c.get(url + "/health")
        t = threading.Thread(target=hostile)
        t.start()
        while True:
            t0 = time.perf_counter()
            c.get(url + "/health")
            lat.append(time.perf_counter() - t0)
            if not t.is_alive():
                break
            time.sleep(0.005)
    t.join()
    return statuses, lat
