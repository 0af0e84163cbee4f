"""`--device cpu | cuda | tensorrt` for the onnxruntime backend: which execution providers, with which options.

The installed onnxruntime here is the CPU build, so asking it for CUDA is a real refusal with the install line; the
TensorRT EP's profile options are built from a real graph (the Gemma-2-shaped decode step of test_engine_build) and
must describe the same profiles `build --engine tensorrt` gives the TensorRT builder.
"""
from __future__ import annotations

import importlib.util

import pytest

from trt_gemma.errors import ConfigError, DependencyError
from trt_gemma.runtime import providers as P

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
CPU_ONLY = "CUDAExecutionProvider" not in ort.get_available_providers()


def test_cpu_is_the_cpu_provider_alone():
    c = P.choose("cpu")
    assert c.providers == (("CPUExecutionProvider", {}),) and c.ort_device == "cpu"


@pytest.mark.skipif(not CPU_ONLY, reason="this onnxruntime has the CUDA EP")
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_a_gpu_device_on_cpu_onnxruntime_names_the_install(device):
    with pytest.raises(DependencyError) as e:
        P.choose(device)
    assert P.EP_NAMES[device] in e.value.message and "onnxruntime-gpu" in e.value.fix


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="--device 'npu'"):
        P.choose("npu", available=["CPUExecutionProvider"])


def test_tensorrt_ep_gets_the_builders_profiles_and_a_cache_beside_the_graph(tmp_path):
    from test_engine_build import decoder_step_graph

    from trt_gemma.engine.profiles import Limits, graph_inputs, profiles

    onnx.save(decoder_step_graph(), str(tmp_path / "model.onnx"))
    limits = Limits(2, 8, 16)
    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    c = P.choose("tensorrt", tmp_path / "model.onnx", limits, available=have)
    assert [name for name, _ in c.providers] == have and c.ort_device == "cuda"
    opts = c.providers[0][1]
    assert opts["trt_engine_cache_path"] == str(tmp_path / P.TRT_EP_CACHE) and (tmp_path / P.TRT_EP_CACHE).is_dir()
    want = profiles(graph_inputs(tmp_path / "model.onnx"), limits)
    for which, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        entries = [e.split(":") for e in opts[key].split(",")]
        parsed = [(name, tuple(int(d) for d in dims.split("x"))) for name, dims in entries]
        assert parsed == [(n, s[which]) for prof in want.values() for n, s in prof.items()], key
    assert opts["trt_profile_max_shapes"].startswith("input_ids:2x8,attention_mask:2x16,")


@pytest.mark.skipif(not CPU_ONLY, reason="this onnxruntime has the CUDA EP")
def test_serving_on_cuda_without_onnxruntime_gpu_is_refused(tiny_model_dir, tmp_path):
    from trt_gemma.runtime.backends import load_backend

    with pytest.raises(DependencyError, match="CUDAExecutionProvider"):
        load_backend(tiny_model_dir, cache_dir=tmp_path, device="cuda")
    with pytest.raises(ConfigError, match="--backend reference does not take it"):
        load_backend(tiny_model_dir, cache_dir=tmp_path, backend="reference", device="cuda")


@pytest.mark.gpu
@pytest.mark.trt_runtime
@pytest.mark.skipif(CPU_ONLY or importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime-gpu")
def test_cuda_device_generates_the_cpu_ids(tiny_model_dir, tmp_path):
    from trt_gemma.runtime.backends import load_backend
    from trt_gemma.runtime.base import GenerationParams

    ids = {}
    for device in ("cpu", "cuda"):
        b = load_backend(tiny_model_dir, cache_dir=tmp_path, backend="onnxruntime", device=device)
        ids[device] = [s.token_id for s in b.stream([2, 10, 20, 30], GenerationParams(8, temperature=0.0))]
    assert ids["cuda"] == ids["cpu"], ids
