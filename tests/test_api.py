"""The Python API (trt_gemma.load -> Model) on the embedded model: its greedy ids against `trt-gemma generate` and
the HTTP server, its scheduler under threads and asyncio (each stream's ids against the numpy reference run
alone), cancellation freeing the slot (measured), typed errors. The oracle for every id is
trt_gemma.reference.generate on a separately loaded ReferenceModel, never the scheduler under test."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import trt_gemma
from trt_gemma.errors import ConfigError, InputError, ResourceError

PROMPTS = ["The Python", "Lists are", "A dictionary maps", "The import statement", "Exceptions are raised",
           "A generator function", "The with statement", "Strings in Python"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model():
    with trt_gemma.load(max_concurrency=2) as m:
        yield m


@pytest.fixture(scope="module")
def oracle(model):
    """prompt -> greedy text token ids from the numpy reference itself (stop tokens end it, as in the CLI)."""
    from trt_gemma.reference import ReferenceModel, SamplingParams
    from trt_gemma.reference.generate import generate

    ref = ReferenceModel.load(model.info.path)
    tok = model.tokenizer
    cache: dict[tuple[str, int], list[int]] = {}

    def run(prompt: str, max_tokens: int = MAX_TOKENS) -> list[int]:
        key = (prompt, max_tokens)
        if key not in cache:
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.stop_token_ids)
            cache[key] = generate(ref, tok.encode(prompt), params).token_ids
        return cache[key]
    return run


def test_greedy_ids_equal_the_cli_and_the_reference(model, oracle):
    prompt = "The Python"
    c = model.generate(prompt, max_tokens=24)
    out = subprocess.run([sys.executable, "-m", "trt_gemma", "generate", "--prompt", prompt, "--max-tokens", "24",
                          "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    assert list(c.token_ids) == cli["token_ids"] == oracle(prompt, 24), (c.token_ids, cli["token_ids"])
    assert c.text == cli["text"] and c.finish_reason == cli["finish_reason"]
    assert c.usage.prompt_tokens == cli["prompt_tokens"] == len(model.tokenizer.encode(prompt))


def test_greedy_output_equals_the_servers(model):
    """Same backend class, same prompt, through the HTTP server: same text, same token count, same finish."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from live_server import LiveServer

    from trt_gemma.runtime.backends import load_backend
    from trt_gemma.checkpoint.hf import resolve_model
    from trt_gemma.serve.app import create_app

    for messages in (None, [{"role": "user", "content": "What is a list?"}]):
        c = model.chat(messages, max_tokens=20) if messages else model.generate("Lists are", max_tokens=20)
        with LiveServer(create_app(load_backend(resolve_model(None)), "m", max_concurrency=1)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=120)
            if messages:
                r = client.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0)
                text = r.choices[0].message.content
            else:
                r = client.completions.create(model="m", prompt="Lists are", max_tokens=20, temperature=0)
                text = r.choices[0].text
        assert text == c.text, (text, c.text)
        assert r.usage.completion_tokens == c.usage.completion_tokens
        assert r.usage.prompt_tokens == c.usage.prompt_tokens
        assert r.choices[0].finish_reason == c.finish_reason
        assert model.tokenizer.decode(list(c.token_ids)) == c.text


def test_stream_pieces_add_up_to_generate(model, oracle):
    pieces = list(model.stream("A dictionary maps", max_tokens=MAX_TOKENS))
    ids = [t for p in pieces for t in p.token_ids]
    assert ids == oracle("A dictionary maps")
    assert [p.finish_reason for p in pieces][-1] == "length" and all(p.finish_reason is None for p in pieces[:-1])
    c = model.generate("A dictionary maps", max_tokens=MAX_TOKENS)
    assert "".join(p.text for p in pieces) == c.text
    assert c.timings.ttft_s <= c.timings.total_s and c.timings.decode_tokens_per_s > 0
    # each piece names the backend steps behind it (the server's per-token metrics); the memory figures are the
    # model's and this process's
    assert sum(len(p.steps) for p in pieces) == c.usage.completion_tokens
    assert [s.token_id for p in pieces for s in p.steps] == ids and all(s.step_seconds > 0 for p in pieces
                                                                         for s in p.steps)
    assert c.weights_bytes == model.info.memory.weights_bytes
    assert c.effective_bandwidth_bytes_per_s == c.weights_bytes * c.timings.decode_tokens_per_s
    import resource

    assert 0 < c.peak_rss_bytes <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a peak only grows


def test_stop_string_cuts_text_and_ends_the_generation(model):
    full = model.generate("The Python", max_tokens=30, ignore_eos=True)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 4]
    assert stop.strip(), full.text
    c = model.generate("The Python", max_tokens=30, ignore_eos=True, stop=[stop])
    assert c.finish_reason == "stop" and c.text == full.text[:full.text.index(stop)]
    assert c.usage.completion_tokens < 30


def test_8_threads_x_4_streams_through_2_slots_each_get_their_own_ids(oracle):
    """32 interleaved streams, max_concurrency=2: every stream completes with the ids it gets alone, none lost,
    never more than 2 generating (sampled by a monitor thread)."""
    want = {p: oracle(p) for p in PROMPTS}
    with trt_gemma.load(max_concurrency=2) as m:
        adm = m._scheduler.admission
        results: dict[tuple[int, int], list[int]] = {}
        errors: list[BaseException] = []
        peak, done = [0], threading.Event()

        def monitor() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], adm.running)
                time.sleep(0.001)

        def worker(t: int) -> None:
            try:
                streams = {k: m.stream(PROMPTS[(t + k) % len(PROMPTS)], max_tokens=MAX_TOKENS) for k in range(4)}
                got: dict[int, list[int]] = {k: [] for k in streams}
                while streams:  # round-robin: one piece from each open stream in turn
                    for k, s in list(streams.items()):
                        p = next(s, None)
                        if p is None or p.finish_reason is not None:
                            got[k] += p.token_ids if p else ()
                            del streams[k]
                        else:
                            got[k] += p.token_ids
                results.update({(t, k): ids for k, ids in got.items()})
            except BaseException as e:  # reported below with the others
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)] + [threading.Thread(target=monitor)]
        for th in threads:
            th.start()
        for th in threads[:-1]:
            th.join(timeout=300)
        done.set()
        threads[-1].join()
        assert not errors, errors
        assert len(results) == 32
        bad = {k: (ids, want[PROMPTS[(k[0] + k[1]) % len(PROMPTS)]]) for k, ids in results.items()
               if ids != want[PROMPTS[(k[0] + k[1]) % len(PROMPTS)]]}
        assert not bad, f"{len(bad)} streams differ from their solo run, e.g. {next(iter(bad.items()))}"
        assert 1 <= peak[0] <= 2, f"peak concurrent generations {peak[0]}"
        assert (adm.running, adm.waiting) == (0, 0)
        assert m.info.memory.kv_used_bytes == 0


def _wait(pred, timeout: float = 30.0) -> float:
    t0 = time.perf_counter()
    while not pred():
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.001)
    return time.perf_counter() - t0


def test_cancel_from_another_thread_frees_the_slot_for_the_waiting_stream():
    """One slot: A generates 500 tokens, B waits. A.cancel() from a third thread hands the slot to B after the
    token A is computing; measured: A's tokens after the cancel and the hand-over latency."""
    with trt_gemma.load(max_concurrency=1) as m:
        adm = m._scheduler.admission
        a = m.stream("The Python", max_tokens=500, ignore_eos=True)
        next(a)
        bs = m.stream("Lists are", max_tokens=4, ignore_eos=True)
        b_result = []
        b = threading.Thread(target=lambda: b_result.append(bs.completion()))
        b.start()
        _wait(lambda: adm.waiting == 1 and bs._run.gen.started)
        gen_a, marks = a._run.gen, []

        def cancel() -> None:  # from a third thread; note when and how far A had come
            marks.append((time.perf_counter(), gen_a.generated))
            a.cancel()

        threading.Thread(target=cancel).start()
        b.join(timeout=60)
        assert b_result and b_result[0].finish_reason == "length" and len(b_result[0].token_ids) == 4
        (t_cancel, before), = marks
        handover = bs._run.gen.slot_at - t_cancel
        after = gen_a.generated - before
        rest = list(a)
        assert rest and rest[-1].finish_reason == "cancelled"
        assert a.completion().finish_reason == "cancelled"
        assert after <= 2, f"A generated {after} tokens after cancel()"  # the one in progress (+1 racing the read)
        print(f"\ncancel() -> slot handed to the waiting stream in {handover * 1e3:.1f} ms; A made {after} more "
              f"token(s) of its 500")
        assert (adm.running, adm.waiting) == (0, 0)


def test_leaving_a_for_loop_frees_the_slot_at_once():
    with trt_gemma.load(max_concurrency=1) as m:
        adm = m._scheduler.admission
        for _piece in m.stream("The Python", max_tokens=500, ignore_eos=True):
            break
        t = _wait(lambda: adm.running == 0)
        print(f"\nbreak -> slot free after {t * 1e3:.1f} ms")
        assert m.info.memory.kv_used_bytes == 0
        c = m.generate("Lists are", max_tokens=3, ignore_eos=True)  # the slot is usable again
        assert len(c.token_ids) == 3


def test_cancel_while_queued_never_takes_a_slot():
    with trt_gemma.load(max_concurrency=1, max_queue=1) as m:
        adm = m._scheduler.admission
        with m.stream("The Python", max_tokens=500, ignore_eos=True) as a:
            next(a)
            q = m.stream("Lists are", max_tokens=5)
            with pytest.raises(ResourceError, match="busy"):
                m.stream("full queue", max_tokens=5)
            out = []
            th = threading.Thread(target=lambda: out.append(q.completion()))
            th.start()
            _wait(lambda: adm.waiting == 1 and q._run.gen.started)
            q.cancel()
            th.join(timeout=30)
            assert out[0].finish_reason == "cancelled" and out[0].token_ids == () and q._run.gen.generated == 0
        _wait(lambda: (adm.running, adm.waiting) == (0, 0))


def test_asyncio_and_threads_share_one_model(model, oracle):
    async def main():
        done = await asyncio.gather(*(model.agenerate(p, max_tokens=MAX_TOKENS) for p in PROMPTS[:4]))
        pieces = [p async for p in model.astream(PROMPTS[4], max_tokens=MAX_TOKENS)]
        async with model.astream(PROMPTS[5], max_tokens=500, ignore_eos=True) as s:
            async for _ in s:
                break  # aclose() on exit frees the slot
        dropped = model.astream(PROMPTS[7], max_tokens=500, ignore_eos=True)
        gen = dropped._run.gen
        async for _ in dropped:
            break
        del dropped  # no `async with`: dropping the stream cancels it
        while model._scheduler.admission.running:
            await asyncio.sleep(0.001)
        assert gen.generated < 500, gen.generated
        return done, pieces

    side = []
    th = threading.Thread(target=lambda: side.append(model.generate(PROMPTS[6], max_tokens=MAX_TOKENS)))
    th.start()
    done, pieces = asyncio.run(main())
    th.join(timeout=120)
    assert [list(c.token_ids) for c in done] == [oracle(p) for p in PROMPTS[:4]]
    assert [t for p in pieces for t in p.token_ids] == oracle(PROMPTS[4])
    assert list(side[0].token_ids) == oracle(PROMPTS[6])
    _wait(lambda: model._scheduler.admission.running == 0)


def _auto_cpu_backend() -> str:
    """What backend="auto" runs a checkpoint on without a GPU (backends.load_backend)."""
    from trt_gemma.runtime.backends import onnxruntime_available

    return "onnxruntime" if onnxruntime_available() else "reference"


def test_info_tokenizer_and_telemetry(model):
    auto = _auto_cpu_backend()
    i = model.info
    assert (i.backend, i.precision, i.max_concurrency) == (auto, i.dtype, 2)
    assert i.context_length == 512 and i.vocab_size == len(model.tokenizer._tok.get_vocab())
    assert i.memory.weights_bytes > 0
    snap = model.telemetry()
    assert snap["memory_bytes"]["weights"] == i.memory.weights_bytes
    assert snap["model"]["backend"] == auto
    assert model.tokenizer.decode(model.tokenizer.encode("print('hi')")) == "print('hi')"


@pytest.mark.parametrize("call, err, match", [
    (lambda m: m.generate([]), InputError, "prompt"),
    (lambda m: m.generate([10**9]), InputError, "token ids"),
    (lambda m: m.generate("x", max_tokens=100000), InputError, "max_tokens"),
    (lambda m: m.generate("x", temperature=-1.0), InputError, "temperature"),
    (lambda m: m.generate("x", top_p=0.0), InputError, "top_p"),
    (lambda m: m.generate("x", seed=-1), InputError, "seed"),
    (lambda m: m.chat([{"role": "tool", "content": "x"}]), InputError, "role"),
    (lambda m: m.chat("hello"), InputError, "messages"),
])
def test_bad_requests_raise_typed_errors(model, call, err, match):
    with pytest.raises(err, match=match):
        call(model)
    assert model._scheduler.admission.waiting == 0  # nothing was queued


def test_load_errors_and_closed_model(tmp_path):
    with pytest.raises(ConfigError, match="backend"):
        trt_gemma.load(backend="tpu")
    with pytest.raises(InputError):
        trt_gemma.load(tmp_path / "missing")
    with pytest.raises(InputError, match="not a TensorRT-LLM engine"):
        trt_gemma.load(backend="trtllm")
    m = trt_gemma.load(backend="reference")
    m.close()
    with pytest.raises(ResourceError, match="closed"):
        m.generate("x")


def test_import_is_light_and_help_lists_the_public_names():
    assert set(trt_gemma.__all__) == {"__version__", *trt_gemma._EXPORTS}  # the lazy table and __all__ agree
    code = ("import sys, trt_gemma, pydoc; heavy = [m for m in ('numpy', 'trt_gemma.api', 'fastapi') "
            "if m in sys.modules]; text = pydoc.render_doc(trt_gemma, renderer=pydoc.plaintext); "
            "print(heavy, [n for n in trt_gemma.__all__ if n not in text])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []", out.stdout
    assert "fastapi" not in subprocess.run(
        [sys.executable, "-c", "import sys, trt_gemma.api; print(sorted(sys.modules))"],
        capture_output=True, text=True, timeout=120).stdout  # the API works in a core-only install


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bfloat16 bundle of the embedded model for rtx-4090, made through trt_gemma.stages.build (no engine here)."""
    from trt_gemma.stages import build

    out = tmp_path_factory.mktemp("bundle") / "b"
    b = build(None, target="rtx-4090", overrides=["quant=bfloat16", "kv_cache_dtype=auto"], out=out, skip_quality=True,
              compile_engine=False, show_progress=False)
    assert b.bundle_dir == out and b.engine is None
    return out


def test_stages_are_the_clis_functions_and_plan_a_bundle(bundle):
    from trt_gemma import build as build_mod
    from trt_gemma.checkpoint import convert as convert_mod
    from trt_gemma import stages

    assert stages.convert is convert_mod.convert_checkpoint and stages.build is build_mod.build_bundle
    out = subprocess.run([sys.executable, "-m", "trt_gemma", "plan", "--target", "jetson-orin-nano-8gb", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    mine = stages.plan(None, "jetson-orin-nano-8gb").to_dict()
    assert (mine["total_bytes"], mine["verdict"], mine["recipe"]) == (cli["total_bytes"], cli["verdict"], cli["recipe"])
    p = stages.plan(bundle, "jetson-orin-nano-4gb")  # the bundle's recipe (bfloat16) on another device
    assert p.recipe.quant == "bfloat16" and p.target == "jetson-orin-nano-4gb"
    with pytest.raises(InputError, match="planning needs"):
        stages.plan(bundle / "checkpoint")


def test_load_a_bundle_names_its_target(bundle, oracle):
    with trt_gemma.load(bundle) as m:
        assert (m.info.target, m.info.backend, m.info.dtype) == ("rtx-4090", _auto_cpu_backend(), "bfloat16")
        assert m.generate("The Python", max_tokens=4).finish_reason in ("length", "stop")


def test_close_cancels_running_and_waiting_streams():
    m = trt_gemma.load(max_concurrency=1)
    a = m.stream("The Python", max_tokens=500, ignore_eos=True)
    next(a)
    waiting = m.stream("Lists are", max_tokens=500, ignore_eos=True)
    out = []
    th = threading.Thread(target=lambda: out.append(waiting.completion()))
    th.start()
    _wait(lambda: m._scheduler.admission.waiting == 1 and waiting._run.gen.started)
    m.close()
    th.join(timeout=30)
    assert a.completion().finish_reason == "cancelled" and a._run.gen.generated < 500
    assert out and out[0].finish_reason == "cancelled" and out[0].token_ids == ()


def test_a_generation_abandoned_before_its_consumer_starts_leaves_the_counters_at_zero(model):
    """abandon() (a client gone before its body was read, a stream closed before iterating) gives the queue place
    back once; a consumer that starts afterwards must not wait for a slot or count itself again."""
    from trt_gemma.runtime.base import GenerationParams

    sched = model._scheduler
    adm = sched.admission
    gen = sched.submit(model.tokenizer.encode("hi"), GenerationParams(max_tokens=2, temperature=0.0))
    assert adm.waiting == 1
    gen.abandon()
    gen.abandon()  # idempotent
    assert list(gen.steps()) == []

    async def consume() -> list:
        return [s async for s in gen.batches()]

    assert asyncio.run(consume()) == []
    assert (adm.running, adm.waiting) == (0, 0)
