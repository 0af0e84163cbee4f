"""Batched decoding: the pool-layout graph (onnx/pool.py), the onnxruntime executor, and the step loop.

Oracles: the numpy reference (trt_gemma.reference) for the graph's numbers and for greedy / sampled tokens; each
request run alone through the same loop for batched runs (a row's tokens must not depend on who shares its steps);
numpy slicing for the executor's strided copies. Requests arrive at chosen engine turns (the loop is driven by hand),
so the schedules are the same on every run.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs the onnx extra")
pytest.importorskip("onnx", reason="the onnxruntime backend needs the onnx extra")

from test_onnx_export import _max, ckpt, make_awq, session  # noqa: E402,F401 (ckpt: fixture)
from trt_gemma.checkpoint.convert import convert_checkpoint  # noqa: E402
from trt_gemma.errors import ConfigError  # noqa: E402
from trt_gemma.onnx.export import export_onnx  # noqa: E402
from trt_gemma.reference import ReferenceModel  # noqa: E402
from trt_gemma.runtime.base import GenerationParams  # noqa: E402
from trt_gemma.runtime.executor import View  # noqa: E402
from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend, OrtStepBackend, session_options  # noqa: E402
from trt_gemma.runtime.ort_executor import OrtExecutor  # noqa: E402
from trt_gemma.runtime.reference import ReferenceBackend  # noqa: E402
from trt_gemma.runtime.steploop import END, Row  # noqa: E402

TOL = 1e-4  # as tests/test_onnx_export.py: float32 summation noise (quantized graphs at accuracy level 0)


# ---- the executor ------------------------------------------------------------------------------------------------

def test_ort_executor_memory_ops_match_numpy(tmp_path, ckpt):
    export_onnx(ckpt("fp32"), tmp_path / "g", kv_cache="pool", show_progress=False)
    ex = OrtExecutor.open(tmp_path / "g")
    rng = np.random.default_rng(0)
    a, b = ex.alloc(4096), ex.alloc(4096)
    host = rng.standard_normal((8, 16)).astype(np.float32)
    ex.upload(View(a, 64, (8, 16), "float32"), host)
    np.testing.assert_array_equal(ex.download(View(a, 64, (8, 16), "float32")), host)
    # 5 rows of 24 bytes, src pitch 64 from byte 64, dst pitch 100 from byte 8: as cudaMemcpy2D
    ex.copy2d(b, 8, 100, a, 64, 64, 24, 5)
    src = np.asarray(a.handle)[64:64 + 5 * 64].reshape(5, 64)[:, :24]
    dst = np.asarray(b.handle)[8:8 + 5 * 100].reshape(5, 100)
    np.testing.assert_array_equal(dst[:, :24], src)
    assert not dst[:, 24:].any() and not np.asarray(b.handle)[:8].any(), "copy2d wrote outside its rows"
    names = {s.name for s in ex.io}
    assert {"input_ids", "past_lengths", "slot_ids", "next_token", "topk_ids", "new_kv"} <= names
    ex.close()


# ---- the graph against the reference -----------------------------------------------------------------------------

class NumpyPool:
    """An independent pool for driving the graph by hand: [2L, slots, kv, capacity, d] numpy arrays (stale rows
    filled with large values: the graph must mask them)."""

    def __init__(self, man: dict, slots: int, capacity: int):
        m = man["model"]
        self.L, self.vocab = m["num_hidden_layers"], m["vocab_size"]
        self.kv = np.full((2 * self.L, slots, m["num_key_value_heads"], capacity, m["head_size"]), 50.0, np.float32)

    def feeds(self, ids: np.ndarray, lengths: list[int], slots: list[int], bucket: int, mask=None) -> dict:
        f = {"input_ids": ids.astype(np.int64), "past_lengths": np.array(lengths, np.int64),
             "slot_ids": np.array(slots, np.int64), "past_positions": np.arange(bucket, dtype=np.int64)}
        for i in range(self.L):
            f[f"past_key_values.{i}.key"], f[f"past_key_values.{i}.value"] = self.kv[2 * i], self.kv[2 * i + 1]
        if mask is not None:
            f["vocab_mask"] = mask
        return f

    def write(self, new_kv: np.ndarray, lengths: list[int], slots: list[int]) -> None:
        for b, (n, s) in enumerate(zip(lengths, slots)):  # new_kv [2L, B, kv, T, d]
            self.kv[:, s, :, n:n + new_kv.shape[3]] = new_kv[:, b]


@pytest.mark.parametrize("kind", ["fp32", "awq"])
def test_pool_graph_matches_the_reference_per_row(kind, ckpt, tmp_path):
    """Two sequences of different lengths in different slots, prefilled apart (past the 8-token window), then
    decoded together in one batch: every step's logits, ArgMax, TopK and log-probabilities per row vs the reference."""
    src = ckpt(kind)
    export_onnx(src, tmp_path / "g", kv_cache="pool", top_k=16, vocab_mask=True, show_progress=False)
    man = json.loads((tmp_path / "g" / "trt_gemma_onnx.json").read_text())
    sess, ref = session(tmp_path / "g"), ReferenceModel.load(src)
    pool = NumpyPool(man, slots=3, capacity=64)
    rng = np.random.default_rng(2)
    prompts = {2: rng.integers(6, 380, 19), 0: rng.integers(6, 380, 11)}  # slot -> prompt
    caches, lengths, feed = {}, {}, {}
    allow = np.ones((1, pool.vocab), bool)
    names = [o.name for o in sess.get_outputs()]
    for slot, ids in prompts.items():
        caches[slot] = ref.new_cache(64)
        want = ref.forward(ids, caches[slot], last_only=True)[-1]
        out = dict(zip(names, sess.run(None, pool.feeds(ids[None], [0], [slot], 16, allow))))
        pool.write(out["new_kv"], [0], [slot])
        mx, mean = _max(out["logits"][0], want)
        assert mx <= TOL, f"{kind} prefill slot {slot}: logits max |Δ| {mx:.3g} > {TOL} (mean {mean:.3g})"
        lengths[slot], feed[slot] = len(ids), int(np.argmax(want))
    slots = [2, 0]
    for step in range(6):
        ids = np.array([[feed[s]] for s in slots])
        bucket = 32
        mask = np.ones((2, pool.vocab), bool)
        mask[1, rng.choice(pool.vocab, pool.vocab // 2, replace=False)] = False  # row 1: half the vocabulary
        out = dict(zip(names, sess.run(None, pool.feeds(ids, [lengths[s] for s in slots], slots, bucket, mask))))
        pool.write(out["new_kv"], [lengths[s] for s in slots], slots)
        for b, s in enumerate(slots):
            want = ref.forward(ids[b], caches[s], last_only=True)[-1]
            want = np.where(mask[b], want, -np.inf)
            mx, mean = _max(out["logits"][b][mask[b]], want[mask[b]])
            assert mx <= TOL, f"{kind} decode {step} slot {s}: logits max |Δ| {mx:.3g} > {TOL} (mean {mean:.3g})"
            assert out["next_token"][b] == np.argmax(want) and mask[b, out["next_token"][b]]
            # the greedy id is TopK's first candidate: exactly the graph's own logits' ArgMax (first of equals)
            assert out["next_token"][b] == np.argmax(out["logits"][b]) == out["topk_ids"][b][0]
            top = np.argsort(-want, kind="stable")[:16]
            lse = np.log(np.exp(want[mask[b]] - want.max()).sum()) + want.max()
            assert set(out["topk_ids"][b]) == set(top), f"{kind} decode {step} slot {s}: TopK ids differ"
            got_lp = dict(zip(out["topk_ids"][b], out["topk_logprobs"][b]))
            mx = max(abs(got_lp[t] - (want[t] - lse)) for t in top)
            assert mx <= TOL, f"{kind} decode {step} slot {s}: TopK log-probs max |Δ| {mx:.3g}"
            lengths[s] += 1
            feed[s] = int(out["next_token"][b])


def test_pool_options_are_checked(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="--logits last"):
        export_onnx(ckpt("fp32"), tmp_path / "a", kv_cache="pool", logits="all", show_progress=False)
    with pytest.raises(ConfigError, match="--kv-cache pool"):
        export_onnx(ckpt("fp32"), tmp_path / "b", vocab_mask=True, show_progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- the step loop -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded model (sliding window 128) in float32 and INT4-AWQ, each as a pool-layout export."""
    work = tmp_path_factory.mktemp("batched")
    fp32 = convert_checkpoint(None, work / "fp32", dtype="float32", show_progress=False)
    out = {"fp32": (fp32, work / "fp32_onnx"), "awq": (make_awq(fp32, work / "awq"), work / "awq_onnx")}
    for ck, onnx_dir in out.values():
        export_onnx(ck, onnx_dir, kv_cache="pool", top_k=32, show_progress=False)
    return out


def manual(onnx_dir, slots: int, chunk: int = 64) -> OrtStepBackend:
    """A step-loop backend whose engine thread is stopped: the test turns the loop itself."""
    b = OrtStepBackend.load(onnx_dir, slots=slots, accuracy_level=0, prefill_chunk=chunk)
    b.loop.close()
    b._thread.join()
    b.loop.closed = False
    return b


def drive(loop, arrivals: list[tuple[int, list[int], GenerationParams]], cancel_after: dict | None = None):
    """Submit request r at turn arrivals[r][0]; turn until all are done; per request the (token, finish) list."""
    out: list[list] = [[] for _ in arrivals]
    cancelled = [False] * len(arrivals)
    cancel_after = cancel_after or {}

    def sink(r):
        def put(item):
            if item is END:
                out[r].append(END)
            elif isinstance(item, BaseException):
                raise item
            else:
                out[r].append((item[0], item[3]))
                if len(out[r]) == cancel_after.get(r):
                    cancelled[r] = True
        return put

    turn = 0
    while turn <= max(a[0] for a in arrivals) or loop.rows or loop.waiting:
        for r, (at, ids, params) in enumerate(arrivals):
            if at == turn:
                stops = frozenset() if params.ignore_eos else frozenset([1])
                loop.submit(Row(np.array(ids), params, stops, sink(r), lambda r=r: cancelled[r]))
        loop.turn()
        turn += 1
    assert all(o and o[-1] is END for o in out), "a request did not end"
    return [o[:-1] for o in out]


def _prompts(tok, lengths: list[int]) -> list[list[int]]:
    from trt_gemma.assets import eval_text_path

    ids = tok.encode(eval_text_path().read_text()[:20000])
    return [ids[i * 7:i * 7 + n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("kind", ["fp32", "awq"])
def test_concurrent_greedy_rows_equal_their_solo_runs(embedded, kind):
    """Four requests (prompts of 9..170 tokens: two cross the 128-token window, one in several prefill chunks),
    different max_tokens, arriving at turns 0, 0, 3 and 7, in 3 slots (one waits): each row's tokens are its solo
    run's; the float32 ones are also the numpy reference's."""
    ck, onnx_dir = embedded[kind]
    b = manual(onnx_dir, slots=3)
    prompts = _prompts(b.tokenizer, [40, 170, 9, 120])
    params = [GenerationParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (20, 12, 30, 16)]
    batched = drive(b.loop, list(zip([0, 0, 3, 7], prompts, params)))
    assert b.loop.used_tokens() == 0 and sorted(b.loop.pool.free) == [0, 1, 2], "the pool was not given back"
    ref = ReferenceBackend.load(ck) if kind == "fp32" else None
    for r, (ids, p) in enumerate(zip(prompts, params)):
        solo = drive(b.loop, [(0, ids, p)])[0]
        assert batched[r] == solo, f"{kind} request {r}: batched {batched[r]} vs solo {solo}"
        assert len(solo) == p.max_tokens and solo[-1][1] == "length"
        if ref is not None:
            want = [s.token_id for s in ref.stream(ids, p)]
            assert [t for t, _ in solo] == want, f"request {r}: step loop vs reference"
    b.close()


def test_seeded_sampling_per_row_equals_solo_and_the_reference(embedded):
    """Sampled rows (TopK-candidate path: top_k <= the graph's 32; full-row path: top_k 0) keep their own seeded
    generator: batched = solo, and both draw what the reference sampler draws from the full logits."""
    ck, onnx_dir = embedded["fp32"]
    b, ref = manual(onnx_dir, slots=4), ReferenceBackend.load(ck)
    prompts = _prompts(b.tokenizer, [30, 140, 12, 60])
    params = [GenerationParams(max_tokens=16, temperature=0.9, top_k=20, seed=3, ignore_eos=True),
              GenerationParams(max_tokens=10, temperature=1.2, top_p=0.8, seed=5, ignore_eos=True),
              GenerationParams(max_tokens=14, temperature=0.0, ignore_eos=True),
              GenerationParams(max_tokens=12, temperature=0.7, top_k=32, top_p=0.9, seed=9, ignore_eos=True)]
    batched = drive(b.loop, list(zip([0, 1, 1, 4], prompts, params)))
    for r, (ids, p) in enumerate(zip(prompts, params)):
        solo = drive(b.loop, [(0, ids, p)])[0]
        want = [s.token_id for s in ref.stream(ids, p)]
        assert batched[r] == solo, f"request {r}: batched {batched[r]} vs solo {solo}"
        assert [t for t, _ in solo] == want, f"request {r} ({p}): step loop {solo} vs reference {want}"
    b.close()


def test_a_cancelled_row_frees_its_slot_and_changes_no_other_row(embedded):
    _, onnx_dir = embedded["fp32"]
    b = manual(onnx_dir, slots=3)
    prompts = _prompts(b.tokenizer, [25, 50, 140])
    params = [GenerationParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (24, 24, 24)]
    arrivals = list(zip([0, 0, 0], prompts, params))
    full = drive(b.loop, arrivals)
    cut = drive(b.loop, arrivals, cancel_after={1: 5})
    assert cut[1][:5] == full[1][:5] and len(cut[1]) == 6, f"the cancelled row went on: {cut[1]}"
    assert cut[1][-1] == (full[1][5][0], "cancelled"), "the token after the cancel is not marked cancelled"
    assert cut[0] == full[0] and cut[2] == full[2], "cancelling one row changed another's tokens"
    assert b.loop.used_tokens() == 0 and sorted(b.loop.pool.free) == [0, 1, 2]
    b.close()


def test_threaded_backend_streams_and_reports_pool_usage(embedded):
    """The backend as the scheduler uses it: concurrent stream() calls from threads, kv usage from the pool, back
    to 0 afterwards; text as the tokenizer decodes the ids."""
    import threading

    _, onnx_dir = embedded["fp32"]
    b = OnnxRuntimeBackend.load(onnx_dir, slots=2, accuracy_level=0)
    assert isinstance(b, OrtStepBackend) and b.name == "onnxruntime"
    prompts = _prompts(b.tokenizer, [20, 30, 40])
    p = GenerationParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    solo = [[s.token_id for s in b.stream(ids, p)] for ids in prompts]  # alone: the consumer runs the turns
    b.loop.consumer_turns = False  # as for an executor bound to one thread: the engine thread runs them
    assert [s.token_id for s in b.stream(prompts[0], p)] == solo[0]
    b.loop.consumer_turns = True
    got: dict = {}
    seen = []

    def run(i):
        steps = []
        for s in b.stream(prompts[i], p):
            steps.append(s)
            seen.append(b.kv_usage().used_tokens)
        got[i] = steps

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(3):
        assert [s.token_id for s in got[i]] == solo[i], f"stream {i} differs from its solo run"
        assert "".join(s.text for s in got[i]) == b.decode(solo[i])
        assert got[i][0].is_prompt_step and got[i][-1].finish_reason == "length"
    assert max(seen) > 0 and b.kv_usage().capacity_tokens == 2 * b.loop.limit
    for _ in range(200):  # the engine frees a row just after sending its last token
        if b.kv_usage().used_tokens == 0:
            break
        threading.Event().wait(0.01)
    assert b.kv_usage().used_tokens == 0 and sorted(b.loop.pool.free) == [0, 1]
    b.close()


def test_server_samples_with_each_requests_parameters(embedded):
    """The server's sampling path against the backend called directly with the same parameters, two requests at
    once sharing steps: a server that dropped temperature / top_p / top_k / seed would answer the greedy text or
    the same text for every seed."""
    import threading

    import openai
    from live_server import LiveServer

    from trt_gemma.serve.app import create_app

    _, onnx_dir = embedded["fp32"]
    b = OnnxRuntimeBackend.load(onnx_dir, slots=2)
    prompt = "The Python language"
    sampled = dict(temperature=0.9, top_p=0.85, top_k=24)

    def direct(seed, **kw):
        p = GenerationParams(max_tokens=24, ignore_eos=True, seed=seed, **kw)
        return "".join(s.text for s in b.stream(b.encode(prompt), p))

    want = {seed: direct(seed, **sampled) for seed in (13, 14)}
    greedy = direct(None, temperature=0.0)
    assert want[13] != greedy and want[13] != want[14], "the prompt does not tell sampling parameters apart"
    got: dict = {}
    with LiveServer(create_app(b, "m", max_queue=4, max_concurrency=2)) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(seed):
            r = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0.9, top_p=0.85,
                                          seed=seed, extra_body={"top_k": 24, "ignore_eos": True})
            got[seed] = r.choices[0].text

        threads = [threading.Thread(target=ask, args=(seed,)) for seed in want]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == want, f"served {got} vs direct {want}"
    b.close()
