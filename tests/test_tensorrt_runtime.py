"""The TensorRT executor's decisions, on the build record of a real TensorRT-RTX build made here, and the executor on a
GPU (marked `gpu` + `trt_runtime`: skipped with the reason on a host without a GPU, TensorRT and cuda-python).

What runs here: the load checks (builder, version, SM; the engine's I/O against the builder's record), profile choice
from shapes, the binding plan and its addresses, when a step becomes a CUDA graph, the memory ledger, cuda-python's
error check on a real failing call, and the typed error of opening an engine without a GPU.
"""
from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json

import numpy as np
import pytest

from trt_gemma.errors import DependencyError, DeviceError, EngineMismatchError, InputError
from trt_gemma.runtime import cuda_memory
from trt_gemma.runtime.engine_plan import (GraphCache, MemoryLedger, binding_plan, check_build_record, check_io,
                                           io_mismatches, select_profile)
from trt_gemma.runtime.executor import Buffer, TensorSpec, View

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
LIMITS = dict(max_batch_size=2, max_input_len=8, max_seq_len=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A bundle-shaped dir whose tensorrt/ holds a real TensorRT-RTX engine (SM 8.9) of a Gemma-2-shaped decode step
    (tests/test_engine_build.decoder_step_graph) and its manifest with the builder's I/O record."""
    if not HAS_RTX:
        pytest.skip("tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    import onnx
    from test_engine_build import decoder_step_graph

    from trt_gemma.engine.build import build_engine
    from trt_gemma.engine.profiles import Limits
    from trt_gemma.targets import TARGETS

    root = tmp_path_factory.mktemp("bundle")
    onnx.save(decoder_step_graph(), str(root / "graph.onnx"))
    build_engine(root / "graph.onnx", root / "tensorrt", TARGETS["rtx-4090"], Limits(**LIMITS))
    return root, json.loads((root / "tensorrt" / "manifest.json").read_text())


# --- load checks ---------------------------------------------------------------------------------------------------

@needs_rtx
def test_the_build_record_names_every_io_tensor_as_the_builder_saw_it(built):
    _, record = built
    io = record["io"]
    names = [t["name"] for t in io["tensors"]]
    assert names[:2] == ["input_ids", "attention_mask"] and "logits" in names and "present.1.value" in names
    past = next(t for t in io["tensors"] if t["name"] == "past_key_values.0.key")
    assert past == {"name": "past_key_values.0.key", "dtype": "float16", "shape": [-1, 2, -1, 128], "is_input": True}
    assert list(io["profiles"]) == ["prefill", "decode"]
    # the ranges read back from the builder's profile objects are the recipe's (engine/profiles.role_ranges)
    assert io["profiles"]["decode"]["past_key_values.0.key"] == [[1, 2, 1, 128], [1, 2, 8, 128], [2, 2, 15, 128]]
    assert io["profiles"]["prefill"]["input_ids"] == [[1, 1], [1, 4], [2, 8]]


@needs_rtx
def test_build_record_matches_the_installed_builder_and_its_sm(built, tmp_path):
    _, record = built
    version = importlib.metadata.version("tensorrt_rtx")
    check_build_record(record, lib="tensorrt_rtx", version=version, gpu_sm=89, gpu_name="RTX 4090", bundle=tmp_path)
    cases = [(dict(lib="tensorrt_rtx", version=version, gpu_sm=86, gpu_name="RTX 3090"), "SM 8.6"),
             (dict(lib="tensorrt_rtx", version="1.2.0.54", gpu_sm=89, gpu_name="RTX 4090"), "1.2.0.54"),
             (dict(lib="tensorrt", version="10.3.0", gpu_sm=89, gpu_name="L4"), "tensorrt 10.3.0")]
    for here, named in cases:
        with pytest.raises(EngineMismatchError) as e:
            check_build_record(record, bundle=tmp_path, **here)
        assert named in e.value.message and f"tensorrt_rtx {version} for SM 8.9" in e.value.message, e.value.message
        assert e.value.fix.endswith(f"trt-gemma build --from-bundle {tmp_path} --engine tensorrt --force")


@needs_rtx
def test_io_check_names_what_differs(built, tmp_path):
    _, record = built
    io = record["io"]
    assert io_mismatches(io, copy.deepcopy(io)) == []
    other = copy.deepcopy(io)
    other["tensors"][0]["dtype"] = "int32"
    other["tensors"] = [t for t in other["tensors"] if t["name"] != "present.1.value"]
    other["profiles"]["decode"]["input_ids"][2] = [4, 1]
    diff = io_mismatches(other, io)
    assert diff == ["input_ids: dtype int32 in the engine, int64 in the build record",
                    "present.1.value: missing from the engine",
                    "profile 1 input_ids: [[1, 1], [1, 1], [4, 1]] in the engine, "
                    "[[1, 1], [1, 1], [2, 1]] in the build record"], diff
    with pytest.raises(EngineMismatchError, match="input_ids: dtype int32"):
        check_io(other, io, tmp_path / "model.engine", tmp_path)
    with pytest.raises(EngineMismatchError, match="no I/O record"):
        check_io(io, None, tmp_path / "model.engine", tmp_path)


# --- profiles and bindings -----------------------------------------------------------------------------------------

def _shapes(batch: int, new: int, past: int) -> dict:
    kv = (batch, 2, past, 128)
    return {"input_ids": (batch, new), "attention_mask": (batch, past + new),
            **{f"past_key_values.{i}.{k}": kv for i in range(2) for k in ("key", "value")}}


@needs_rtx
def test_profile_follows_the_step_shapes(built):
    profiles = list(built[1]["io"]["profiles"].values())
    assert select_profile(_shapes(1, 5, 0), profiles) == 0  # a fresh prompt: prefill
    assert select_profile(_shapes(2, 1, 9), profiles) == 1  # one token on a 9-token cache: decode
    assert select_profile(_shapes(1, 1, 0), profiles) == 0  # a one-token prompt: only prefill takes past 0
    assert select_profile(_shapes(1, 1, 3), profiles) == 1  # both take it; decode is the tighter
    with pytest.raises(InputError) as e:
        select_profile(_shapes(2, 9, 0), profiles)  # longer than max_input_len
    assert "input_ids of shape [2, 9]" in e.value.message and "profile 0: [1, 1]..[2, 8]" in e.value.message


def _io(record) -> tuple[TensorSpec, ...]:
    return TensorSpec.of_records(record["io"]["tensors"])


@needs_rtx
def test_binding_plan_addresses_are_buffer_plus_offset(built):
    io = _io(built[1])
    base = 0x7F00_0000_0000
    pool = Buffer(base, 1 << 20)
    views, offset = {}, 0
    shapes = {**_shapes(1, 1, 3), "logits": (1, 1, 384), **{f"present.{i}.{k}": (1, 2, 1, 128)
                                                             for i in range(2) for k in ("key", "value")}}
    for spec in io:
        views[spec.name] = View(pool, offset, shapes[spec.name], spec.dtype)
        offset += views[spec.name].nbytes
    plan = binding_plan(io, views)
    assert [b.name for b in plan] == [s.name for s in io]
    assert all(b.address == base + views[b.name].offset for b in plan)
    assert [b.is_input for b in plan] == [s.is_input for s in io]
    with pytest.raises(InputError, match=r"missing \['logits'\]"):
        binding_plan(io, {k: v for k, v in views.items() if k != "logits"})
    with pytest.raises(InputError, match="past_key_values.0.key is bound as float32"):
        binding_plan(io, {**views, "past_key_values.0.key": View(pool, 0, (1, 2, 3, 128), "float32")})
    with pytest.raises(InputError, match=r"engine has float16\[-1, 2, -1, 128\]"):  # kv heads are fixed at 2
        binding_plan(io, {**views, "past_key_values.0.key": View(pool, 0, (1, 4, 3, 128), "float16")})


def test_graph_cache_captures_warm_keys_and_evicts_the_oldest():
    from trt_gemma.runtime.engine_plan import Binding

    def key(batch, address):
        return GraphCache.key(1, (Binding("input_ids", address, (batch, 1), True),))

    cache = GraphCache(warmup=2, capacity=2)
    assert [cache.action(key(1, 100)) for _ in range(3)] == ["run", "run", "capture"]
    assert cache.add(key(1, 100), "g1") == []
    assert cache.action(key(1, 100)) == "replay"
    assert cache.action(key(1, 200)) == "run"  # same shape at another address: a graph would replay stale pointers
    for k, g in ((key(2, 100), "g2"), (key(4, 100), "g4")):
        cache.action(k), cache.action(k), cache.action(k)
        evicted = cache.add(k, g)
    assert evicted == ["g1"] and list(cache.graphs.values()) == ["g2", "g4"]
    assert sorted(cache.clear()) == ["g2", "g4"] and not cache.graphs


def test_memory_ledger_reports_live_allocations_by_kind():
    ledger = MemoryLedger(fixed={"engine": 2_550_000_000})
    ledger.add(0x1000, 4096, "kv_cache")
    ledger.add(0x3000, 512, "activations")
    ledger.add(0x5000, 1024, "kv_cache")
    ledger.remove(0x5000)
    assert ledger.totals() == {"engine": 2_550_000_000, "kv_cache": 4096, "activations": 512}


# --- cuda-python -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not cuda_memory.installed(), reason="cuda-python is not installed")
def test_a_failing_cuda_call_is_a_device_error_naming_the_call():
    rt = cuda_memory.cudart()
    with pytest.raises(DeviceError) as e:  # no such device on any host (here: no driver at all)
        cuda_memory.check("cudaSetDevice", rt.cudaSetDevice(1 << 20))
    assert e.value.message.startswith("cudaSetDevice failed: cudaError") and e.value.fix
    ok = rt.cudaRuntimeGetVersion()  # answered by the bindings themselves, driver or not
    assert cuda_memory.check("cudaRuntimeGetVersion", ok) == ok[1] > 0


def test_strided_copies_stay_inside_their_buffers():
    cuda_memory.check_2d("dst", nbytes=4096, offset=256, pitch=1024, width=256, height=4)  # ends at 3584
    with pytest.raises(ValueError, match="end at 4352, past the 4096-byte buffer"):
        cuda_memory.check_2d("dst", nbytes=4096, offset=1024, pitch=1024, width=256, height=4)
    with pytest.raises(ValueError, match="not a 2-D copy"):
        cuda_memory.check_2d("src", nbytes=4096, offset=0, pitch=128, width=256, height=2)


# --- the executor ----------------------------------------------------------------------------------------------------

@pytest.mark.no_gpu
@needs_rtx
def test_opening_an_engine_without_a_gpu_is_a_typed_error(built):
    from trt_gemma.runtime.tensorrt import TensorRTExecutor

    with pytest.raises(DependencyError) as e:
        TensorRTExecutor(built[0])
    assert "no NVIDIA GPU" in e.value.message or "cuda-python" in e.value.message, e.value.message


@pytest.mark.gpu
@pytest.mark.trt_runtime
@needs_rtx
def test_executor_runs_both_profiles_like_onnxruntime(tmp_path):
    """On a GPU with TensorRT-RTX: the decode-step graph built for this GPU's SM, run through the executor at a
    prefill and (five times: warm-up, capture, replays) a decode shape, against onnxruntime on the same graph."""
    import onnx
    import onnxruntime as ort
    from test_engine_build import decoder_step_graph

    from trt_gemma.detect import detect
    from trt_gemma.engine.build import build_engine
    from trt_gemma.engine.profiles import Limits
    from trt_gemma.runtime.tensorrt import TensorRTExecutor
    from trt_gemma.targets import TARGETS

    sm = detect().sm
    target = next((t for t in TARGETS.values() if t.family == "rtx" and t.sm == sm), None)
    if target is None:
        pytest.skip(f"no RTX target of SM {sm} to build a TensorRT-RTX engine for")
    onnx.save(decoder_step_graph(), str(tmp_path / "graph.onnx"))
    build_engine(tmp_path / "graph.onnx", tmp_path / "tensorrt", target, Limits(**LIMITS))
    sess = ort.InferenceSession(str(tmp_path / "graph.onnx"), providers=["CPUExecutionProvider"])
    ex = TensorRTExecutor(tmp_path)
    try:
        rng = np.random.default_rng(0)
        for profile, (batch, new, past), repeats in ((0, (1, 5, 0), 1), (1, (2, 1, 9), 5)):
            feeds = {"input_ids": rng.integers(0, 384, (batch, new)), "attention_mask": np.ones((batch, past + new)),
                     **{n: rng.standard_normal((batch, 2, past, 128)).astype(np.float16)
                        for n in (s.name for s in ex.io if s.name.startswith("past_"))}}
            feeds = {k: v.astype(np.int64) if k in ("input_ids", "attention_mask") else v for k, v in feeds.items()}
            want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
            views = {}
            for spec in ex.io:
                shape = feeds[spec.name].shape if spec.is_input else want[spec.name].shape
                nbytes = int(np.prod(shape)) * np.dtype(spec.dtype).itemsize
                views[spec.name] = View(ex.alloc(max(nbytes, 1)), 0, tuple(shape), spec.dtype)
                if spec.is_input:
                    ex.upload(views[spec.name], feeds[spec.name])
            for _ in range(repeats):
                ex.run(profile, views)
                got = ex.download(views["logits"]).astype(np.float32)
                err = float(np.abs(got - want["logits"].astype(np.float32)).max())
                assert err < 5e-2, f"profile {profile}: max |logits diff| {err} vs onnxruntime"
        mem = ex.memory_bytes()
        assert mem["engine"] > 0 and mem["activations"] > 0, mem
    finally:
        ex.close()


@pytest.mark.gpu
@pytest.mark.trt_runtime
def test_cuda_stream_round_trip_strided_copy_and_graph():
    """cuda-python on a GPU: upload, a strided device copy (a pool's rows), download, and a captured copy replayed."""
    s = cuda_memory.CudaStream()
    a, b = s.malloc(4096), s.malloc(4096)
    try:
        host = np.arange(1024, dtype=np.float32)
        s.upload(a, host)
        s.copy2d(b, 1024, a, 512, 256, 4)  # 4 rows of 256 bytes, read every 512, written every 1024
        want = host.reshape(8, 128)[:4, :64]  # row r of the source starts at float 128 r, of the destination at 256 r
        np.testing.assert_array_equal(s.download(b, (1024,), "float32").reshape(4, 256)[:, :64], want)
        s.begin_capture()
        s.copy2d(b, 1024, a, 512, 256, 4)
        graph = s.end_capture()
        s.upload(b, np.zeros(1024, np.float32))
        s.launch(graph[1])
        np.testing.assert_array_equal(s.download(b, (1024,), "float32").reshape(4, 256)[:, :64], want)
        s.destroy_graph(*graph)
        assert s.mem_info()[1] > 0 and s.sm()[0] >= 50
    finally:
        s.free(a), s.free(b), s.close()


def test_device_memory_by_kind_reaches_telemetry(tiny_model_dir, tmp_path):
    """A backend with `device_memory()` (the TensorRT executor's ledger totals) shows each kind in memory_bytes, as
    /metrics exports it; a backend without one leaves engine/activations unavailable (omitted, never 0)."""
    from trt_gemma.runtime.backends import load_backend
    from trt_gemma.telemetry import MEMORY_KINDS, UNAVAILABLE, snapshot

    backend = load_backend(tiny_model_dir, cache_dir=tmp_path, backend="reference")
    plain = snapshot(backend)["memory_bytes"]
    assert plain["engine"] == UNAVAILABLE and plain["activations"] == UNAVAILABLE
    ledger = MemoryLedger(fixed={"engine": 123_456_789})
    ledger.add(0x10000, 64 << 20, "kv_cache")
    ledger.add(0x20000, 3 << 20, "activations")

    class DeviceBackend(type(backend)):  # the one method a device backend adds
        def device_memory(self):
            return ledger.totals()

    backend.__class__ = DeviceBackend
    mem = snapshot(backend)["memory_bytes"]
    assert {k: mem[k] for k in ("engine", "activations", "kv_cache")} == \
        {"engine": 123_456_789, "activations": 3 << 20, "kv_cache": 64 << 20}
    assert {"engine", "activations", "kv_cache"} <= set(MEMORY_KINDS)
