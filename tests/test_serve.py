"""The OpenAI-compatible server, for real: uvicorn on a loopback port, the official `openai` client for the happy
paths, raw HTTP (httpx) for the error paths. The model is the tiny Gemma 2 converted by trt_gemma.checkpoint.convert and run by
the reference backend; expected texts come from calling that backend directly (the server must add nothing)."""
from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from live_server import LiveServer, ServerProcess, make_backend, served_checkpoint  # noqa: F401 (fixture)
from trt_gemma.runtime.backends import detect_kind, load_backend
from trt_gemma.runtime.base import GenerationParams
from trt_gemma.errors import DependencyError, InputError
from trt_gemma.gpu_probe import nvml_device_count
from trt_gemma.runtime.reference import ReferenceBackend
from trt_gemma.serve.app import create_app, run_server

MODEL = "tiny-gemma2"
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where does Gemma run?"}]
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def backend(served_checkpoint):
    return make_backend(served_checkpoint, slots=2)


@pytest.fixture(scope="module")
def server(backend):
    with LiveServer(create_app(backend, MODEL, max_queue=4, max_concurrency=2)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def direct(backend, ids, max_tokens, **kw):
    """What the backend itself generates (the independent reference for every served text)."""
    steps = list(backend.stream(ids, GenerationParams(max_tokens=max_tokens, **kw)))
    return "".join(s.text for s in steps), len(steps), steps[-1].finish_reason


def post(server, path, body, **kw):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60, **kw)


def assert_openai_error(r, status, param=None, code=None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- happy paths through the official client ----------------------------------------------------------------------

def test_models_lists_the_served_model(client, backend):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_chat_matches_direct_generation_and_counts_usage(client, backend):
    want, n, finish = direct(backend, backend.encode_chat(MESSAGES), 12, temperature=0.0)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert r.usage.prompt_tokens == len(backend.encode_chat(MESSAGES))
    assert r.usage.completion_tokens == n
    assert r.usage.total_tokens == r.usage.prompt_tokens + n


def test_chat_stream_equals_non_stream_and_ends_with_usage(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completions_stream_and_not(client, backend):
    prompt = "The quick brown fox"
    want, n, _ = direct(backend, backend.encode(prompt), 24, temperature=0.0, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 24 == n and r.usage.prompt_tokens == len(backend.encode(prompt))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_text_and_ends_generation(client, backend):
    prompt = "Gemma runs on NVIDIA Jetson"
    full, _, _ = direct(backend, backend.encode(prompt), 40, temperature=0.0, ignore_eos=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"degenerate stop string from {full!r}"
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop],
                  extra_body={"ignore_eos": True})
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            r = client.completions.create(**kw)
            text, finish = r.choices[0].text, r.choices[0].finish_reason
        assert (text, finish) == (full[:full.find(stop)], "stop"), (stream, stop, full)


def test_seeded_sampling_is_reproducible_and_sampling_params_are_used(client):
    kw = dict(model=MODEL, prompt="Jetson", max_tokens=16, temperature=1.0, top_p=0.9, seed=7,
              extra_body={"top_k": 40, "ignore_eos": True})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text


def test_raw_stream_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        body = r.read().decode()
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


# ---- error paths over raw HTTP ------------------------------------------------------------------------------------

def test_malformed_json_is_400(server):
    assert_openai_error(post(server, "/v1/chat/completions", b"{not json"), 400)
    assert_openai_error(post(server, "/v1/completions", b"[1, 2]"), 400)


def test_hostile_bodies_are_4xx_and_the_server_stays_up(server):
    """Each of these reached a handler as a 500 (or a crash inside the error handler) before: deep nesting,
    lone surrogate escapes (tokenizer and UTF-8 response both fail on them), a body past the size cap."""
    deep = b'{"model": "tiny-gemma2", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_openai_error(post(server, "/v1/completions", deep), 400)
    for raw in (b'{"model": "\\ud800", "prompt": "x"}', b'{"model": "tiny-gemma2", "prompt": "a\\udc00b"}',
                b'{"model": "tiny-gemma2", "messages": [{"role": "user", "content": "\\ud83d"}]}'):
        path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
        err = assert_openai_error(post(server, path, raw), 400)
        assert "surrogate" in err["message"], err
    huge = json.dumps({"model": MODEL, "prompt": "fox " * (3 << 20)})  # 12 MiB > MAX_BODY_BYTES
    assert_openai_error(post(server, "/v1/completions", huge), 413, code="request_too_large")
    assert httpx.get(server.url + "/health").status_code == 200
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "ünïcödé 🦊", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_unknown_model_is_404(server):
    assert_openai_error(post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": MESSAGES}), 404,
                        param="model", code="model_not_found")


def test_prompt_longer_than_context_is_400(server, backend):
    ctx = backend.info.context_length
    assert_openai_error(post(server, "/v1/completions", {"model": MODEL, "prompt": [5] * (ctx + 10)}), 400,
                        param="prompt", code="context_length_exceeded")
    long_msg = [{"role": "user", "content": "fox " * (ctx + 10)}]
    assert_openai_error(post(server, "/v1/chat/completions", {"model": MODEL, "messages": long_msg}), 400,
                        param="messages", code="context_length_exceeded")


def test_max_tokens_beyond_context_is_400(server, backend):
    body = {"model": MODEL, "prompt": "fox", "max_tokens": backend.info.context_length}
    assert_openai_error(post(server, "/v1/completions", body), 400, param="max_tokens")


@pytest.mark.parametrize("field,value", [("temperature", "hot"), ("max_tokens", 1.5), ("max_tokens", True),
                                         ("stream", "yes"), ("messages", "hi"), ("top_p", 0), ("n", 3),
                                         ("stop", [1, 2]), ("frobnicate", 1), ("seed", -1), ("seed", 2**64)])
def test_wrong_types_and_values_are_400_naming_the_param(server, field, value):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, field: value}
    assert_openai_error(post(server, "/v1/chat/completions", body), 400, param=field)


def test_bad_chat_roles_are_400(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}
    assert_openai_error(post(server, "/v1/chat/completions", body), 400)
    assert_openai_error(post(server, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "x"}]}), 400)


def test_api_key_required_on_v1_only(backend):
    with LiveServer(create_app(backend, MODEL, api_key="s3cret")) as s:
        assert_openai_error(httpx.get(s.url + "/v1/models"), 401, code="invalid_api_key")
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert_openai_error(r, 401)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
        assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_full_queue_answers_429_with_retry_after(backend):
    with LiveServer(create_app(backend, MODEL, max_queue=0, max_concurrency=1)) as s:
        body = {"model": MODEL, "prompt": "fox", "max_tokens": 1500, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # keep the iterator: dropping it closes the connection (= disconnect)
            next(lines)  # generating now: the only slot is taken
            r = post(s, "/v1/completions", {"model": MODEL, "prompt": "fox", "max_tokens": 2})
            assert_openai_error(r, 429, code="rate_limit_exceeded")
            assert int(r.headers["retry-after"]) >= 1
        s.wait_for(lambda m: m[("num_requests_running", ())] == 0, what="the slot to be freed")
        assert post(s, "/v1/completions", {"model": MODEL, "prompt": "fox", "max_tokens": 2}).status_code == 200


# ---- health, failures, telemetry ----------------------------------------------------------------------------------

def test_health_is_503_until_loaded(served_checkpoint):
    gate = threading.Event()

    def loader():
        gate.wait(30)
        return make_backend(served_checkpoint, slots=1)

    with LiveServer(create_app(loader, MODEL)) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "Loading model"
        assert_openai_error(post(s, "/v1/completions", {"model": MODEL, "prompt": "a"}), 503)
        gate.set()
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the model never became ready"
            time.sleep(0.05)
        assert post(s, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 2}).status_code == 200


class FaultyBackend(ReferenceBackend):
    """The real reference backend with an injected fault: a request containing "BOOM" raises mid-generation;
    `broken` makes everything (including the health probe) fail."""

    broken = False

    def stream(self, prompt_ids, params, cancel=lambda: False):
        if self.broken:
            raise RuntimeError("device lost")
        for i, step in enumerate(super().stream(prompt_ids, params, cancel)):
            if i == 1 and self.decode(prompt_ids).endswith("BOOM"):
                raise RuntimeError("kernel fault")
            yield step


def test_one_failing_request_does_not_take_the_server_down(served_checkpoint):
    b = FaultyBackend.load(served_checkpoint, slots=1)
    with LiveServer(create_app(b, MODEL)) as s:
        assert_openai_error(post(s, "/v1/completions", {"model": MODEL, "prompt": "BOOM", "max_tokens": 5,
                                                        "ignore_eos": True}), 500)
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "BOOM", "max_tokens": 5, "stream": True, "ignore_eos": True}) as r:
            events = [e for e in r.read().decode().split("\n\n") if e]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
        time.sleep(0.5)  # let the health probe the failure triggered finish
        assert httpx.get(s.url + "/health").status_code == 200
        assert post(s, "/v1/completions", {"model": MODEL, "prompt": "fine", "max_tokens": 3}).status_code == 200
        b.broken = True
        assert_openai_error(post(s, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3}), 500)
        deadline = time.monotonic() + 20
        while httpx.get(s.url + "/health").status_code != 503:
            assert time.monotonic() < deadline, "a broken backend must flip /health to 503"
            time.sleep(0.05)
        assert httpx.get(s.url + "/metrics").status_code == 200  # still serving probes


def test_metrics_and_telemetry_show_memory(server, backend):
    m = server.metrics()
    mem = {dict(k[1])["kind"]: v for k, v in m.items() if k[0] == "memory_bytes"}
    assert mem["weights"] == backend.memory().weights_bytes > 0
    assert mem["host_rss"] > mem["weights"]
    nvml = nvml_device_count()[0] > 0
    assert ("device_used" in mem) is nvml  # without NVML omitted, never a fake 0
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert (name, ()) in m, name
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "e2e_request_latency_seconds_count", "prompt_tokens_total", "generation_tokens_total"):
        assert (name, ()) in m, name
    snap = httpx.get(server.url + "/v1/telemetry").json()
    assert snap["model"]["weights_bytes"] == backend.memory().weights_bytes
    assert snap["model"]["kv_cache"]["capacity_tokens"] == 2 * backend.info.context_length
    assert snap["nvml"]["available"] is nvml
    again = httpx.get(server.url + "/v1/telemetry").json()  # reading drains nothing
    assert again["model"] == snap["model"]


def test_stream_options_without_stream_is_400(server):
    body = {"model": MODEL, "messages": MESSAGES, "stream_options": {"include_usage": True}}
    assert_openai_error(post(server, "/v1/chat/completions", body), 400, param="stream_options")
    body = {**body, "stream": True, "stream_options": {"include_usage": "yes"}}
    assert_openai_error(post(server, "/v1/chat/completions", body), 400, param="stream_options")


# ---- backend selection ----------------------------------------------------------------------------------------------

def test_load_backend_converts_an_hf_dir_once_into_the_cache(tiny_model_dir, tmp_path):
    b = load_backend(tiny_model_dir, slots=3, cache_dir=tmp_path)
    assert b.name in ("reference", "onnxruntime") and b.info.name == tiny_model_dir.name  # the CPU runtime installed
    assert b.kv_usage().capacity_tokens == 3 * b.info.context_length
    (entry,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # .locks/: the cache's write locks
    stamp = (entry / "config.json").stat().st_mtime_ns
    again = load_backend(tiny_model_dir, slots=1, cache_dir=tmp_path)  # reused, not converted again
    assert (entry / "config.json").stat().st_mtime_ns == stamp and again.info.path == str(entry)
    assert detect_kind(entry) == "trtllm_checkpoint"


def test_concurrent_first_loads_convert_once(tiny_model_dir, tmp_path, monkeypatch):
    """`serve --guard default` loads the chat model and the guard (the same model) at once on a cold cache: one
    converts, the others wait for it and reuse the entry (without the lock each converted, the last rename winning)."""
    from concurrent.futures import ThreadPoolExecutor

    from trt_gemma.checkpoint import convert
    from trt_gemma.runtime.backends import ensure_converted

    calls, real = [], convert.convert_checkpoint
    monkeypatch.setattr(convert, "convert_checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))  # a spy
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: ensure_converted(tiny_model_dir, tmp_path), range(4)))
    assert len(set(paths)) == 1 and (paths[0] / "config.json").is_file() and len(calls) == 1, len(calls)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [paths[0].name]


def test_load_backend_refuses_what_it_cannot_serve(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        load_backend(tmp_path)
    (tmp_path / "config.json").write_text('{"build_config": {}, "pretrained_config": {}}')
    (tmp_path / "rank0.engine").write_bytes(b"x")
    assert detect_kind(tmp_path) == "trtllm_engine"
    with pytest.raises((DependencyError, InputError)) as e:  # no GPU / tensorrt_llm on this host
        load_backend(tmp_path)
    assert e.value.fix


def test_binds_loopback_by_default():
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"


def test_cli_serve_answers_the_openai_client(served_checkpoint, tmp_path):
    with ServerProcess([str(served_checkpoint), "--max-concurrency", "1"], tmp_path / "serve.log") as p:
        c = openai.OpenAI(base_url=p.url + "/v1", api_key="x", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=served_checkpoint.name, messages=MESSAGES, max_tokens=3)
        assert r.usage.completion_tokens >= 1
        metrics = httpx.get(p.url + "/metrics").text
        assert any(l.startswith("memory_bytes{") and 'kind="weights"' in l for l in metrics.splitlines())


def test_busy_port_is_a_typed_error_before_loading(served_checkpoint):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "trt_gemma", "serve", str(served_checkpoint), "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and f"cannot listen on 127.0.0.1:{port}" in p.stderr and "fix:" in p.stderr
    assert "Traceback" not in p.stderr
    bad = subprocess.run([sys.executable, "-m", "trt_gemma", "serve", str(served_checkpoint), "--port", "70000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--port" in bad.stderr and "Traceback" not in bad.stderr
