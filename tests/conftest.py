import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    """GPU tests need a real NVIDIA GPU and what they run on it: tensorrt_llm, or (marked `trt_runtime` too) TensorRT
    or TensorRT-RTX with cuda-python. Skipped here with the reason, never faked."""
    from trt_gemma.gpu_probe import gpu_unavailable_reason
    from trt_gemma.runtime.tensorrt import unavailable_reason

    from trt_gemma.detect import detect

    reasons = {"trtllm": gpu_unavailable_reason(), "trt_runtime": unavailable_reason()}
    host_gpu = detect()
    for item in items:
        if "no_gpu" in item.keywords and host_gpu.kind != "none":  # it asserts what a GPU-less host reports
            item.add_marker(pytest.mark.skip(reason=f"asserts a host without a GPU; this one has {host_gpu.name}"))
        if "gpu" in item.keywords:
            reason = reasons["trt_runtime" if "trt_runtime" in item.keywords else "trtllm"]
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random float32 Gemma 2 saved by transformers (with tokenizer), shared read-only by tests."""
    from tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session", autouse=True)
def own_model_cache(tmp_path_factory):
    """The suite's converted models go to a cache of its own under pytest's temp dir (removed with it), never into
    the user's ~/.cache/trt_gemma; subprocesses inherit it. Tests about the cache set their own per test."""
    saved = os.environ.get("TRT_GEMMA_CACHE")
    os.environ["TRT_GEMMA_CACHE"] = str(tmp_path_factory.mktemp("trt_gemma_cache"))
    yield
    if saved is None:
        os.environ.pop("TRT_GEMMA_CACHE", None)
    else:
        os.environ["TRT_GEMMA_CACHE"] = saved
