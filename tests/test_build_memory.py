"""`plan` predicts the engine build's peak memory and, where it exceeds the module, names the remedies.

The measurements are the real tensorrt-rtx 1.7 builder's peak RSS on synthetic Gemma-2-2B-shaped INT4-AWQ graphs
(float16 activations, int4 lm_head, SM 8.9, this CPU host; benchmarks/build_memory.py reproduces the first two, the
third is the full 2B shape measured the same day): the model must never predict less than was measured, and stay
within 30% above it.
"""
from __future__ import annotations

import pytest

from trt_gemma.engine.plan import BUILD_REMEDIES, build_memory, build_plan, engine_activations
from trt_gemma.plan import plan
from trt_gemma.recipes import DTYPES
from trt_gemma.targets import TARGETS

# (graph weight bytes, measured peak builder RSS bytes)
MEASURED_FP16 = [(270_967_365, 1_024_352_256), (1_082_257_683, 3_165_462_528), (2_420_000_000, 8_200_000_000)]


@pytest.mark.parametrize("weights,peak", MEASURED_FP16)
def test_prediction_bounds_the_measured_builds(weights, peak):
    got = build_memory(weights, "float16")["peak_bytes"]
    assert peak <= got <= 1.3 * peak, f"predicted {got / 1e9:.2f} GB for a measured {peak / 1e9:.2f} GB"


def test_float32_graphs_cost_more_and_the_route_never_exports_one():
    table = 256_000 * 2304 * 2
    assert build_memory(2_420_000_000, "float32", table)["peak_bytes"] >= 9_700_000_000  # measured 9.7 GB
    assert engine_activations("float32", 87) == "float16" and engine_activations("bfloat16", 87) == "bfloat16"
    assert all(engine_activations(d, 75) == d for d in DTYPES)  # recipes' own dtypes are kept


def test_orin_nano_8gb_build_of_2b_exceeds_memory_and_names_the_remedies():
    b = plan("gemma-2-2b", TARGETS["jetson-orin-nano-8gb"]).tensorrt["build"]
    assert b["on_device"] and b["verdict"] == "exceeds memory" and b["peak_bytes"] > b["usable_bytes"]
    assert [r.split(" ")[0] for r in b["remedies"]] == ["add", "stop", "cap", "build"]
    assert "jetson/setup.sh --swap-dir" in b["remedies"][0]
    big = plan("gemma-2-2b", TARGETS["jetson-agx-orin-64gb"]).tensorrt["build"]
    assert big["verdict"] == "fits" and big["remedies"] == []


def test_off_device_builders_report_host_ram_without_a_verdict():
    t = TARGETS["rtx-4090"]
    b = build_plan(2_420_000_000, 0, "float16", t, on_device=False)
    assert b["verdict"] is None and b["usable_bytes"] is None and b["peak_bytes"] > 8e9
    # a dGPU built on the device still has no verdict: the builder's RAM is the host's, not the card's
    assert build_plan(2_420_000_000, 0, "float16", t, on_device=True)["verdict"] is None
    assert {k for k, _ in BUILD_REMEDIES} >= {"swap", "workspace", "optimization_level"}
