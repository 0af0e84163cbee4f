"""A synchronous stream that is alone runs `backend.stream()` on its caller's thread (no per-token hand-over from a
worker, trt_gemma.runtime.scheduler); the moment another generation waits for a slot, or the model closes, it moves to a
worker thread between two steps, so a consumer that stops iterating never holds anyone up. Which thread ran each
step is read by a spy around the real backend's `stream`; the ids are checked against the numpy reference run alone
(trt_gemma.reference.generate on a separately loaded ReferenceModel)."""
from __future__ import annotations

import threading
import time

import pytest

import trt_gemma

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def oracle():
    from trt_gemma.reference import ReferenceModel, SamplingParams
    from trt_gemma.reference.generate import generate

    with trt_gemma.load() as m:
        path, tok = m.info.path, m.tokenizer
    ref = ReferenceModel.load(path)

    def run(prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.stop_token_ids)
        return generate(ref, tok.encode(prompt), params).token_ids
    return run


def spy_threads(model) -> list[int]:
    """Wrap the model's real backend.stream: the list gets the id of the thread that produced each step."""
    real, seen = model._backend.stream, []

    def stream(*args, **kwargs):
        for step in real(*args, **kwargs):
            seen.append(threading.get_ident())
            yield step
    model._backend.stream = stream
    return seen


def test_a_lone_stream_runs_on_the_callers_thread(oracle):
    with trt_gemma.load(max_concurrency=2) as m:
        seen = spy_threads(m)
        c = m.generate("The Python", max_tokens=MAX_TOKENS)
        assert list(c.token_ids) == oracle("The Python")
        assert seen and set(seen) == {threading.get_ident()}, "a lone stream's steps ran off the caller's thread"
        adm = m._scheduler.admission
        assert (adm.running, adm.waiting, len(m._scheduler.inline)) == (0, 0, 0)


def test_a_paused_stream_moves_to_a_worker_when_another_waits(oracle):
    """One slot: A runs on this thread, then this thread stops iterating it; B (another thread) queues for the slot.
    A must finish on a worker without this thread's help (else B would wait forever), with the ids it gets alone."""
    with trt_gemma.load(max_concurrency=1) as m:
        seen = spy_threads(m)
        a = m.stream("The Python", max_tokens=MAX_TOKENS)
        first = next(a)
        assert seen == [threading.get_ident()]
        out: list = []
        b = threading.Thread(target=lambda: out.append(m.generate("Lists are", max_tokens=MAX_TOKENS)))
        b.start()
        b.join(timeout=60)  # this thread does not touch A meanwhile
        assert out and list(out[0].token_ids) == oracle("Lists are"), "B did not get the slot while A was paused"
        rest = list(a)
        assert list(first.token_ids) + [t for p in rest for t in p.token_ids] == oracle("The Python")
        assert any(t != threading.get_ident() for t in seen[1:]), "A's later steps should have run on a worker"
        adm = m._scheduler.admission
        assert (adm.running, adm.waiting, len(m._scheduler.inline)) == (0, 0, 0)


def test_close_ends_a_paused_inline_stream_cancelled():
    m = trt_gemma.load(max_concurrency=1)
    a = m.stream("The Python", max_tokens=500, ignore_eos=True)
    next(a)
    assert a._run.gen in m._scheduler.inline
    t0 = time.perf_counter()
    m.close()  # its last step (cancelled) runs on the pool, which close() waits for, before the backend closes
    print(f"\nclose() with a paused inline stream took {(time.perf_counter() - t0) * 1e3:.1f} ms")
    c = a.completion()
    assert c.finish_reason == "cancelled" and a._run.gen.generated < 500
    assert len(m._scheduler.inline) == 0


def test_breaking_out_of_an_inline_stream_frees_the_slot_and_the_kv_at_once():
    with trt_gemma.load(max_concurrency=1) as m:
        adm = m._scheduler.admission
        for _piece in m.stream("The Python", max_tokens=500, ignore_eos=True):
            assert adm.running == 1 and m.info.memory.kv_used_bytes > 0
            break
        # no wait: the generator's close ran on this thread, before the slot was given back
        assert (adm.running, m.info.memory.kv_used_bytes, len(m._scheduler.inline)) == (0, 0, 0)
