"""Backpressure under load and client disconnects, on a real uvicorn server with the tiny reference model.

64 concurrent streaming clients against 2 slots + a queue of 6: every one gets either a complete stream ending in
`data: [DONE]` or a 429 with Retry-After, none hangs (every wait is bounded) or is lost, and the Prometheus counters
add up to exactly what the clients received."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from live_server import LiveServer, make_backend, served_checkpoint  # noqa: F401 (fixture)
from trt_gemma.serve.app import create_app

MODEL = "tiny-gemma2"
N_CLIENTS = 64
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def backend(served_checkpoint):
    return make_backend(served_checkpoint, slots=2)


async def one_client(client: httpx.AsyncClient, i: int) -> dict:
    body = {"model": MODEL, "prompt": f"client {i} says", "max_tokens": MAX_TOKENS, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        raw = (await r.aread()).decode()
        return {"status": r.status_code, "retry_after": r.headers.get("retry-after"), "body": raw}


async def run_clients(url: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0),
                                 limits=httpx.Limits(max_connections=N_CLIENTS)) as client:
        tasks = [asyncio.wait_for(one_client(client, i), timeout=180) for i in range(N_CLIENTS)]
        return await asyncio.gather(*tasks)


def check_stream(raw: str) -> dict:
    """A complete stream: only data events, the last is [DONE], one finish_reason, a usage chunk before [DONE]."""
    events = [e for e in raw.split("\n\n") if e]
    assert events and all(e.startswith("data: ") for e in events), raw[:500]
    assert events[-1] == "data: [DONE]", raw[-500:]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["length"], finishes
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1], chunks[-1]
    return chunks[-1]["usage"]


def test_64_concurrent_streams_complete_or_get_429_and_counters_add_up(backend):
    with LiveServer(create_app(backend, MODEL, max_queue=6, max_concurrency=2)) as s:
        results = asyncio.run(run_clients(s.url))
        assert len(results) == N_CLIENTS
        ok = [r for r in results if r["status"] == 200]
        busy = [r for r in results if r["status"] == 429]
        assert len(ok) + len(busy) == N_CLIENTS, sorted({r["status"] for r in results})
        assert len(ok) >= 2, "at least the two slots must have been served"
        usages = [check_stream(r["body"]) for r in ok]
        assert all(u["completion_tokens"] == MAX_TOKENS for u in usages)
        for r in busy:
            assert int(r["retry_after"]) >= 1
            assert json.loads(r["body"])["error"]["code"] == "rate_limit_exceeded"

        m = s.wait_for(lambda m: m[("num_requests_running", ())] == 0 and m[("num_requests_waiting", ())] == 0,
                       what="all slots and queue places to be released")
        assert m[("request_success_total", (("finished_reason", "length"),))] == len(ok)
        assert m.get(("request_error_total", (("http_code", "429"),)), 0) == len(busy)
        assert m[("e2e_request_latency_seconds_count", ())] == len(ok)
        assert m[("time_to_first_token_seconds_count", ())] == len(ok)
        assert m[("generation_tokens_total", ())] == sum(u["completion_tokens"] for u in usages)
        assert m[("prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages)
        assert m[("kv_cache_usage_perc", ())] == 0.0


def _start_stream(s: LiveServer, max_tokens: int):
    client = httpx.Client(timeout=60)
    body = {"model": MODEL, "prompt": "fox", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    cm = client.stream("POST", s.url + "/v1/completions", json=body)
    r = cm.__enter__()
    return client, cm, r


def test_disconnect_mid_stream_cancels_generation_and_frees_the_slot(backend):
    with LiveServer(create_app(backend, MODEL, max_queue=0, max_concurrency=1)) as s:
        client, cm, r = _start_stream(s, max_tokens=2000)
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert all(line.startswith("data: ") or not line for line in got)
        m = s.metrics()
        assert m[("num_requests_running", ())] == 1
        assert 0 < m[("kv_cache_usage_perc", ())] <= 1 and m[("memory_bytes", (("kind", "kv_cache"),))] > 0
        cm.__exit__(None, None, None)  # the client goes away mid-stream
        client.close()
        m = s.wait_for(lambda m: m[("num_requests_running", ())] == 0, what="the cancelled generation's slot")
        assert m[("request_success_total", (("finished_reason", "cancelled"),))] == 1
        assert m[("generation_tokens_total", ())] < 2000, "generation ran to the end instead of being cancelled"
        mem = {dict(k[1])["kind"]: v for k, v in m.items() if k[0] == "memory_bytes"}
        assert mem["kv_cache"] == 0
        r2 = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "fox", "max_tokens": 2}, timeout=60)
        assert r2.status_code == 200, r2.text  # the only slot is usable again (else: 429)


def test_disconnect_while_queued_gives_the_queue_place_back(backend):
    with LiveServer(create_app(backend, MODEL, max_queue=1, max_concurrency=1)) as s:
        c1, cm1, r1 = _start_stream(s, max_tokens=2000)
        lines1 = r1.iter_lines()
        next(lines1)
        c2, cm2, r2 = _start_stream(s, max_tokens=4)  # admitted to the queue, waits for the slot
        s.wait_for(lambda m: m[("num_requests_waiting", ())] == 1, what="the second request to queue")
        cm2.__exit__(None, None, None)
        c2.close()
        s.wait_for(lambda m: m[("num_requests_waiting", ())] == 0, what="the queued request to leave")
        assert s.metrics()[("num_requests_running", ())] == 1  # the first one is unaffected
        cm1.__exit__(None, None, None)
        c1.close()
        s.wait_for(lambda m: m[("num_requests_running", ())] == 0, what="the first request's slot")


def test_non_streaming_client_that_gives_up_cancels_its_generation(backend):
    with LiveServer(create_app(backend, MODEL, max_queue=0, max_concurrency=1)) as s:
        body = {"model": MODEL, "prompt": "fox", "max_tokens": 2000, "ignore_eos": True}
        # the tiny model makes 2000 tokens in about 1 s: the client gives up well before that (the server notices
        # within DISCONNECT_POLL_S), and the wait is for the request to be counted, not for a slot that may not
        # have been taken yet on a loaded host
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.25))
        cancelled = ("request_success_total", (("finished_reason", "cancelled"),))
        m = s.wait_for(lambda m: m.get(cancelled) == 1 and m[("num_requests_running", ())] == 0,
                       what="the abandoned request to be counted as cancelled and its slot freed")
        assert m[("generation_tokens_total", ())] < 2000
