import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    """GPU tests need a real NVIDIA GPU *and* tensorrt_llm; skip them here with the reason, never fake them."""
    from trt_gemma.gpu_probe import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    if reason:
        for item in items:
            if "gpu" in item.keywords:
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
