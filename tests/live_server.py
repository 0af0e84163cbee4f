"""A real uvicorn server on a free loopback port in a background thread, and the tiny served model (serve tests)."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from trt_gemma.serve_conn import uvicorn_config

SERVE_CONTEXT = 2048  # longer than TINY's 256 so a stream can outlive a client that disconnects


class LiveServer:
    def __init__(self, app, **conn):
        """`conn`: serve_conn.uvicorn_config's connection settings (header_timeout, max_connections, ...)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level="warning", **conn))
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
    """The tiny Gemma 2 (2048-token context) converted to a TensorRT-LLM checkpoint by trt_gemma.convert."""
    from tiny import make_tiny_hf_model

    from trt_gemma.convert import convert_checkpoint

    hf = make_tiny_hf_model(tmp_path_factory.mktemp("serve_hf"), max_position_embeddings=SERVE_CONTEXT)
    out = tmp_path_factory.mktemp("serve_ckpt") / "tiny-gemma2"
    convert_checkpoint(hf, out, dtype=None, show_progress=False)
    return out


def make_backend(ckpt: Path, slots: int):
    from trt_gemma.backends.reference import ReferenceBackend

    return ReferenceBackend.load(ckpt, slots=slots)
