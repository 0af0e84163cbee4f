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
