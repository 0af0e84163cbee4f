"""`trt-gemma check`: the comparison runs here with two CPU sides over one checkpoint — onnxruntime on the exported
graph and the numpy reference — and the engine side refuses this GPU-less host with exit 2 and what it needs.

Sides are real models (ReferenceModel, OrtModel); the float16 graph of the same checkpoint is the "engine" whose
logits differ by more than the float32 tolerance, so a failing report is produced by real numerics, not by hand.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from trt_gemma import check as C
from trt_gemma.errors import InputError

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
PROMPTS = [[2, 17, 93, 41, 5], [2, 250, 11], [2, 64, 64, 64, 64, 64, 64, 7]]


@pytest.fixture(scope="module")
def sides(tiny_model_dir, tmp_path_factory):
    from trt_gemma.onnx.export import export_onnx
    from trt_gemma.reference import ReferenceModel
    from trt_gemma.runtime.backends import ensure_converted
    from trt_gemma.runtime.onnxruntime import OrtModel

    cache = tmp_path_factory.mktemp("check")
    ckpt = ensure_converted(tiny_model_dir, cache)
    out = {"reference": C.Side("reference", ReferenceModel.load(ckpt))}
    for act in ("float32", "float16"):
        export_onnx(ckpt, cache / act, max_seq_len=64, opset=21, activations=act, show_progress=False)
        out[act] = C.Side(f"onnxruntime-{act}", OrtModel(cache / act, accuracy_level=0))
    return out


def test_onnxruntime_and_the_reference_agree(sides):
    plan = {"decode_tok_s": {"context_0": 1000.0}, "total_bytes": 1 << 30}
    r = C.run_check(sides["float32"], sides["reference"], PROMPTS, precision="float32", max_batch=4, plan=plan,
                    device_used=None, max_tokens=12)
    assert r["ok"] and r["mismatches"] == [], r["mismatches"]
    for p in r["prompts"]:
        assert p["ids_equal"] and p["first_divergence"] is None and p["steps"] == 12
        assert p["logits_max_abs_diff"] < 1e-3, p  # fp32 graph vs fp32 numpy: accumulation order only
    assert set(r["speed"]) == {"batch_1", "batch_4"} and r["speed"]["batch_1"]["roofline_tok_s"] == 1000.0
    assert r["speed"]["batch_4"]["decode_tok_s"] > 0 and r["memory"]["ratio"] is None  # no device here


def test_a_float16_graph_fails_the_float32_tolerance(sides):
    r = C.run_check(sides["float16"], sides["reference"], PROMPTS, precision="float32", max_batch=1, plan={},
                    device_used=None, max_tokens=8)
    worst = max(p["logits_max_abs_diff"] for p in r["prompts"])
    assert not r["ok"] and worst > C.TOLERANCE["float32"], worst
    assert len(r["mismatches"]) == sum(not (p["ids_equal"] and p["within_tolerance"]) for p in r["prompts"]) > 0
    assert worst < C.TOLERANCE["float16"], worst  # and passes its own precision's tolerance
    assert all("logits max |Δ|" in m for m in r["mismatches"])


def test_first_divergence_carries_both_top5(sides):
    """Greedy traces of two real models (float32 graph vs float16 graph) compared after the oracle's first token
    is replaced, so the divergence is at step 0 and both top-5 lists are the models' own."""
    a = C.greedy(sides["float32"], PROMPTS[0], 4)
    b = C.greedy(sides["reference"], PROMPTS[0], 4)
    b.ids[0] = b.top[0][1][0]  # the oracle's runner-up: what a near-tie flip looks like
    d = C.compare(a, b, C.TOLERANCE["float32"])
    assert not d["ids_equal"] and d["first_divergence"]["step"] == 0
    assert d["first_divergence"]["ids"] == [a.ids[0], b.top[0][1][0]]
    assert d["first_divergence"]["top5"] == [a.top[0], b.top[0]] and len(a.top[0]) == 5
    np.testing.assert_allclose([v for _, v in a.top[0]], [v for _, v in b.top[0]], atol=1e-3)


def test_unknown_precision_and_the_plan_roofline():
    with pytest.raises(InputError, match="float8"):
        C.run_check(None, None, [], precision="float8", max_batch=1, plan={}, device_used=None)
    from trt_gemma.plan import plan
    from trt_gemma.targets import TARGETS

    p = plan("gemma-2-2b", TARGETS["jetson-orin-nano-8gb"]).to_dict()
    head = p["tensorrt"]["lm_head"]
    assert C.roofline_tok_s(p) == p["tensorrt"]["lm_head_roofline"][head]["tok_s_context_0"] > 0


def test_report_is_written_whole(tmp_path):
    path = C.write_report(tmp_path, {"ok": True})
    assert json.loads(path.read_text()) == {"ok": True} and [f.name for f in tmp_path.iterdir()] == ["check.json"]


@pytest.mark.no_gpu
def test_cli_check_without_a_gpu_says_what_it_needs_and_exits_2(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed")
    import onnx
    from test_engine_build import decoder_step_graph

    from trt_gemma.engine.build import build_engine
    from trt_gemma.engine.profiles import Limits
    from trt_gemma.targets import TARGETS

    onnx.save(decoder_step_graph(), str(tmp_path / "graph.onnx"))
    build_engine(tmp_path / "graph.onnx", tmp_path / "tensorrt", TARGETS["rtx-4090"], Limits(1, 8, 16))
    p = subprocess.run([sys.executable, "-m", "trt_gemma", "check", str(tmp_path)], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert "this host cannot: no NVIDIA GPU" in p.stderr and "rtx-4090, SM 8.9" in p.stderr, p.stderr
    assert not (tmp_path / "check.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, "-m", "trt_gemma", "check", str(empty)], capture_output=True, text=True)
    assert p.returncode == 2 and "has no TensorRT engine" in p.stderr, p.stderr


@pytest.fixture(scope="module")
def fp16_bundle(tmp_path_factory):
    """A real bundle of the embedded model for an RTX target with float16 activations (`trt-gemma build ... --engine
    tensorrt`): its ONNX graph is what an engine would be built from."""
    from trt_gemma.cli import main

    out = tmp_path_factory.mktemp("bundle") / "b"
    with pytest.raises(SystemExit) as e:
        main(["build", "--target", "rtx-3090", "--set", "quant=float16", "--set", "dtype=float16", "--skip-quality",
              "--engine", "tensorrt", "--out", str(out), "--json"])
    assert e.value.code == 0
    return out


def test_check_bundle_end_to_end_with_the_reference_as_the_tested_side(fp16_bundle, capsys):
    """Everything `trt-gemma check` does after finding the engine, with the numpy reference on the bundle's checkpoint
    standing where the engine's step model goes: the bundle's tokenizer, recipe, plan and graph, check.json."""
    from trt_gemma.reference import ReferenceModel

    test = C.Side("reference", ReferenceModel.load(fp16_bundle / "checkpoint"))
    r = C.check_bundle(fp16_bundle, test, max_tokens=8)
    assert r["precision"] == "float16" and r["sides"]["oracle"] == "onnxruntime-cpu"
    assert len(r["prompts"]) == len(C.PROMPTS) and all(p["prompt_tokens"] > 1 for p in r["prompts"])
    worst = max(p["logits_max_abs_diff"] for p in r["prompts"])
    assert 0 < worst < C.TOLERANCE["float16"], worst  # an fp16 graph against fp32 numpy: close, not equal
    plan = json.loads((fp16_bundle / "plan.json").read_text())
    assert r["speed"]["batch_1"]["roofline_tok_s"] == C.roofline_tok_s(plan) and "batch_1" in r["speed"]
    assert json.loads((fp16_bundle / "check.json").read_text()) == r


def test_the_bundle_manifest_keeps_the_builders_io_record(fp16_bundle):
    """`build --engine tensorrt` records what the builder saw once, at manifest["tensorrt"]["io"], and beside the
    engine in BUNDLE/tensorrt/manifest.json, which the runtime checks the engine against."""
    from trt_gemma.manifest import read_manifest

    m = read_manifest(fp16_bundle)["tensorrt"]
    beside = json.loads((fp16_bundle / "tensorrt" / "manifest.json").read_text())
    assert "io" not in m["engine"] and m["io"] == beside["io"]
    names = [t["name"] for t in m["io"]["tensors"]]
    assert names[0] == "input_ids" and "new_kv" in names and "past_key_values.0.key" in names  # the pool contract
    assert list(m["io"]["profiles"]) == ["prefill", "decode"]
    assert all(t["dtype"] in ("int64", "float16", "float32") for t in m["io"]["tensors"]), m["io"]["tensors"]
