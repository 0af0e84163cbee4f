"""The TensorRT backend (runtime/engine_backend.py) on this CPU host: the same construction a GPU runs, from the
bundle's real build record (a TensorRT-RTX engine built here for an RTX target), with onnxruntime executing the
bundle's own pool graph under the engine's profiles. Oracles: the numpy reference for greedy ids, each request run
alone through the same loop, the profile ranges the builder recorded (the executor refuses a step outside the
profile it is told), and the float32 export of the checkpoint for `trt-gemma check`'s mismatch detection.
GPU tests (marked `gpu` + `trt_runtime`) run the backend on the engine itself and skip here with the reason.
"""
from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")

from test_batched import _prompts, drive  # noqa: E402
from test_onnx_export import make_awq  # noqa: E402
from trt_gemma import check as C  # noqa: E402
from trt_gemma.runtime.base import GenerationParams  # noqa: E402
from trt_gemma.runtime.engine_backend import PoolPlan, TensorRTBackend, open_loop, step_model  # noqa: E402
from trt_gemma.runtime.onnxruntime import session_options  # noqa: E402
from trt_gemma.runtime.ort_executor import OrtExecutor  # noqa: E402
from trt_gemma.runtime.tensorrt import read_record  # noqa: E402


def _build(out, target: str = "rtx-3090"):
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["build", "--target", target, "--set", "quant=float16", "--set", "dtype=float16", "--skip-quality",
              "--engine", "tensorrt", "--out", str(out), "--json"])
    assert e.value.code == 0
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real bundle of the embedded model with a TensorRT-RTX engine for SM 8.6 (float16 pool graph)."""
    return _build(tmp_path_factory.mktemp("engine") / "b")


def stand_in(bundle, **kw) -> TensorRTBackend:
    """The TensorRT backend with onnxruntime as its executor (the record's profiles enforced), engine thread
    stopped so the test turns the loop."""
    record = read_record(bundle)
    ex = OrtExecutor.open(bundle / "onnx", session_options(0), profiles=list(PoolPlan.of_engine(record, bundle).profiles))
    b = TensorRTBackend.over(ex, record, bundle, **kw)
    b.loop.close()
    b._thread.join()
    b.loop.closed = False
    return b


def test_pool_and_profiles_come_from_the_build_record(bundle):
    record = read_record(bundle)
    plan = PoolPlan.of_engine(record, bundle)
    prefill, decode = record["io"]["profiles"]["prefill"], record["io"]["profiles"]["decode"]
    assert (plan.slots, plan.capacity, plan.dtype) == (prefill["past_key_values.0.key"][2][0],
                                                       decode["past_key_values.0.key"][2][2], "float16")
    assert plan.max_new == prefill["input_ids"][2][1] and plan.profiles == (prefill, decode)


def test_batched_staggered_requests_get_the_references_greedy_ids(bundle):
    """Four requests (9..300 prompt tokens: past the 128-token window), arriving at turns 0, 0, 2 and 5, in 3 slots:
    every step goes under a profile whose ranges hold it (both are used), each row's tokens are its solo run's and
    the numpy reference's; the pool and step buffers are what the executor reports by kind."""
    from trt_gemma.runtime.reference import ReferenceBackend

    b = stand_in(bundle, slots=3)
    prompts = _prompts(b.tokenizer, [40, 300, 9, 120])
    params = [GenerationParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 8, 16, 10)]
    batched = drive(b.loop, list(zip([0, 0, 2, 5], prompts, params)))
    assert set(b.loop._step_profile.values()) == {0, 1}, b.loop._step_profile  # prefill and decode both ran
    ref = ReferenceBackend.load(bundle / "checkpoint")
    for r, (ids, p) in enumerate(zip(prompts, params)):
        solo = drive(b.loop, [(0, ids, p)])[0]
        assert batched[r] == solo, f"request {r}: batched {batched[r]} vs solo {solo}"
        want = [s.token_id for s in ref.stream(ids, p)]
        assert [t for t, _ in solo] == want, f"request {r}: float16 graph via the backend vs the reference"
    s = b.loop.pool.shape
    mem = b.executor.memory_bytes()
    assert mem["kv_cache"] == 2 * s.layers * s.slots * s.kv_heads * s.capacity * s.head_dim * 2, mem
    assert mem["activations"] > 0
    b.close()


def test_a_prompt_longer_than_the_prefill_profile_is_refused_before_any_step(bundle):
    """A prompt of max_input_len + 1 tokens would need a second prefill chunk at a past the prefill profile does not
    take: an InputError naming the limit, and nothing was submitted to the loop (no slot taken)."""
    from trt_gemma.errors import InputError

    b = stand_in(bundle, slots=1)
    limit = PoolPlan.of_engine(read_record(bundle), bundle).max_new
    assert b.max_prompt == limit
    with pytest.raises(InputError, match=f"at most {limit}"):
        next(b.stream(list(range(3, limit + 4)), GenerationParams(max_tokens=1, temperature=0.0)))
    assert b.kv_usage().used_tokens == 0 and not b.loop.waiting and not b.loop.rows
    b.close()


def test_a_step_under_the_wrong_profile_is_refused(bundle):
    """The executor's profile check can fail: a loop told of no profiles runs every step as profile 0 (prefill),
    and the first decode step past that profile's past range (128) is refused, as TensorRT would."""
    record = read_record(bundle)
    plan = PoolPlan.of_engine(record, bundle)
    ex = OrtExecutor.open(bundle / "onnx", session_options(0), profiles=list(plan.profiles))
    from trt_gemma.onnx.export import read_manifest

    loop = open_loop(ex, read_manifest(bundle / "onnx"), dataclasses.replace(plan, profiles=()), slots=1)
    ids = _prompts(tokenizer(bundle), [150])[0]
    with pytest.raises(Exception, match="outside optimization profile 0"):
        drive(loop, [(0, ids, GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True))])


def test_check_end_to_end_with_the_backends_step_model_on_onnxruntime(bundle, tmp_path):
    """`trt-gemma check` after finding the engine, with the engine's step model (the same adapter over the loop)
    running on onnxruntime with the engine's profiles: equal to the oracle on the same graph; and the same adapter on
    the float16 graph against a float32 export fails the float32 tolerance (a mismatch is detected)."""
    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.onnx.export import export_onnx

    record = read_record(bundle)
    plan = PoolPlan.of_engine(record, bundle)
    ex = OrtExecutor.open(bundle / "onnx", session_options(0), profiles=list(plan.profiles))
    test = C.Side("engine step model (onnxruntime)", step_model(ex, bundle / "onnx", plan))
    r = C.check_bundle(bundle, test, max_tokens=8)
    assert r["ok"] and all(p["ids_equal"] for p in r["prompts"]), r["mismatches"]
    assert max(p["logits_max_abs_diff"] for p in r["prompts"]) < 1e-5  # one graph, one executor: same numbers
    assert len(r["speed"]) == 2 and all(s["decode_tok_s"] > 0 for s in r["speed"].values()), r["speed"]

    # the model the bundle was made from (the embedded one) with INT4-AWQ weights: a graph of another precision
    awq = make_awq(convert_checkpoint(None, tmp_path / "ck", dtype="float32", show_progress=False), tmp_path / "awq")
    export_onnx(awq, tmp_path / "awq_onnx", max_seq_len=plan.capacity, opset=21, logits="last",
                activations="float32", kv_cache="pool", show_progress=False)
    oracle = C.Side("onnxruntime int4-awq", C.ort_step_model(tmp_path / "awq_onnx"))
    prompts = [list(tokenizer(bundle).encode(p, add_bos=True)) for p in C.PROMPTS]
    bad = C.run_check(test, oracle, prompts, precision="float16", max_batch=2, plan={}, device_used=None,
                      max_tokens=16)
    worst = max(p["logits_max_abs_diff"] for p in bad["prompts"])
    assert not bad["ok"] and worst > C.TOLERANCE["float16"], worst
    assert any(p["first_divergence"] is not None for p in bad["prompts"]), bad["mismatches"]


def tokenizer(bundle):
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    return GemmaTokenizer.from_dir(bundle / "onnx")


def test_serve_keeps_onnxruntime_here_and_says_why(bundle, tmp_path):
    """This host has no GPU (or no cuda-python): the bundle is served as before, and the choice names the reason."""
    from trt_gemma.runtime.backends import engine_unavailable, load_backend
    from trt_gemma.runtime.tensorrt import unavailable_reason

    why = engine_unavailable(bundle)
    if unavailable_reason("tensorrt_rtx") is None:
        pytest.skip("this host runs TensorRT-RTX engines (the GPU test covers it)")
    assert why and unavailable_reason("tensorrt_rtx") in why, why
    b = load_backend(bundle, cache_dir=tmp_path / "cache")
    try:
        assert b.name == "onnxruntime" and b.choice == f"its TensorRT engine is not used: {why}", b.choice
    finally:
        b.close()
    (tmp_path / "b").mkdir()
    assert "no TensorRT engine" in engine_unavailable(tmp_path / "b")


@pytest.mark.gpu
@pytest.mark.trt_runtime
def test_the_backend_on_the_engine_matches_onnxruntime_on_its_graph(tmp_path):
    """On a GPU with TensorRT-RTX: a bundle built for this GPU's SM, served by `load_backend` on the TensorRT
    backend, gives the onnxruntime stand-in's greedy ids; memory by kind comes from the real allocations; and
    `trt-gemma check`'s engine side (load_step_model) passes against onnxruntime."""
    from trt_gemma.detect import detect
    from trt_gemma.runtime.backends import load_backend
    from trt_gemma.targets import TARGETS

    sm = detect().sm
    target = next((n for n, t in TARGETS.items() if t.family == "rtx" and t.sm == sm), None)
    if target is None:
        pytest.skip(f"no RTX target of SM {sm} to build a TensorRT-RTX engine for")
    b = _build(tmp_path / "b", target)
    gpu = load_backend(b, slots=2)
    cpu = stand_in(b, slots=2)
    try:
        assert isinstance(gpu, TensorRTBackend) and "on this GPU" in gpu.choice
        prompts = _prompts(cpu.tokenizer, [30, 70])
        p = GenerationParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        want = drive(cpu.loop, [(0, ids, p) for ids in prompts])
        got = [[s.token_id for s in gpu.stream(ids, p)] for ids in prompts]
        assert got == [[t for t, _ in w] for w in want]
        mem = gpu.device_memory()
        assert mem["engine"] > 0 and mem["kv_cache"] == gpu.loop.pool.shape.nbytes and mem["activations"] > 0
    finally:
        gpu.close()
        cpu.close()
    r = C.check_bundle(b, C.engine_side(b), max_tokens=8)
    assert r["ok"], r["mismatches"]
