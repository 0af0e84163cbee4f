"""TensorRT route: the real TensorRT-RTX builder compiles our kind of graph on this GPU-less host, profiles come from
the graph, the recipe check refuses what the builder refuses (with the builder's own words), guards are typed.

The graph is built here with onnx.helper in the shape of a Gemma 2 decode step: embedding Gather x sqrt(hidden), the
AWQ pre-scale Mul, INT4 DequantizeLinear(block_size=128, axis=0) -> MatMul, past/present KV per layer, attention with
the tanh soft-cap and an additive mask over past + new tokens, an fp16 lm_head and the final tanh soft-cap.
onnxruntime (an independent runtime) runs it at every profile corner, so the profiles are shapes the graph accepts.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trt_gemma.engine import build as E
from trt_gemma.engine.profiles import GraphInput, Limits, graph_inputs, profiles
from trt_gemma.errors import ConfigError, DependencyError, InputError, RecipeError
from trt_gemma.recipes import load_recipe
from trt_gemma.targets import TARGETS, Target
from trt_gemma.targets import get_target

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
from onnx import TensorProto as TP, helper as h, numpy_helper as nh  # noqa: E402

HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
H, V, KVH, D, LAYERS = 256, 384, 2, 128, 2  # hidden, vocab, kv heads (= q heads here), head_dim
LIMITS = Limits(max_batch_size=2, max_input_len=16, max_seq_len=48)


def _int4(name: str, k: int, n: int, rng) -> list:
    """INT4 weight [K, N] blocked along K (the input dimension) by 128, with fp16 scales [K/128, N]."""
    q = rng.integers(-8, 8, size=(k, n)).astype(np.int8)
    return [h.make_tensor(name + "_q", TP.INT4, q.shape, q.flatten().tolist()),
            nh.from_array((rng.random((k // 128, n)) * 0.02 + 0.001).astype(np.float16), name + "_s")]


def _linear(x: str, name: str, out: str) -> list:
    return [h.make_node("Mul", [x, name + "_pre"], [name + "_xs"]),  # AWQ pre-quant scale
            h.make_node("DequantizeLinear", [name + "_q", name + "_s"], [name + "_w"], axis=0, block_size=128),
            h.make_node("MatMul", [name + "_xs", name + "_w"], [out])]


def _layer(i: int, inits: list, rng) -> list:
    """One attention block: k/v appended to the past cache, q.k^T / sqrt(d) soft-capped at 50, masked softmax."""
    c = lambda n, v: inits.append(nh.from_array(np.asarray(v, np.float16), f"l{i}_{n}"))  # noqa: E731
    for p in ("q", "k", "v"):
        inits.extend(_int4(f"l{i}_{p}", H, KVH * D, rng))
        c(f"{p}_pre", rng.random(H) + 0.5)
    c("inv_cap", 1 / 50.0), c("cap", 50.0), c("scale", 1 / np.sqrt(D))
    inits.append(nh.from_array(np.array([0, 0, KVH, D], np.int64), f"l{i}_shape"))
    inits.append(nh.from_array(np.array([0, 0, KVH * D], np.int64), f"l{i}_flat"))
    nodes = []
    for p in ("q", "k", "v"):
        nodes += _linear("x", f"l{i}_{p}", f"l{i}_{p}2d")
        nodes += [h.make_node("Reshape", [f"l{i}_{p}2d", f"l{i}_shape"], [f"l{i}_{p}4"]),
                  h.make_node("Transpose", [f"l{i}_{p}4"], [f"l{i}_{p}t"], perm=[0, 2, 1, 3])]
    for p, kv in (("k", "key"), ("v", "value")):
        nodes.append(h.make_node("Concat", [f"past_key_values.{i}.{kv}", f"l{i}_{p}t"], [f"present.{i}.{kv}"], axis=2))
    nodes += [h.make_node("Transpose", [f"present.{i}.key"], [f"l{i}_kT"], perm=[0, 1, 3, 2]),
              h.make_node("MatMul", [f"l{i}_qt", f"l{i}_kT"], [f"l{i}_s0"]),
              h.make_node("Mul", [f"l{i}_s0", f"l{i}_scale"], [f"l{i}_s1"]),
              h.make_node("Mul", [f"l{i}_s1", f"l{i}_inv_cap"], [f"l{i}_s2"]),
              h.make_node("Tanh", [f"l{i}_s2"], [f"l{i}_s3"]),
              h.make_node("Mul", [f"l{i}_s3", f"l{i}_cap"], [f"l{i}_s4"]),
              h.make_node("Add", [f"l{i}_s4", "mask_bias"], [f"l{i}_s5"]),
              h.make_node("Softmax", [f"l{i}_s5"], [f"l{i}_p"], axis=-1),
              h.make_node("MatMul", [f"l{i}_p", f"present.{i}.value"], [f"l{i}_o"]),
              h.make_node("Transpose", [f"l{i}_o"], [f"l{i}_ot"], perm=[0, 2, 1, 3]),
              h.make_node("Reshape", [f"l{i}_ot", f"l{i}_flat"], [f"l{i}_o2"]),
              h.make_node("Add", ["x", f"l{i}_o2"], [f"x{i}"])]  # residual (KVH * D == H here)
    return nodes


def decoder_step_graph(unnamed_value_past: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    emb = (rng.standard_normal((V, H)) * 0.1).astype(np.float16)
    inits = [nh.from_array(emb, "embed"), nh.from_array(np.float16(np.sqrt(H)), "normalizer"),
             nh.from_array(np.ascontiguousarray(emb.T), "lm_head"), nh.from_array(np.float16(1 / 30.0), "inv_final"),
             nh.from_array(np.float16(30.0), "final_cap"), nh.from_array(np.float16(-1e4), "neg"),
             nh.from_array(np.array([1, 2], np.int64), "mask_axes")]
    nodes = [h.make_node("Gather", ["embed", "input_ids"], ["x_e"]),
             h.make_node("Mul", ["x_e", "normalizer"], ["x"]),
             h.make_node("Cast", ["attention_mask"], ["mask_f"], to=TP.FLOAT16),
             h.make_node("Sub", ["mask_f", "one"], ["mask_m1"]),
             h.make_node("Mul", ["mask_m1", "neg_abs"], ["mask_b"]),
             h.make_node("Unsqueeze", ["mask_b", "mask_axes"], ["mask_bias"])]
    inits += [nh.from_array(np.float16(1.0), "one"), nh.from_array(np.float16(1e4), "neg_abs")]
    layer_nodes = []
    for i in range(LAYERS):
        nodes_i = _layer(i, inits, rng)
        if i:  # the next layer reads the previous layer's output
            nodes_i = [_rename(n, "x", f"x{i - 1}") for n in nodes_i]
        layer_nodes += nodes_i
    nodes += layer_nodes
    nodes += [h.make_node("MatMul", [f"x{LAYERS - 1}", "lm_head"], ["l0"]),
              h.make_node("Mul", ["l0", "inv_final"], ["l1"]), h.make_node("Tanh", ["l1"], ["l2"]),
              h.make_node("Mul", ["l2", "final_cap"], ["logits"])]
    inputs = [h.make_tensor_value_info("input_ids", TP.INT64, ["batch_size", "sequence_length"]),
              h.make_tensor_value_info("attention_mask", TP.INT64, ["batch_size", "total_sequence_length"])]
    outputs = [h.make_tensor_value_info("logits", TP.FLOAT16, ["batch_size", "sequence_length", V])]
    for i in range(LAYERS):
        for kv in ("key", "value"):
            past = None if (unnamed_value_past and kv == "value") else "past_sequence_length"
            inputs.append(h.make_tensor_value_info(f"past_key_values.{i}.{kv}", TP.FLOAT16,
                                                   ["batch_size", KVH, past, D]))
            outputs.append(h.make_tensor_value_info(f"present.{i}.{kv}", TP.FLOAT16,
                                                    ["batch_size", KVH, "total_sequence_length", D]))
    model = h.make_model(h.make_graph(nodes, "gemma2_like_step", inputs, outputs, inits),
                         opset_imports=[h.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def _rename(node, old: str, new: str):
    node.input[:] = [new if x == old else x for x in node.input]
    return node


@pytest.fixture(scope="module")
def graph_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("graph") / "model.onnx"
    onnx.save(decoder_step_graph(unnamed_value_past=True), str(path))
    return path


# --- profiles from the graph -------------------------------------------------------------------------------------

def test_inputs_are_classified_by_name_then_axis(graph_path):
    by_name = {gi.name: gi for gi in graph_inputs(graph_path)}
    assert by_name["input_ids"].dims == ("batch", "new")
    assert by_name["attention_mask"].dims == ("batch", "total")
    assert by_name["past_key_values.0.key"].dims == ("batch", KVH, "past", D)
    assert by_name["past_key_values.1.value"].dims == ("batch", KVH, "past", D)  # unnamed: input name + axis
    assert set(by_name) == {"input_ids", "attention_mask"} | {f"past_key_values.{i}.{kv}" for i in range(LAYERS)
                                                              for kv in ("key", "value")}


def test_unclassifiable_dynamic_dim_names_input_and_axis(tmp_path):
    g = h.make_graph([h.make_node("Identity", ["weird"], ["y"])], "g",
                     [h.make_tensor_value_info("weird", TP.FLOAT16, [4, "zzz"])],
                     [h.make_tensor_value_info("y", TP.FLOAT16, [4, "zzz"])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 21)]), str(tmp_path / "g.onnx"))
    with pytest.raises(InputError, match=r"input 'weird' axis 1 \(zzz\)"):
        graph_inputs(tmp_path / "g.onnx")


def test_prefill_batch_follows_the_token_budget():
    assert Limits(8, 1024, 4096, 2048).prefill_batch == 2  # two full prompts per step
    assert Limits(8, 1024, 4096, 512).prefill_batch == 1  # never below one prompt
    assert Limits(2, 16, 48).prefill_batch == 2  # no budget: the decode batch
    assert profiles([GraphInput("input_ids", "INT64", ("batch", "new"))], Limits(8, 1024, 4096, 2048))[
        "prefill"]["input_ids"][2] == (2, 1024)


def test_profiles_run_in_onnxruntime_at_every_corner(graph_path):
    """Every min/opt/max shape of both profiles is a shape the graph accepts (onnxruntime runs it), and the
    profiles cover a fresh prompt of max_input_len and a decode step at max_seq_len."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    profs = profiles(graph_inputs(graph_path), LIMITS)
    assert profs["prefill"]["input_ids"] == ((1, 1), (1, 8), (2, 16))
    assert profs["prefill"]["past_key_values.0.key"][2] == (2, KVH, LIMITS.max_seq_len - 16, D)
    assert profs["decode"]["input_ids"] == ((1, 1), (1, 1), (2, 1))
    assert profs["decode"]["attention_mask"][2] == (2, LIMITS.max_seq_len)
    sess = ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for name, shapes in profs.items():
        for corner in range(3):
            feeds = {n: (rng.integers(0, V, s[corner]) if n == "input_ids" else np.ones(s[corner], np.int64)
                         if n == "attention_mask" else rng.standard_normal(s[corner]).astype(np.float16))
                     for n, s in shapes.items()}
            logits = sess.run(["logits"], feeds)[0]
            assert logits.shape == (*feeds["input_ids"].shape, V), (name, corner)
            assert np.isfinite(logits.astype(np.float32)).all() and np.abs(logits).max() <= 30.0, (name, corner)


# --- routes and precision rules ----------------------------------------------------------------------------------

def test_routes_follow_target_fields_not_names():
    assert E.route(get_target("jetson-orin-nano-8gb"))[0].name == "tensorrt"
    assert E.route(get_target("h100"))[0].name == "tensorrt"
    assert {E.route(t)[0].name for t in TARGETS.values() if t.family == "rtx"} == {"tensorrt_rtx"}
    made_up = Target("my-card", "Some future RTX", 89, 2**33, 2**33, 500.0, "rtx")
    assert E.route(made_up)[0].name == "tensorrt_rtx"  # a card no table names still gets its route


@pytest.mark.parametrize("target,overrides,needle", [
    ("rtx-3090", {"quant": "fp8", "gemm_plugin": "disable"}, "SM >= 8.9"),
    ("jetson-orin-nano-8gb", {"quant": "fp8", "gemm_plugin": "disable"}, "SM >= 8.9"),
    # TensorRT-LLM's rules leave INT4 on SM 7.5 unconfirmed; the TensorRT builder refuses it outright
    ("t4", {"quant": "int4_awq"}, "model contains HW-specific datatypes: int4"),
])
def test_recipe_refuses_what_the_builder_refuses(target, overrides, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(get_target(target), overrides={"engine": "tensorrt", **overrides})
    assert needle in e.value.message and e.value.fix


def test_orin_recipes_take_the_tensorrt_route_in_int4_awq_fp16():
    for name, t in TARGETS.items():
        if t.family == "jetson" and t.sm == 87:
            r = load_recipe(get_target(name))
            assert (r.engine, r.quant, r.dtype, r.group_size) == ("tensorrt", "int4_awq", "float16", 128), name


def test_version_rule_refuses_int4_on_old_tensorrt_only():
    assert E.refusal("tensorrt", "int4_awq", 87, "8.6.2") is not None
    assert E.refusal("tensorrt", "int4_awq", 87, "10.3.0.30") is None
    assert E.refusal("tensorrt", "int4_awq", 87, None) is None  # unknown version: decided on the device


def _one_matmul(kind: str) -> onnx.ModelProto:
    """y = x @ W for one weight precision: the smallest graph that shows a builder's precision refusal."""
    act = TP.BFLOAT16 if kind == "bfloat16" else TP.FLOAT16
    x = "x"
    if kind == "int4_awq":
        inits, nodes = _int4("w", 256, 256, np.random.default_rng(0)), [
            h.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], axis=0, block_size=128)]
    elif kind == "fp8":
        inits = [h.make_tensor("w_q", TP.FLOAT8E4M3FN, (256, 256), np.ones(256 * 256, np.float32).tolist()),
                 nh.from_array(np.float16(0.01), "w_s"), nh.from_array(np.float16(0.02), "a_s"),
                 h.make_tensor("zp", TP.FLOAT8E4M3FN, (), [0.0])]
        nodes = [h.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"]),
                 h.make_node("QuantizeLinear", ["x", "a_s", "zp"], ["xq"]),
                 h.make_node("DequantizeLinear", ["xq", "a_s"], ["xd"])]
        x = "xd"
    else:
        inits, nodes = [h.make_tensor("w", act, (256, 256), np.full(256 * 256, 0.01, np.float32).tolist())], []
    nodes.append(h.make_node("MatMul", [x, "w"], ["y"]))
    g = h.make_graph(nodes, "mm", [h.make_tensor_value_info("x", act, ["batch_size", 256])],
                     [h.make_tensor_value_info("y", act, ["batch_size", 256])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    return m


@needs_rtx
@pytest.mark.parametrize("precision,target", [("fp8", "rtx-3090"), ("int4_awq", "t4"), ("bfloat16", "t4")])
def test_rule_reasons_are_the_builders_own_words(tmp_path, precision, target, monkeypatch):
    """The table's reason quotes what tensorrt_rtx says when it is asked anyway (routed as an RTX card)."""
    t = TARGETS[target]
    as_rtx = Target(t.name, t.title, t.sm, t.memory_bytes, t.usable_bytes, t.bandwidth_gbs, "rtx")
    reason = E.refusal("tensorrt_rtx", precision, t.sm)
    assert reason is not None
    quoted = reason.split('the builder says: "', 1)[1].rstrip('"').replace("sm86", f"sm{t.sm}").replace(
        "sm75", f"sm{t.sm}")
    onnx.save(_one_matmul(precision), str(tmp_path / "mm.onnx"))
    with pytest.raises(InputError) as e:
        E.build_engine(tmp_path / "mm.onnx", tmp_path / "eng", get_target(as_rtx), Limits(2, 1, 1))
    assert quoted.split(", because")[1] in e.value.message, e.value.message
    assert not (tmp_path / "eng").exists()  # nothing half-written


# --- real builds with TensorRT-RTX on this CPU host --------------------------------------------------------------

@needs_rtx
@pytest.mark.parametrize("target", ["rtx-3090", "rtx-4090"])  # SM 8.6 and SM 8.9
def test_tensorrt_rtx_builds_the_decoder_graph(graph_path, tmp_path, target):
    out = tmp_path / "engine"
    r = E.build_engine(graph_path, out, get_target(target), LIMITS, precisions=("int4_awq", "float16"),
                       timing_cache=tmp_path / "timing.cache")
    blob = (out / E.ENGINE_FILE).read_bytes()
    assert len(blob) == r.engine_bytes > 100_000  # INT4 weights alone are 6 x 256 x 128 x 0.5 B
    meta = json.loads((out / "manifest.json").read_text())
    assert meta["builder"] == "tensorrt_rtx" and meta["builder_version"] == importlib.metadata.version("tensorrt_rtx")
    assert meta["sm"] == TARGETS[target].sm_str and list(meta["profiles"]) == ["prefill", "decode"]
    assert meta["timing_cache"] is None  # a no-op in TensorRT-RTX: not pretended
    assert r.check_commands[1].startswith("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run ")


@needs_rtx
def test_fp8_graph_builds_for_sm89(tmp_path):
    onnx.save(_one_matmul("fp8"), str(tmp_path / "fp8.onnx"))
    r = E.build_engine(tmp_path / "fp8.onnx", tmp_path / "eng", get_target("rtx-4090"), Limits(2, 1, 1),
                       precisions=("fp8",))
    assert r.engine_bytes > 0 and r.sm == "8.9"


def test_printed_onnxruntime_half_of_the_check_runs(graph_path, tmp_path):
    """The first printed polygraphy command (onnxruntime side) runs here as printed."""
    if importlib.util.find_spec("polygraphy") is None or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("polygraphy / onnxruntime not installed")
    from trt_gemma.engine.profiles import polygraphy_commands

    cmds = polygraphy_commands(graph_path, tmp_path / "model.engine", graph_inputs(graph_path), LIMITS,
                               "tensorrt", tmp_path)
    argv = shlex.split(cmds[0])
    script = Path(sys.executable).parent / "polygraphy"  # the console script installed beside this Python
    proc = subprocess.run([str(script) if script.is_file() else "polygraphy", *argv[1:]], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    outputs = json.loads((tmp_path / "polygraphy_onnxrt_outputs.json").read_text())
    assert outputs and (tmp_path / "polygraphy_inputs.json").is_file()
    assert argv[argv.index("--val-range") + 1] == "attention_mask:[1,1]"
    arrays = _load_polygraphy_outputs(tmp_path / "polygraphy_onnxrt_outputs.json")
    assert len(arrays) == 1 + 2 * LAYERS and all(np.isfinite(a).all() for a in arrays)  # logits + present KV


@needs_rtx
def test_non_standard_operator_is_a_parse_error(tmp_path):
    """onnxruntime-only operators (what onnxruntime-genai's graphs use) are refused by the parser, naming the op."""
    g = h.make_graph([h.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=256, N=256,
                                  bits=4, block_size=128)], "g",
                     [h.make_tensor_value_info("x", TP.FLOAT16, ["batch_size", 256])],
                     [h.make_tensor_value_info("y", TP.FLOAT16, ["batch_size", 256])],
                     [nh.from_array(np.zeros((256, 2, 64), np.uint8), "w"),
                      nh.from_array(np.ones((256, 2), np.float16), "s")])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]),
              str(tmp_path / "nbits.onnx"))
    with pytest.raises(InputError, match="cannot parse .*MatMulNBits"):
        E.build_engine(tmp_path / "nbits.onnx", tmp_path / "eng", get_target("rtx-4090"), Limits(1, 1, 1))
    assert not (tmp_path / "eng").exists()


@needs_rtx
def test_cli_build_engine_tensorrt_on_an_rtx_target(tmp_path, capsys):
    """`trt-gemma build --engine tensorrt` for an RTX target: the bundle, then the TensorRT route in the same run —
    an SM 8.6 engine where the exporter is installed, else the reason and the command for later."""
    from trt_gemma.cli import main
    from trt_gemma.manifest import read_manifest

    out = tmp_path / "b"
    with pytest.raises(SystemExit) as e:
        main(["build", "--target", "rtx-3090", "--set", "quant=float16", "--set", "lm_head_quant=int8",
              "--skip-quality", "--engine", "tensorrt", "--out", str(out), "--json"])
    assert e.value.code == 0
    d = json.loads(capsys.readouterr().out)
    assert d["recipe"]["engine"] == "tensorrt" and d["not_compiled_reason"].endswith("(--engine tensorrt)")
    trt = d["tensorrt"]
    assert trt["builder"] == "tensorrt_rtx" and read_manifest(out)["tensorrt"]["builder"] == "tensorrt_rtx"
    if importlib.util.find_spec("trt_gemma.onnx.export") is None:
        assert trt["engine"] is None and "ONNX exporter" in trt["reason"]
        assert trt["on_target"] == [f"trt-gemma build --from-bundle {out} --engine tensorrt"]
    else:
        assert trt["engine"]["sm"] == "8.6" and (out / "tensorrt" / "model.engine").is_file()
        exported = json.loads((out / "onnx" / "trt_gemma_onnx.json").read_text())["model"]
        want = {"lm_head": "int8", "activation_dtype": d["recipe"]["dtype"], "logits": "last"}
        assert {k: exported[k] for k in want} == want, exported  # the recipe's options reach the graph


def test_cli_from_bundle_tensorrt_refuses_a_non_bundle(tmp_path, capsys):
    from trt_gemma.cli import main

    (tmp_path / "manifest.json").write_text(json.dumps({"format": "trt_gemma.bundle/1", "kind": "engine", "model": {},
                                                        "target": {"name": "rtx-4090"}, "recipe": {}, "engine": {}}))
    with pytest.raises(SystemExit) as e:
        main(["build", "--from-bundle", str(tmp_path), "--engine", "tensorrt"])
    assert e.value.code != 0 and "not a bundle" in capsys.readouterr().err


@needs_rtx
def test_from_bundle_builds_the_bundles_graph_and_records_it(tmp_path, capsys):
    """`trt-gemma build --from-bundle B --engine tensorrt` on a bundle that already holds its ONNX graph: the engine
    lands in B/tensorrt/, the bundle manifest records builder, version and SM; a second run needs --force."""
    from trt_gemma import build as B
    from trt_gemma.cli import main
    from trt_gemma.errors import OutputError
    from trt_gemma.manifest import read_manifest

    bundle = tmp_path / "bundle"
    B.build_bundle(None, "rtx-3090", overrides=["quant=float16", "engine=tensorrt"], out=bundle,
                   skip_quality=True, show_progress=False, compile_engine=False)
    (bundle / "onnx").mkdir()
    onnx.save(decoder_step_graph(), str(bundle / "onnx" / "model.onnx"))
    with pytest.raises(SystemExit) as e:
        main(["build", "--from-bundle", str(bundle), "--engine", "tensorrt"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    m = read_manifest(bundle)["tensorrt"]
    assert m["builder"] == "tensorrt_rtx" and m["engine"]["sm"] == "8.6" and m["reason"] is None
    assert m["engine"]["builder_version"] == importlib.metadata.version("tensorrt_rtx")
    assert (bundle / "tensorrt" / "model.engine").stat().st_size == m["engine"]["engine_bytes"]
    assert "POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run" in out
    with pytest.raises(OutputError, match="already exists"):
        B.tensorrt_route(bundle, require=True)
    assert B.tensorrt_route(bundle, require=True, force=True)["engine"]["sm"] == "8.6"


def test_bundle_export_follows_the_recipe_options(tmp_path):
    """The route's export is reused while the recipe's dtype / lm_head_quant match it and redone when they change
    (a stale graph would build an engine the recipe does not describe)."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from trt_gemma import build as B

    bundle = tmp_path / "bundle"
    B.build_bundle(None, "rtx-3090", overrides=["quant=float16", "engine=tensorrt"], out=bundle,
                   skip_quality=True, show_progress=False, compile_engine=False)

    def options():
        return json.loads((bundle / "onnx" / "trt_gemma_onnx.json").read_text())["model"]

    first = E.export_onnx_for_bundle(bundle, 128, activations="float16")
    stamp = first.stat().st_mtime_ns
    assert E.export_onnx_for_bundle(bundle, 128, activations="float16").stat().st_mtime_ns == stamp  # reused
    E.export_onnx_for_bundle(bundle, 128, activations="float16", lm_head="int8")
    assert options()["lm_head"] == "int8" and options()["activation_dtype"] == "float16"
    E.export_onnx_for_bundle(bundle, 128, activations="bfloat16", lm_head="int8")
    assert options()["activation_dtype"] == "bfloat16" and options()["logits"] == "last"
    assert options()["kv_cache"] == "pool"  # what an engine is built from: no input bound as an output


def _load_polygraphy_outputs(path):
    """The arrays polygraphy saved (its own JSON loader, so the format is polygraphy's business)."""
    from polygraphy.json import load_json

    results = load_json(str(path))  # RunResults: [(runner name, [IterationResult {name: array}])]
    return [np.asarray(arr, np.float32) for _, iters in results.items() for it in iters for arr in it.values()]


# --- guards ------------------------------------------------------------------------------------------------------

def test_tensorrt_absent_is_a_typed_error_and_leaves_nothing(graph_path, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed on this host")
    with pytest.raises(DependencyError, match="tensorrt is not installed") as e:
        E.build_engine(graph_path, tmp_path / "eng", get_target("jetson-orin-nano-8gb"), LIMITS)
    assert "python3-libnvinfer" in e.value.fix and not (tmp_path / "eng").exists()


def test_run_engine_without_gpu_is_a_typed_error(tmp_path):
    from trt_gemma.detect import detect

    if detect().kind != "none":
        pytest.skip("this host has a GPU")
    with pytest.raises(DependencyError, match="cannot run"):
        E.run_engine(tmp_path / "model.engine", {})


def test_doctor_reports_builders_and_execution_providers():
    from trt_gemma.commands.doctor import report

    r = report()
    assert set(r["builders"]) == {"tensorrt", "tensorrt_rtx"}
    assert r["builders"]["tensorrt_rtx"]["installed"] is HAS_RTX
    if HAS_RTX:
        assert r["builders"]["tensorrt_rtx"]["version"] == importlib.metadata.version("tensorrt_rtx")
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        assert r["onnxruntime_providers"] == onnxruntime.get_available_providers()


# --- plan: the TensorRT route's memory and the lm_head lever ------------------------------------------------------

def test_plan_tensorrt_route_on_gemma2_2b_by_hand():
    """Gemma 2 2B (hidden 2304, 26 layers, 8 q / 4 kv heads of 256, FFN 9216, vocab 256000) on the Orin Nano 8GB
    recipe (INT4-AWQ g128, fp16, batch 1, input 1024, seq 4096), every figure recomputed here from the dimensions."""
    from trt_gemma.plan import plan

    p = plan("gemma-2-2b", get_target("jetson-orin-nano-8gb"))
    t = p.tensorrt
    h, f, vocab, layers = 2304, 9216, 256_000, 26
    shapes = [(2048 + 2 * 1024, h), (h, 2048), (f, h), (f, h), (h, f)]
    awq = layers * sum(o * i // 2 + o * (i // 128) * 2 + i * 2 for o, i in shapes)
    norms = (4 * layers + 1) * h * 2
    head = vocab * h * 2
    assert head == 1_179_648_000  # the "fp16 lm_head is 1.18 GB"
    fp16 = t["lm_head_roofline"]["float"]
    assert fp16["read_bytes_per_token"] == awq + norms + head + h * 2
    assert round(fp16["read_bytes_per_token"] / 1e9, 2) == 2.22  # "... of the 2.22 GB read per token"
    assert fp16["tok_s_context_0"] == round(68e9 / fp16["read_bytes_per_token"], 1)
    int8 = t["lm_head_roofline"]["int8"]
    assert int8["lm_head_bytes"] == vocab * h + vocab * 2
    int4 = t["lm_head_roofline"]["int4"]
    assert int4["lm_head_bytes"] == vocab * h // 2 + vocab * (h // 128) * 2 + h * 2
    assert fp16["tok_s_context_0"] < int8["tok_s_context_0"] < int4["tok_s_context_0"]
    kv_tok = 2 * layers * 4 * 256 * 2
    # the pool layout: one pool (batch 1 x 4096 positions) + the new rows of the largest step (a 1024-token prompt)
    assert t["kv_bytes"] == (1 * 4096 + 1024) * kv_tok
    # one layer's past K and V gathered from the pool and joined with the new rows: two fp16 copies of 4096 positions
    assert t["activations"]["prefill"]["gathered_kv"] == 2 * 1 * 4096 * 2 * 4 * 256 * 2
    assert t["activations"]["prefill"]["logits"] == 1 * vocab * 4  # float32 logits of each prompt's last position
    assert t["activations"]["decode"]["logits"] == vocab * 4
    # the recipe builds this route, so the plan's one verdict is judged on its total
    assert p.route == "tensorrt" and p.total_bytes == t["total_bytes"] < t["usable_bytes"] and p.verdict == "fits"


def test_lm_head_quant_is_a_validated_recipe_field_the_plan_shows():
    """`--set lm_head_quant=int8|int4`: TensorRT route only, checked against the builder's precision rules, and the plan
    counts the quantized head in the weights and marks it in the roofline."""
    from trt_gemma.engine.plan import render_lines
    from trt_gemma.plan import plan
    from trt_gemma.recipes import load_recipe

    assert load_recipe(get_target("jetson-orin-nano-8gb"), overrides=["lm_head_quant=int4"]).lm_head_quant == "int4"
    with pytest.raises(ConfigError, match="lm_head_quant = 'int2'"):
        load_recipe(get_target("jetson-orin-nano-8gb"), overrides=["lm_head_quant=int2"])
    with pytest.raises(RecipeError, match=r"--set lm_head_quant=int8: lm_head_quant = 'int8' with engine = "
                                          r"'tensorrt_llm'"):
        load_recipe(get_target("rtx-4090"), overrides=["lm_head_quant=int8"])
    with pytest.raises(RecipeError, match=r"lm_head_quant = 'int4' for --target t4 \(SM 7\.5\): INT4 weights need"):
        load_recipe(get_target("t4"), overrides=["engine=tensorrt", "lm_head_quant=int4"])
    base = plan("gemma-2-2b", get_target("jetson-orin-nano-8gb")).tensorrt
    q = plan("gemma-2-2b", get_target("jetson-orin-nano-8gb"), overrides=["lm_head_quant=int4"]).tensorrt
    head = base["lm_head_roofline"]
    assert base["lm_head"] == "float" and q["lm_head"] == "int4" and q["lm_head_roofline"] == head
    saved = head["float"]["lm_head_bytes"] - head["int4"]["lm_head_bytes"]
    assert base["weights_bytes"] - q["weights_bytes"] == saved > 0
    assert "INT4 lm_head (0.30 of 1.35 GB read/token) [recipe]" in " ".join(render_lines(q, "float16"))


def test_every_orin_recipe_fits_gemma2_2b_on_the_tensorrt_route():
    from trt_gemma.plan import plan

    for name, t in TARGETS.items():
        if t.family == "jetson" and t.sm == 87:
            p = plan("gemma-2-2b", get_target(name))
            assert p.route == "tensorrt" and p.total_bytes == p.tensorrt["total_bytes"], name
            assert p.verdict in ("fits", "tight"), (name, p.verdict)


def test_plan_cli_shows_the_lm_head_roofline(capsys):
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--model", "gemma-2-2b", "--target", "jetson-orin-nano-8gb"])
    out = capsys.readouterr().out.replace("\n", " ")
    assert e.value.code == 0
    assert "TensorRT route:" in out and "float16 lm_head (1.18 of 2.22 GB" in out and "INT4 lm_head" in out


# --- integration: our exporter's graph through the builder (wired once trt_gemma.onnx.export exists) --------------

@pytest.fixture(scope="module")
def exporter():
    if importlib.util.find_spec("trt_gemma.onnx.export") is None:
        pytest.skip("trt_gemma.onnx.export (the ONNX exporter) is not in this tree yet")
    if not HAS_RTX:
        pytest.skip("tensorrt-rtx is not installed")
    from trt_gemma.onnx.export import export_onnx

    return export_onnx


def _checkpoint(kind: str, out):
    """The embedded model as our converter (bf16) or quantizer (INT4-AWQ / FP8, a short calibration) writes it."""
    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.quant.modelopt import quantize_checkpoint

    if kind == "bfloat16":
        return convert_checkpoint(None, out, dtype="bfloat16", show_progress=False)
    return quantize_checkpoint(None, out, quant=kind, calib_samples=2, calib_seq_len=32, device="cpu",
                               dtype="float16", show_progress=False, log=lambda msg: None)


@pytest.mark.parametrize("kind,activations", [("int4_awq", "float16"), ("bfloat16", "bfloat16")])
def test_half_precision_graph_builds_for_sm86_and_sm89(exporter, tmp_path, kind, activations):
    """The graph the TensorRT route exports (the recipe's dtype as activations: INT4-AWQ weight-only with fp16
    activations is the Orin recipe) through the real builder for SM 8.6 and 8.9; the engine's I/O is fp16/bf16 KV."""
    import onnx

    ckpt = _checkpoint(kind, tmp_path / "ckpt")
    s = exporter(ckpt, tmp_path / "onnx", max_seq_len=256, opset=21, activations=activations)
    onnx_path = E._onnx_path(s, tmp_path / "onnx")
    kv = onnx.load(str(onnx_path), load_external_data=False).graph.input[-1].type.tensor_type.elem_type
    assert onnx.helper.tensor_dtype_to_np_dtype(kv) == (np.float16 if activations == "float16" else
                                                        onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16))
    for target in ("rtx-3090", "rtx-4090"):
        r = E.build_engine(onnx_path, tmp_path / f"eng-{target}", get_target(target), Limits(1, 64, 256),
                           precisions=(kind, activations))
        assert r.engine_bytes > 0 and r.sm == TARGETS[target].sm_str, (kind, activations, target)


@pytest.mark.parametrize("kind,targets", [("bfloat16", ("rtx-3090", "rtx-4090")),
                                          ("int4_awq", ("rtx-3090", "rtx-4090")), ("fp8", ("rtx-4090",))])
def test_exported_embedded_model_builds_for_sm86_and_sm89(exporter, tmp_path, kind, targets):
    """Our exporter's graph of the embedded model, from each checkpoint kind, through the real builder."""
    ckpt = _checkpoint(kind, tmp_path / "ckpt")
    onnx_path = E._onnx_path(exporter(ckpt, tmp_path / "onnx", max_seq_len=256, opset=21), tmp_path / "onnx")
    for target in targets:
        r = E.build_engine(onnx_path, tmp_path / f"eng-{target}", get_target(target), Limits(1, 64, 256),
                           precisions=(kind,))
        assert r.engine_bytes > 0 and r.sm == TARGETS[target].sm_str, (kind, target)


@pytest.mark.parametrize("kind", ["bfloat16", "awq"])
def test_pool_graph_builds_for_sm89_with_its_io_as_recorded(exporter, tmp_path, kind):
    """The pool layout (the TensorRT route's contract: per-row past lengths, slot gather, new K/V rows out, ArgMax /
    TopK / log-softmax heads, the vocabulary mask) from a float and an INT4-AWQ checkpoint, fp16 activations, through
    the real builder; the manifest's I/O record is what the graph declares."""
    import onnx

    from test_onnx_export import make_awq
    from trt_gemma.checkpoint.convert import convert_checkpoint

    ckpt = convert_checkpoint(None, tmp_path / "ckpt", dtype="bfloat16" if kind == "bfloat16" else "float32",
                              show_progress=False)
    if kind == "awq":
        ckpt = make_awq(ckpt, tmp_path / "awq")
    s = exporter(ckpt, tmp_path / "onnx", max_seq_len=256, opset=21, activations="float16", kv_cache="pool",
                 vocab_mask=True, show_progress=False)
    onnx_path = E._onnx_path(s, tmp_path / "onnx")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    declared = [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                for v in [*graph.input, *graph.output]]
    assert declared == [(t["name"], t["shape"]) for t in s["io"]]
    assert not {v.name for v in graph.input} & {v.name for v in graph.output}, "an input is also an output"
    r = E.build_engine(onnx_path, tmp_path / "eng", TARGETS["rtx-4090"], Limits(4, 64, 256), precisions=("float16",))
    assert r.engine_bytes > 0 and r.sm == TARGETS["rtx-4090"].sm_str
