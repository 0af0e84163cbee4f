"""The server says which backend it loaded, and its telemetry names the model as clients address it (issue 10:
`model.name` was the checkpoint's directory, "checkpoint", while the served name was "demo")."""
from __future__ import annotations

import logging

import httpx

from live_server import LiveServer, make_backend, served_checkpoint  # noqa: F401 (fixture)
from trt_gemma.serve.app import create_app


def test_load_log_names_backend_and_telemetry_uses_served_name(served_checkpoint, caplog):
    app = create_app(lambda: make_backend(served_checkpoint, slots=1), "demo", max_queue=1, max_concurrency=1)
    server = LiveServer(app, log_level="info")
    # uvicorn_config routed the server's logger to uvicorn's handlers (propagate off): listen on it directly
    served_log = logging.getLogger("trt_gemma.serve.app")
    served_log.addHandler(caplog.handler)
    with server as s:
        s.wait_for(lambda _metrics: httpx.get(s.url + "/health").status_code == 200, timeout=60, what="model loaded")
        snap = httpx.get(s.url + "/v1/telemetry").json()
    served_log.removeHandler(caplog.handler)
    assert snap["model"]["name"] == "demo" and snap["model"]["backend"] == "reference"
    loaded = [r.getMessage() for r in caplog.records if r.name == "trt_gemma.serve.app" and "backend" in r.getMessage()]
    assert loaded == [f"serving demo: reference backend, {served_checkpoint}"], loaded
