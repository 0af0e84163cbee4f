"""The onnxruntime backend against the numpy reference backend (the oracle): the same greedy tokens on the embedded
model, the same seeded samples, cancellation and KV accounting; backend selection and the export cache."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs the onnx extra")
pytest.importorskip("onnx", reason="the onnxruntime backend needs the onnx extra")

from trt_gemma.runtime.backends import (GenerationParams, detect_kind, load_backend, onnx_cache_dir,  # noqa: E402
                                onnx_cache_opset)
from trt_gemma.runtime.onnxruntime import OnnxRuntimeBackend, OrtModel, OrtStepBackend  # noqa: E402
from trt_gemma.runtime.reference import ReferenceBackend  # noqa: E402
from trt_gemma.checkpoint.convert import convert_checkpoint  # noqa: E402
from trt_gemma.errors import InputError  # noqa: E402
from trt_gemma.onnx.export import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded trained model as a float32 checkpoint and its ONNX exports in both KV layouts."""
    work = tmp_path_factory.mktemp("embedded_onnx")
    ckpt = convert_checkpoint(None, work / "ckpt", dtype="float32", show_progress=False)
    for layout in ("concat", "inplace"):
        export_onnx(ckpt, work / layout, kv_cache=layout, show_progress=False)
    return ckpt, work


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny_onnx")
    ckpt = convert_checkpoint(tiny_model_dir, work / "ckpt", dtype="bfloat16", show_progress=False)
    export_onnx(ckpt, work / "onnx", logits="all", show_progress=False)
    return ckpt, work / "onnx"


def _tokens(backend, ids, **kw) -> tuple[list[int], list]:
    steps = list(backend.stream(ids, GenerationParams(**kw)))
    return [s.token_id for s in steps], steps


@pytest.mark.parametrize("layout", ["concat", "inplace"])
def test_greedy_tokens_equal_the_reference_on_the_embedded_model(embedded, layout):
    from trt_gemma.assets import eval_text_path

    ckpt, work = embedded
    ref, ob = ReferenceBackend.load(ckpt), OnnxRuntimeBackend.load(work / layout)
    ids = ref.encode(eval_text_path().read_text()[:400])
    want, _ = _tokens(ref, ids, max_tokens=32, temperature=0.0, ignore_eos=True)
    got, steps = _tokens(ob, ids, max_tokens=32, temperature=0.0, ignore_eos=True)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert len(want) == 32 and got == want, f"greedy tokens differ from step {first}: {got} vs {want}"
    assert steps[0].is_prompt_step and steps[-1].finish_reason == "length"
    assert ob.decode(got) == ref.decode(want)


def test_seeded_sampling_draws_what_the_reference_draws(tiny):
    ckpt, onnx_dir = tiny
    ref, ob = ReferenceBackend.load(ckpt), OnnxRuntimeBackend.load(onnx_dir)
    ids = ref.encode("The quick brown fox")
    kw = dict(max_tokens=12, temperature=0.8, top_k=40, top_p=0.95, seed=7, ignore_eos=True)
    assert _tokens(ob, ids, **kw)[0] == _tokens(ref, ids, **kw)[0]


def test_inplace_buffers_grow_and_keep_their_rows(tiny, tmp_path):
    """The in-place layout: one buffer per layer, bound as past and present; it grows by doubling and a decode step
    writes into the same numpy memory (nothing is copied back per step)."""
    ckpt, concat_dir = tiny
    export_onnx(ckpt, tmp_path / "inplace", kv_cache="inplace", logits="all", show_progress=False)
    model, ref = OrtModel(tmp_path / "inplace", accuracy_level=0), OrtModel(concat_dir, accuracy_level=0)
    cache, ref_cache = model.new_cache(200), ref.new_cache(200)
    ids = np.arange(10, 70)  # 60 tokens: the first buffer holds 64
    np.testing.assert_allclose(model.forward(ids, cache), ref.forward(ids, ref_cache), atol=1e-5)
    first = cache.arrays[0]
    assert first.shape[2] == 64 and np.abs(first[0, :, 59]).sum() > 0 and not first[0, :, 60:].any()
    for t in range(10):  # crosses 64: the buffers double to 128, rows copied
        np.testing.assert_allclose(model.forward([t + 7], cache, last_only=True),
                                   ref.forward([t + 7], ref_cache, last_only=True), atol=1e-5)
    assert cache.arrays[0].shape[2] == 128 and cache.length == 70
    np.testing.assert_array_equal(cache.arrays[0][0, :, :64], first[0])
    np.testing.assert_allclose(cache.arrays[0][0, :, :70], ref_cache.values[0].numpy()[0], atol=1e-5)


def test_kv_cache_stays_in_onnxruntime_between_steps(tiny):
    _, onnx_dir = tiny
    model = OrtModel(onnx_dir, accuracy_level=0)
    cache = model.new_cache(16)
    model.forward(np.arange(10, 15), cache)
    first = cache.values
    assert all(isinstance(v, ort.OrtValue) for v in first) and first[0].shape()[2] == 5
    model.forward([20], cache, last_only=True)
    assert cache.length == 6 and cache.values[0].shape()[2] == 6 and cache.values[0] is not first[0]
    with pytest.raises(InputError, match="overflow"):
        model.forward(np.arange(11), cache)
    with pytest.raises(InputError, match="max_seq_len"):
        model.new_cache(model.config.max_position_embeddings + 1)


def test_last_position_graph_serves_generation_and_refuses_all_logits(tiny, tmp_path):
    """The backend's own exports return the last position only: generation reads nothing else, and a request for
    every position's logits is a typed error naming the re-export."""
    ckpt, all_dir = tiny
    export_onnx(ckpt, tmp_path / "last", kv_cache="inplace", show_progress=False)
    model, ref = OrtModel(tmp_path / "last", accuracy_level=0), OrtModel(all_dir, accuracy_level=0)
    cache, ref_cache = model.new_cache(32), ref.new_cache(32)
    got, want = model.forward(np.arange(10, 30), cache, last_only=True), ref.forward(np.arange(10, 30), ref_cache)
    assert got.shape == (1, ref.config.vocab_size)
    np.testing.assert_allclose(got, want[-1:], atol=1e-5)
    with pytest.raises(InputError, match="--logits all"):
        model.forward(np.arange(30, 33), cache)


def test_cancellation_and_kv_accounting(tiny):
    _, onnx_dir = tiny
    ob = OnnxRuntimeBackend.load(onnx_dir, slots=2)
    seen = []

    def cancel() -> bool:
        seen.append(ob.kv_usage().used_tokens)
        return len(seen) >= 3

    ids = ob.encode("hello there")
    steps = list(ob.stream(ids, GenerationParams(max_tokens=50, temperature=0.0, ignore_eos=True), cancel=cancel))
    assert len(steps) == 3 and steps[-1].finish_reason == "cancelled"
    assert seen == [len(ids), len(ids) + 1, len(ids) + 2] and ob.kv_usage().used_tokens == 0
    assert ob.kv_usage().capacity_tokens == 2 * ob.info.context_length and ob.memory().weights_bytes > 0


def test_load_backend_defaults_to_onnxruntime_and_caches_the_export(tiny, tmp_path):
    ckpt, onnx_dir = tiny
    cache = tmp_path / "checkpoints"
    b = load_backend(ckpt, cache_dir=cache)
    entry = onnx_cache_dir(ckpt, cache)
    assert isinstance(b, OrtStepBackend) and b.name == "onnxruntime" and b.info.path == str(ckpt)
    assert entry.parent == tmp_path / "onnx" and detect_kind(entry) == "onnx"
    assert b.model.manifest["model"]["kv_cache"] == "pool", "the cache entry is not the step loop's layout"
    assert b.model.manifest["opset"] == onnx_cache_opset(), "the cache entry is not at the backend's own opset"
    stamp = (entry / "model.onnx").stat().st_mtime_ns
    load_backend(ckpt, cache_dir=cache)  # reused, not exported again
    assert (entry / "model.onnx").stat().st_mtime_ns == stamp
    assert type(load_backend(ckpt, cache_dir=cache, backend="reference")) is ReferenceBackend
    assert isinstance(load_backend(onnx_dir), OnnxRuntimeBackend)
    with pytest.raises(InputError, match="--backend trtllm"):
        load_backend(ckpt, backend="trtllm")
    with pytest.raises(InputError, match="ONNX export"):
        load_backend(onnx_dir, backend="reference")


def test_generate_cli_on_both_backends(tiny, tmp_path):
    ckpt, onnx_dir = tiny

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "trt_gemma", "generate", *map(str, args), "--prompt", "fox",
                            "--max-tokens", "6", "--json"], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "TRT_GEMMA_CACHE": str(tmp_path)})
        assert p.returncode == 0, p.stderr
        return json.loads(p.stdout)

    direct, ref = run(onnx_dir), run(ckpt, "--backend", "reference")
    assert direct["backend"] == "onnxruntime" and ref["backend"] == "reference"
    assert direct["token_ids"] == ref["token_ids"] and direct["decode_tokens_per_s"] > 0
    auto = run(ckpt)
    assert auto["backend"] == "onnxruntime" and auto["token_ids"] == ref["token_ids"]
    assert list((tmp_path / "onnx").iterdir()), "auto should export into $TRT_GEMMA_CACHE/onnx"


def test_float16_export_runs_in_the_backend_and_bfloat16_is_refused(embedded, tmp_path):
    """A float16-activation export decodes through the backend with float16 KV buffers (half the bytes per token) and
    the reference's greedy tokens on the embedded model; a bfloat16 one (TensorRT only) is a typed error."""
    from trt_gemma.assets import eval_text_path

    ckpt, work = embedded
    export_onnx(ckpt, tmp_path / "fp16", kv_cache="inplace", activations="float16", show_progress=False)
    ref, ob = ReferenceBackend.load(ckpt), OnnxRuntimeBackend.load(tmp_path / "fp16")
    f32 = OrtModel(work / "inplace")
    assert ob.model.kv_dtype == np.float16 and ob.model.kv_bytes_per_token * 2 == f32.kv_bytes_per_token
    ids = ref.encode(eval_text_path().read_text()[:400])
    want, _ = _tokens(ref, ids, max_tokens=32, temperature=0.0, ignore_eos=True)
    got, _ = _tokens(ob, ids, max_tokens=32, temperature=0.0, ignore_eos=True)
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, f"float16 greedy tokens differ from the reference's from step {first}"
    export_onnx(ckpt, tmp_path / "bf16", activations="bfloat16", show_progress=False)
    with pytest.raises(InputError, match="--activations float32"):
        OrtModel(tmp_path / "bf16")
