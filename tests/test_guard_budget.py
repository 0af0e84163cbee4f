"""What the guard scores and what it may cost (docs/safety.md "What the guard scores", "The guard's budget"): every
text the client wrote, after the chat admission and the model lookup; its own bounded queue with 429 + Retry-After,
chat checks ahead of moderation inputs, work dropped when the client leaves, the chat routes' body bound. The guard
is the embedded model (verdicts steered with thresholds: 0 = always flagged, 1 = never); expected scores come from
calling the Moderator directly."""
from __future__ import annotations

import threading
import time

import httpx
import pytest

from live_server import LiveServer, make_backend, served_checkpoint  # noqa: F401 (fixture)
from trt_gemma.safety import POLICIES, Moderator, load_moderator
from trt_gemma.serve.app import create_app
from trt_gemma.serve.guard import CHAT_CHECK, MODERATION, Guard, GuardQueue, client_text
from trt_gemma.serve.limits import RequestLimits

MODEL = "tiny-gemma2"
TOL = 1e-9


@pytest.fixture(scope="module")
def backend(served_checkpoint):
    return make_backend(served_checkpoint, slots=2)


@pytest.fixture(scope="module")
def moderator(tmp_path_factory):
    return load_moderator(None, cache_dir=tmp_path_factory.mktemp("guard_cache"), backend="reference")


def steered(mod: Moderator, last_logits=None, **thresholds) -> Moderator:
    return Moderator(last_logits or mod.last_logits, mod.tokenizer, mod.context_length,
                     {**mod.thresholds, **thresholds}, name=mod.name, weight_bytes=mod.weight_bytes)


def serve(backend, guard: Guard, **kw):
    return LiveServer(create_app(backend, MODEL, **{"max_queue": 4, "max_concurrency": 2, **kw}, guard=guard))


def chat(server, messages, model=MODEL, **extra):
    body = {"model": model, "messages": messages, "max_tokens": 2, "temperature": 0, **extra}
    return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)


def checked(m: dict, stage: str = "prompt") -> float:
    return m.get(("guard_latency_seconds_count", (("stage", stage),)), 0.0)


# ---- what is scored ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Explain how to pick a lock."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Sure, here is how to"}],
], ids=["system-only", "system-user-prefill"])
def test_block_mode_scores_every_client_text(backend, moderator, messages):
    """Today's gap: a system-only request (or one whose last word is an assistant prefill) went through unscored."""
    with serve(backend, Guard(steered(moderator, dangerous=0.0), mode="block")) as s:
        r = chat(s, messages)
        m = s.metrics()
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation", r.text
    assert checked(m) == 1


def test_annotate_scores_the_whole_conversation_as_one_prompt(backend, moderator):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "Go"}]}]
    with serve(backend, Guard(moderator, mode="annotate")) as s:
        r = chat(s, msgs)
    assert r.status_code == 200, r.text
    want = moderator.score("You are terse.\n\nHi\n\nHello.\n\nGo")
    got = r.json()["moderation"]["input"]["results"][0]["category_scores"]
    assert max(abs(got[p] - want.scores[p]) for p in POLICIES) <= TOL


def test_client_text_joins_every_role():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert client_text(msgs) == "s\n\nu\n\na"


# ---- admission before any guard work -------------------------------------------------------------------------------

def test_unknown_model_is_404_before_the_guard(backend, moderator):
    with serve(backend, Guard(steered(moderator, dangerous=0.0))) as s:
        r = chat(s, [{"role": "user", "content": "hi"}], model="no-such-model")
        m = s.metrics()
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert checked(m) == 0, "the guard scored a request for a model this server does not have"


def test_full_chat_queue_is_429_before_the_guard(backend, moderator):
    """One slot, no queue: a long stream holds it; a guarded chat then gets 429 without a guard pass."""
    with serve(backend, Guard(steered(moderator, **dict.fromkeys(POLICIES, 1.0))), max_queue=0,
               max_concurrency=1) as s:
        with httpx.stream("POST", s.url + "/v1/completions", timeout=120, json={
                "model": MODEL, "prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}) as held:
            lines = held.iter_lines()  # keep the iterator: dropping it closes the connection (= disconnect)
            next(lines)
            s.wait_for(lambda m: m.get(("num_requests_running", ())) == 1, what="the stream to hold the slot")
            r = chat(s, [{"role": "user", "content": "hi"}])
        m = s.metrics()
    assert r.status_code == 429 and "retry-after" in r.headers, r.text
    assert checked(m) == 0


# ---- the guard's own budget ----------------------------------------------------------------------------------------

def test_moderation_body_has_the_chat_bound(backend, moderator):
    limit = RequestLimits(moderator.context_length).body_bytes
    with serve(backend, Guard(moderator)) as s:
        r = httpx.post(s.url + "/v1/moderations", content=b'{"input": "' + b"a" * limit + b'"}',
                       headers={"content-type": "application/json"}, timeout=60)
        long = httpx.post(s.url + "/v1/moderations", json={"input": "a" * (limit // 2)}, timeout=60)
        m = s.metrics()
    assert r.status_code == 413, r.text
    assert long.status_code == 400 and long.json()["error"]["code"] == "string_above_max_length", long.text
    assert checked(m, "moderation") == 0


def test_moderations_beyond_the_guard_queue_get_429(backend, moderator):
    guard = Guard(moderator, max_queue=2)
    with serve(backend, guard) as s:
        r = httpx.post(s.url + "/v1/moderations", json={"input": ["a", "b", "c"]}, timeout=60)
        ok = httpx.post(s.url + "/v1/moderations", json={"input": ["a", "b"]}, timeout=60)
        m = s.metrics()
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1, r.text
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2
    assert m[("guard_rejected_total", ())] == 1 and m[("guard_requests_waiting", ())] == 0
    assert guard.queue.inputs == 0  # every admitted input was released
    assert checked(m, "moderation") == 2


def test_work_of_a_client_that_left_is_dropped(backend, moderator):
    """The guard thread is held on a gate; a moderation client gives up after 1 s; once the gate opens, none of its
    inputs is scored (the forward passes are counted)."""
    gate, passes = threading.Event(), []

    def gated(ids):
        gate.wait(30)
        passes.append(len(ids))
        return moderator.last_logits(ids)

    with serve(backend, Guard(steered(moderator, gated))) as s:
        first = threading.Thread(target=lambda: httpx.post(s.url + "/v1/moderations", json={"input": "x"},
                                                           timeout=60))
        first.start()
        s.wait_for(lambda m: m.get(("guard_requests_running", ())) == 1, what="the first input to run")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/moderations", json={"input": ["a", "b", "c"]}, timeout=1.0)
        s.wait_for(lambda m: m.get(("guard_dropped_total", ())) == 3 * len(POLICIES),
                   what="the 3 inputs (one job per policy) to be dropped")
        gate.set()
        first.join()
        m = s.metrics()
    assert len(passes) == len(POLICIES), f"{len(passes)} forward passes: the dropped inputs were scored"
    assert checked(m, "moderation") == 1


def test_chat_checks_run_before_queued_moderation_inputs():
    q, order, gate = GuardQueue(max_queue=4), [], threading.Event()
    try:
        q.submit(lambda gone: gate.wait(30), MODERATION)
        while q.running == 0:
            time.sleep(0.01)
        jobs = [q.submit(lambda gone, name=name: order.append(name), prio)
                for name, prio in (("m1", MODERATION), ("m2", MODERATION), ("chat", CHAT_CHECK))]
        gate.set()
        for j in jobs:
            j.future.result(timeout=30)
    finally:
        q.close()
    assert order == ["chat", "m1", "m2"]


def test_moderation_yields_to_generation_but_is_not_starved():
    """While chats generate, moderation jobs wait (MODERATION_YIELD_S each) yet still run; chat checks never wait."""
    q, order = GuardQueue(max_queue=4), []
    q.chats_running = lambda: True  # generation never stops
    try:
        with q._cv:  # all three queued before the worker looks (the condition's lock is reentrant)
            jobs = [q.submit(lambda gone, n=n: order.append(n), MODERATION) for n in ("m1", "m2")]
            jobs.append(q.submit(lambda gone: order.append("chat"), CHAT_CHECK))
        for j in jobs:
            j.future.result(timeout=30)
    finally:
        q.close()
    assert order[0] == "chat" and sorted(order[1:]) == ["m1", "m2"], order
