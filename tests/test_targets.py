"""Target table vs the figures on docs/facts/targets.md, and precision support from ordered SM rules."""
from __future__ import annotations

import json

import pytest

from trt_gemma.errors import InputError
from trt_gemma.targets import FAMILIES, GiB, MiB, PRECISIONS, RULES, TARGETS, get_target, support_level, supports

ISSUE_TARGETS = [
    "jetson-orin-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nano-super", "jetson-orin-nx-8gb",
    "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb", "jetson-thor", "rtx-3060-12gb", "rtx-3090",
    "rtx-4060-8gb", "rtx-4090", "rtx-5090", "rtx-a6000", "rtx-4000-ada", "rtx-6000-ada", "rtx-pro-6000-blackwell",
    "t4", "a10", "l4", "a100-40gb", "a100-80gb", "h100", "h200", "b200",
]

# (target, SM, memory GiB, bandwidth GB/s) transcribed from docs/facts/targets.md §1 (an independent copy of the facts).
REFERENCE = [
    ("jetson-orin-nano-4gb", 87, 4, 34), ("jetson-orin-nano-8gb", 87, 8, 68), ("jetson-orin-nano-super", 87, 8, 102),
    ("jetson-orin-nx-8gb", 87, 8, 102.4), ("jetson-orin-nx-16gb", 87, 16, 102.4),
    ("jetson-agx-orin-32gb", 87, 32, 204.8), ("jetson-agx-orin-64gb", 87, 64, 204.8), ("jetson-thor", 110, 128, 273),
    ("t4", 75, 16, 320), ("a10", 86, 24, 600), ("a100-80gb", 80, 80, 2000), ("rtx-3090", 86, 24, 936.2),
    ("l4", 89, 24, 300), ("rtx-4090", 89, 24, 1008), ("h100", 90, 80, 3350), ("h200", 90, 141, 4800),
    ("b200", 100, 192, 8000), ("rtx-5090", 120, 32, 1790),
]


def test_every_issue_target_is_in_the_table():
    assert sorted(TARGETS) == sorted(ISSUE_TARGETS), set(TARGETS) ^ set(ISSUE_TARGETS)


@pytest.mark.parametrize("name,sm,gib,bw", REFERENCE)
def test_figures_match_reference_page(name, sm, gib, bw):
    t = TARGETS[name]
    assert (t.sm, t.memory_bytes, t.bandwidth_gbs) == (sm, gib * GiB, bw)


def test_jetson_memtotal_figures_from_reference():
    # docs/facts/targets.md §1: Orin Nano 8GB MemTotal 7620 MB, AGX Orin 30536 / 62817 MB
    assert TARGETS["jetson-orin-nano-8gb"].usable_bytes == 7620 * MiB
    assert TARGETS["jetson-orin-nano-super"].usable_bytes == 7620 * MiB
    assert TARGETS["jetson-agx-orin-32gb"].usable_bytes == 30536 * MiB
    assert TARGETS["jetson-agx-orin-64gb"].usable_bytes == 62817 * MiB
    for name in ("jetson-orin-nano-8gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb"):
        assert "usable_bytes" not in TARGETS[name].unconfirmed
    for name in ("jetson-orin-nano-4gb", "jetson-orin-nx-8gb", "jetson-orin-nx-16gb", "jetson-thor"):
        assert "usable_bytes" in TARGETS[name].unconfirmed, f"{name}: estimated MemTotal must be flagged"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fields_are_consistent(name):
    t = TARGETS[name]
    assert t.family in FAMILIES
    assert t.unified == (t.family == "jetson")
    assert 0 < t.usable_bytes <= t.memory_bytes
    assert t.usable_bytes == t.memory_bytes or t.unified
    assert 70 <= t.sm <= 130 and t.bandwidth_gbs > 0
    assert t.unconfirmed <= {"sm", "memory_bytes", "usable_bytes", "bandwidth_gbs"}
    assert t.family == "jetson" or t.aliases, "dGPUs need an NVML name alias for detection"


def test_cards_missing_from_reference_are_flagged_unconfirmed():
    for name in ("rtx-3060-12gb", "rtx-4060-8gb", "rtx-a6000", "rtx-4000-ada", "rtx-6000-ada",
                 "rtx-pro-6000-blackwell"):
        assert {"memory_bytes", "bandwidth_gbs"} <= TARGETS[name].unconfirmed, name
    assert "memory_bytes" in TARGETS["rtx-5090"].unconfirmed  # "[UNCONF]" on the reference page
    assert "sm" in TARGETS["t4"].unconfirmed  # "7.5 [GK]"


@pytest.mark.parametrize("sm,precision,ok", [
    (87, "fp8", False), (88, "fp8", False), (89, "fp8", True), (90, "fp8", True), (100, "fp8", True),
    (120, "fp8", True), (130, "fp8", True),  # a future SM still has FP8: ordered rules, no closed sets
    (86, "kv_fp8", False), (89, "kv_fp8", True),
    (90, "nvfp4", False), (100, "nvfp4", True), (120, "nvfp4", True),
    (87, "int4_awq", True), (90, "int4_awq", True), (100, "int4_awq", False), (110, "int4_awq", False),
    (119, "int8_wo", False), (110, "int4_wo", False), (120, "int4_awq", True),
    (75, "bfloat16", False), (75, "float16", True), (80, "bfloat16", True), (72, "float16", False),
])
def test_precision_rules(sm, precision, ok):
    assert supports(sm, precision)[0] is ok, supports(sm, precision)


def test_unconfirmed_levels_and_reasons():
    assert support_level(120, "int4_awq")[0] == "unconfirmed"
    assert support_level(75, "int8_wo")[0] == "unconfirmed"
    level, reason = support_level(TARGETS["b200"], "int4_awq")
    assert level == "no" and "SM 10.0" in reason and "INT8/INT4" in reason
    ok, reason = supports(TARGETS["jetson-orin-nano-8gb"], "fp8")
    assert not ok and "FP8 needs SM >= 8.9" in reason


def test_rules_end_with_catch_all_and_every_precision_resolves():
    assert RULES[-1].level == "yes" and RULES[-1].precisions == frozenset(PRECISIONS)
    for t in TARGETS.values():
        for p in PRECISIONS:
            assert support_level(t, p)[0] in ("yes", "no", "unconfirmed")


def test_unknown_names_raise_with_fix():
    with pytest.raises(InputError, match="unknown target 'jetson-orin-nano'") as e:
        get_target("jetson-orin-nano")
    assert "trt-gemma targets" in e.value.fix
    with pytest.raises(InputError, match="unknown precision"):
        supports(90, "int3")


def test_to_dict_is_json():
    d = json.loads(json.dumps(TARGETS["h100"].to_dict()))
    assert d["sm"] == "9.0" and d["precisions"]["fp8"] is True and d["precisions"]["nvfp4"] is False


def test_trt_caveats_follow_jetson_md():
    # docs/facts/jetson.md §6: no TRT-LLM Gemma 2 path on Thor; on Orin only unconfirmed 1.x source builds; dGPUs
    # supported
    assert "no Jetson Thor support" in TARGETS["jetson-thor"].trt_caveat
    for t in TARGETS.values():
        if t.family == "jetson" and t.sm == 87:
            assert "v0.12.0-jetson" in t.trt_caveat and "unconfirmed" in t.trt_caveat, t.name
        elif t.family != "jetson":
            assert t.trt_caveat == "", t.name
    assert json.loads(json.dumps(TARGETS["jetson-thor"].to_dict()))["trt_caveat"] == TARGETS["jetson-thor"].trt_caveat
