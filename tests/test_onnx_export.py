"""`trt-gemma export-onnx`: onnxruntime runs the exported graph and must reproduce the numpy reference's logits on the
same checkpoint, over a prefill longer than the sliding window and 20 decode steps fed through past/present KV.

Every layer's present K/V is compared too, so a failure names the first layer that drifts. Quantized graphs run with
`session.qdq_matmulnbits_accuracy_level=0` (onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits; level 0
keeps float32 activations), so weight-only layouts must match within float32 summation noise. INT4-AWQ and FP8
checkpoints are written here directly in TensorRT-LLM's layout (packed int4 / e4m3 codes from the project's codecs,
random AWQ pre-scales), which is faster than calibrating with ModelOpt and checks the same layout.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime", reason="the ONNX route needs the onnx extra: pip install '.[onnx]'")
pytest.importorskip("onnx", reason="the ONNX route needs the onnx extra: pip install '.[onnx]'")

from trt_gemma.checkpoint.convert import convert_checkpoint  # noqa: E402
from trt_gemma.errors import ConfigError, InputError, OutputError, UnsupportedModelError  # noqa: E402
from trt_gemma.onnx.export import export_onnx  # noqa: E402
from trt_gemma.reference import ReferenceModel  # noqa: E402
from trt_gemma.reference.checkpoint import Linear  # noqa: E402

PREFILL, DECODE = 20, 20  # tiny sliding window is 8: the prefill alone crosses it
TOL = {"fp32": 1e-4, "bf16": 1e-4, "int8_wo": 1e-4, "int4_wo": 1e-4, "awq": 1e-4, "awq_g64": 1e-4, "bf16_tp2": 1e-4,
       # FP8 rounds every GEMM input to e4m3: onnxruntime divides by the scale where the reference multiplies by
       # its inverse (ModelOpt's form), and a one-ulp difference flips an e4m3 rounding now and then; a flip moves
       # this random tiny model's logits by up to a few 1e-2 (tests/test_quantize.py measures the same effect).
       "fp8": 0.05}  # measured 2e-5 here; without the activation Q/DQ the logits move by ~5
LINEARS = ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")


def session(path, threads: int = 1):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path / "model.onnx"), so, providers=["CPUExecutionProvider"])


# ---- checkpoints in every layout ---------------------------------------------------------------------------------

def _rewrite(src, dst, quant: dict, fn):
    """Copy checkpoint `src` to `dst`, replacing each linear's tensors by fn(prefix, float32 weight) -> dict."""
    from safetensors.numpy import load_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "rank0.safetensors"))
    out = {}
    for name, arr in tensors.items():
        prefix = name[:-len(".weight")]
        if name.endswith(".weight") and prefix.split(".", 3)[-1] in LINEARS:
            out.update(fn(prefix, arr.astype(np.float32)))
        else:
            out[name] = arr
    for i in range(10 ** 3):
        if f"transformer.layers.{i}.attention.qkv.weight" not in tensors:
            break
        if quant.get("kv_cache_quant_algo") == "FP8":
            out[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] = np.array([0.02 + 0.01 * i], np.float32)
    _save(out, dst / "rank0.safetensors", fp8=quant.get("quant_algo") == "FP8")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"].update(quant)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _save(tensors: dict, path, fp8: bool) -> None:
    """safetensors through the project's streaming writer, which can declare float8_e4m3fn codes (uint8)."""
    from trt_gemma.checkpoint.st_io import StreamingWriter

    st = {np.dtype("float32"): "F32", np.dtype("int8"): "I8", np.dtype("uint16"): "BF16", np.dtype("uint8"): "F8_E4M3"}
    assert fp8 or all(a.dtype != np.uint8 for a in tensors.values())
    specs = [(n, st[a.dtype], a.shape) for n, a in tensors.items()]
    with StreamingWriter(path, specs) as w:
        for n, a in tensors.items():
            w.write(n, a)


def make_awq(src, dst, group: int = 128, seed: int = 0):
    from trt_gemma.quant.formats import Int4AWQFormat

    rng = np.random.default_rng(seed)

    def awq(prefix, w):
        pqs = rng.uniform(0.5, 2.0, w.shape[1]).astype(np.float32)
        ws = w / pqs  # (x * pqs) @ (w / pqs).T == x @ w.T before rounding
        amax = np.abs(ws).reshape(w.shape[0], -1, group).max(-1)
        wsf = (amax / 7).astype(np.float32)
        return {f"{prefix}.weight": Int4AWQFormat.quantize(ws, wsf), f"{prefix}.weights_scaling_factor": wsf,
                f"{prefix}.prequant_scaling_factor": pqs}
    return _rewrite(src, dst, {"quant_algo": "W4A16_AWQ", "group_size": group, "exclude_modules": ["lm_head"],
                               "pre_quant_scale": True}, awq)


def make_fp8(src, dst):
    from trt_gemma.quant.formats import FP8Format

    def fp8(prefix, w):
        wsf = np.float32(np.abs(w).max() / 448)
        return {f"{prefix}.weight": FP8Format.quantize(w, wsf), f"{prefix}.weights_scaling_factor": np.array([wsf]),
                f"{prefix}.activation_scaling_factor": np.array([0.01], np.float32)}
    return _rewrite(src, dst, {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]},
                    fp8)


_CKPTS: dict = {}


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("onnx_ckpts")

    def get(kind: str):
        if kind not in _CKPTS:
            conv = dict(show_progress=False)
            if kind == "fp32":
                _CKPTS[kind] = convert_checkpoint(tiny_model_dir, work / kind, dtype="float32", **conv)
            elif kind == "bf16":
                _CKPTS[kind] = convert_checkpoint(tiny_model_dir, work / kind, dtype="bfloat16", **conv)
            elif kind == "bf16_tp2":
                _CKPTS[kind] = convert_checkpoint(tiny_model_dir, work / kind, dtype="bfloat16", tp=2, **conv)
            elif kind in ("int8_wo", "int4_wo"):
                _CKPTS[kind] = convert_checkpoint(tiny_model_dir, work / kind, dtype="bfloat16",
                                                  weight_only=kind[:4], **conv)
            elif kind == "awq":
                _CKPTS[kind] = make_awq(get("fp32"), work / kind)
            elif kind == "awq_g64":
                _CKPTS[kind] = make_awq(get("fp32"), work / kind, group=64)
            elif kind == "fp8":
                _CKPTS[kind] = make_fp8(get("fp32"), work / kind)
        return _CKPTS[kind]
    return get


def _max(a, b) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())


def compare_run(model: ReferenceModel, sess, ids: np.ndarray, decode: int, tol: float, what: str) -> float:
    """Prefill `ids` then greedy-decode `decode` tokens through past/present; every step's logits and every layer's
    present K/V must be within `tol` of the reference. Returns the largest logits difference seen. An "inplace"
    graph (it has a `past_length` input) gets fixed-capacity buffers; the rows written so far are compared. A
    last-position graph (logits [batch, 1, vocab]) is compared with the reference's last row."""
    c = model.config
    capacity = len(ids) + decode + 1
    cache = model.new_cache(capacity)
    inplace = "past_length" in {i.name for i in sess.get_inputs()}
    kv_type = np.float16 if sess.get_inputs()[-1].type == "tensor(float16)" else np.float32  # --activations
    feeds = {"input_ids": ids[None].astype(np.int64)}
    for i in range(c.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros(
                (1, c.num_key_value_heads, capacity if inplace else 0, c.head_size), kv_type)
    names = [o.name for o in sess.get_outputs()]
    worst, feed = 0.0, ids
    for step in range(decode + 1):
        if inplace:
            feeds["past_length"] = np.array([cache.length], np.int64)
        want = model.forward(feed, cache)
        outs = dict(zip(names, sess.run(None, feeds)))
        label = "prefill" if step == 0 else f"decode step {step}"
        for i in range(c.num_hidden_layers):  # locate drift: the first layer whose cache disagrees
            for kv, ref in (("key", cache.k), ("value", cache.v)):
                got = outs[f"present.{i}.{kv}"][0, :, :cache.length]
                mx, mean = _max(got, ref[i, :, :cache.length])
                assert mx <= tol, f"{what} {label}: layer {i} present {kv} max |Δ| {mx:.3g} > {tol} (mean {mean:.3g})"
        got = outs["logits"][0]
        assert got.shape in ((1, c.vocab_size), want.shape), f"{what} {label}: logits shape {got.shape}"
        mx, mean = _max(got, want[-len(got):])
        assert mx <= tol, f"{what} {label}: logits max |Δ| {mx:.3g} > {tol} (mean {mean:.3g})"
        worst = max(worst, mx)
        token = int(np.argmax(want[-1]))
        feed = np.array([token])
        feeds = {"input_ids": feed[None].astype(np.int64)}
        feeds.update({n.replace("present", "past_key_values"): outs[n] for n in names[1:]})
    return worst


CASES = ([(kind, "concat", "last") for kind in TOL] + [(kind, "inplace", "last") for kind in ("fp32", "awq", "fp8")]
         + [("fp32", "concat", "all"), ("awq", "inplace", "all")])


@pytest.mark.parametrize("kind,kv_cache,logits", CASES)
def test_onnxruntime_matches_reference(kind, kv_cache, logits, ckpt, tmp_path):
    src = ckpt(kind)
    summary = export_onnx(src, tmp_path / "onnx", kv_cache=kv_cache, logits=logits, show_progress=False)
    assert summary["model"]["kv_cache"] == kv_cache and summary["model"]["logits"] == logits
    assert summary["model"]["quant_algo"] == json.loads((src / "config.json").read_text())["quantization"]["quant_algo"]
    ids = np.random.default_rng(1).integers(6, 380, PREFILL)
    compare_run(ReferenceModel.load(src), session(tmp_path / "onnx"), ids, DECODE, TOL[kind], kind)


def test_graph_is_standard_and_quantized_as_declared(ckpt, tmp_path):
    import onnx

    export_onnx(ckpt("awq"), tmp_path / "awq", show_progress=False)
    m = onnx.load(str(tmp_path / "awq" / "model.onnx"), load_external_data=False)
    assert {o.domain for o in m.opset_import} == {""} and m.opset_import[0].version == 21
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node), "non-standard operator domain"
    dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear"]
    attrs = {(a.name, a.i) for n in dq for a in n.attribute}
    assert len(dq) == 5 * 3 and {("axis", 0), ("block_size", 128)} <= attrs
    int4 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 15 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in int4)
    assert sum(n.op_type == "Mul" and n.name.endswith(".prequant/Mul") for n in m.graph.node) == 15


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_lm_head(bits, ckpt, tmp_path):
    """--lm-head: the graph's head equals the reference with its lm_head replaced by the dequantized codes."""
    from trt_gemma.quant.formats import Int4AWQFormat
    from trt_gemma.reference.quantized import rtn_codes

    src = ckpt("bf16")
    export_onnx(src, tmp_path / "onnx", lm_head=bits, logits="all", show_progress=False)
    model = ReferenceModel.load(src)
    w = model.embedding
    if bits == "int8":
        q, scale = rtn_codes(w, 8, "BF16")
        deq = q * scale[:, None]
    else:
        amax = np.abs(w).reshape(w.shape[0], -1, 128).max(-1)
        wsf = np.where(amax > 0, amax / np.float32(7), np.float32(1))  # the padding row is all zeros
        deq = Int4AWQFormat.dequantize(Int4AWQFormat.quantize(w, wsf), wsf)
    assert np.abs(deq - w).max() > 1e-3  # the head really is quantized
    model.lm_head = Linear.from_weight(deq)
    ids = np.random.default_rng(2).integers(6, 380, PREFILL)
    compare_run(model, session(tmp_path / "onnx"), ids, 4, 1e-4, f"lm_head {bits}")


def test_last_position_logits_slice_before_the_head(ckpt, tmp_path):
    """logits="last" (the default): one row per sequence out of a 20-token prefill, equal to the all-positions graph's
    last row, and the lm_head MatMul runs on that row only (its input is the sliced hidden state)."""
    import onnx

    src = ckpt("fp32")
    for logits in ("last", "all"):
        export_onnx(src, tmp_path / logits, logits=logits, show_progress=False)
    ids = np.random.default_rng(3).integers(6, 380, PREFILL)[None]
    c, outs = ReferenceModel.load(src).config, {}
    for logits in ("last", "all"):
        sess = session(tmp_path / logits)
        feeds = {i.name: np.zeros((1, c.num_key_value_heads, 0, c.head_size), np.float32)
                 for i in sess.get_inputs() if i.name != "input_ids"}
        outs[logits] = sess.run(["logits"], {"input_ids": ids, **feeds})[0]
    assert outs["last"].shape == (1, 1, outs["all"].shape[2]) and outs["all"].shape[1] == PREFILL
    mx, _ = _max(outs["last"][0, 0], outs["all"][0, -1])
    assert mx <= 1e-5, f"last-position logits vs the all-positions graph's last row: max |Δ| {mx:.3g}"
    g = onnx.load(str(tmp_path / "last" / "model.onnx"), load_external_data=False).graph
    sliced = [n for n in g.node if n.op_type == "Slice"]
    assert [n.name for n in sliced] == ["last_position/Slice"]
    out_dims = [d.dim_value or d.dim_param for d in g.output[0].type.tensor_type.shape.dim]
    assert g.output[0].name == "logits" and out_dims[1] == 1


def test_bad_options_are_typed_errors_and_leave_no_output(ckpt, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"--opset 20.*INT4"):
        export_onnx(ckpt("awq"), out, opset=20, show_progress=False)
    with pytest.raises(ConfigError, match=r"--max-seq-len 100000"):
        export_onnx(ckpt("fp32"), out, max_seq_len=100000, show_progress=False)
    with pytest.raises(ConfigError, match="--lm-head"):
        export_onnx(ckpt("fp32"), out, lm_head="int2", show_progress=False)
    with pytest.raises(ConfigError, match="--kv-cache"):
        export_onnx(ckpt("fp32"), out, kv_cache="paged", show_progress=False)
    with pytest.raises(ConfigError, match="--logits"):
        export_onnx(ckpt("fp32"), out, logits="first", show_progress=False)
    assert not out.exists()


def test_unrepresentable_checkpoints_name_the_tensor(ckpt, tmp_path):
    from safetensors.numpy import load_file

    bad = shutil.copytree(ckpt("awq"), tmp_path / "g3")
    t = load_file(str(bad / "rank0.safetensors"))
    name = "transformer.layers.1.mlp.fc.weights_scaling_factor"
    t[name] = np.repeat(t[name][:, :1], 3, axis=1)  # 3 groups over in_features 256: not whole blocks
    _save(t, bad / "rank0.safetensors", fp8=False)
    with pytest.raises(ConfigError, match=r"layers\.1\.mlp\.fc\.weights_scaling_factor: 3 groups over in_features 256"):
        export_onnx(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    odd = shutil.copytree(ckpt("fp32"), tmp_path / "odd")
    cfg = json.loads((odd / "config.json").read_text())
    cfg["quantization"]["kv_cache_quant_algo"] = "INT8"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="kv_cache_quant_algo 'INT8'"):
        export_onnx(odd, tmp_path / "out", show_progress=False)
    cfg["quantization"].update(kv_cache_quant_algo=None, quant_algo="NVFP4")
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="quant_algo 'NVFP4'"):
        export_onnx(odd, tmp_path / "out", show_progress=False)


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputError, match="already exists"):
        export_onnx(ckpt("fp32"), out, show_progress=False)
    assert (out / "keep").exists()
    with pytest.raises(OutputError, match="not written by trt-gemma"):  # --force never replaces a user's folder
        export_onnx(ckpt("fp32"), out, force=True, show_progress=False)
    assert (out / "keep").exists()
    export_onnx(ckpt("fp32"), out / "mine", show_progress=False)
    (out / "mine" / "keep").write_text("x")
    export_onnx(ckpt("fp32"), out / "mine", force=True, show_progress=False)  # our own export: replaced
    assert not (out / "mine" / "keep").exists() and (out / "mine" / "model.onnx").is_file()


def test_cli_json_summary(ckpt, tmp_path, capsys):
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export-onnx", str(ckpt("int4_wo")), str(tmp_path / "o"), "--max-seq-len", "64", "--json"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    s = json.loads(out)
    assert s["model"]["max_seq_len"] == 64 and s["model"]["quant_algo"] == "W4A16" and s["opset"] == 21
    assert (tmp_path / "o" / "tokenizer.json").is_file() and s["external_bytes"] > 0
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", str(tmp_path / "nowhere"), str(tmp_path / "o2")])
    assert e.value.code != 0 and not (tmp_path / "o2").exists()


def test_missing_tensor_is_named(ckpt, tmp_path):
    from safetensors.numpy import load_file, save_file

    bad = shutil.copytree(ckpt("fp32"), tmp_path / "bad")
    t = load_file(str(bad / "rank0.safetensors"))
    del t["transformer.layers.1.mlp.gate.weight"]
    save_file(t, str(bad / "rank0.safetensors"))
    with pytest.raises(InputError, match=r"transformer\.layers\.1\.mlp\.gate\.weight"):
        export_onnx(bad, tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind,kv_cache", [("bf16", "concat"), ("awq", "concat"), ("awq", "inplace")])
def test_tensorrt_rtx_parser_accepts_the_graph(kind, kv_cache, ckpt, tmp_path):
    """The graph the TensorRT route builds from: tensorrt_rtx's own ONNX parser must take it without errors
    (engine building is `trt-gemma build --engine tensorrt`'s part)."""
    export_onnx(ckpt(kind), tmp_path / "onnx", kv_cache=kv_cache, show_progress=False)
    names = _tensorrt_rtx_outputs(tmp_path / "onnx" / "model.onnx", kind)
    assert "logits" in names and "present.2.value" in names


def _tensorrt_rtx_outputs(model_path, what: str) -> set:
    """Parse `model_path` with tensorrt_rtx's own ONNX parser (skip where it is not installed); any parser error fails
    the test. Returns the network's output names."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(model_path))
    errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
    assert ok and not errors, f"{what}: tensorrt_rtx rejects the graph: {errors}"
    return {network.get_output(i).name for i in range(network.num_outputs)}



# --activations float16 against the float32 reference: fp16 keeps 11 significant bits (unit roundoff 2^-11 = 4.9e-4),
# so one rounding of these logits (|logit| <= 8 after the tiny model's final soft-cap) moves them by up to 4e-3, and
# every activation of the two layers is rounded some twenty times on the way. Measured here over a 20-token prefill
# and 20 decode steps: 0.016 (fp32 weights), 0.006 (bf16), 0.024 (INT4-AWQ), 0.009 (W4A16); the bound leaves 2x.
# (RMSNorm and the final soft-cap run in float32 in every variant, so the bound is about rounding, not overflow.)
# FP8 is left out: its activation Q/DQ then divides by an fp16 scale in fp16, which flips e4m3 roundings that the
# float32 reference does not (1.3 measured on this random model), so fp16 FP8 is checked by the TensorRT builder only.
FP16_TOL = 0.05


@pytest.mark.parametrize("kind,kv_cache", [("fp32", "concat"), ("bf16", "concat"), ("awq", "inplace"),
                                           ("int4_wo", "concat")])
def test_float16_activations_match_the_reference_within_fp16_rounding(kind, kv_cache, ckpt, tmp_path):
    src = ckpt(kind)
    s = export_onnx(src, tmp_path / "onnx", activations="float16", kv_cache=kv_cache, logits="all",
                    show_progress=False)
    assert s["model"]["activation_dtype"] == "float16"
    sess = session(tmp_path / "onnx")
    assert sess.get_inputs()[-1].type == "tensor(float16)" and sess.get_outputs()[0].type == "tensor(float)"
    ids = np.random.default_rng(1).integers(6, 380, PREFILL)
    worst = compare_run(ReferenceModel.load(src), sess, ids, DECODE, FP16_TOL, f"{kind} float16 activations")
    assert worst > 1e-4, f"{kind}: float16 logits within {worst:.2g} of float32: the graph did not compute in fp16"


# ---- opset 23: RMSNormalization and RotaryEmbedding (the onnxruntime backend's own exports) ---------------------

def _needs_opset_23():
    from trt_gemma.runtime.backends import onnx_cache_opset

    if onnx_cache_opset() < 23:
        pytest.skip("the installed onnx / onnxruntime has no opset-23 RMSNormalization / RotaryEmbedding")


@pytest.mark.parametrize("kind,kv_cache,activations", [("fp32", "inplace", "float32"), ("awq", "concat", "float32"),
                                                       ("fp8", "inplace", "float32"), ("bf16_tp2", "concat", "float32"),
                                                       ("awq", "inplace", "float16")])
def test_opset_23_operators_match_the_reference(kind, kv_cache, activations, ckpt, tmp_path):
    """The one-node norm and rotary must be the decomposed math: the same bounds against the reference, and the
    graph really uses them (no ReduceMean / Neg left of the opset-21 forms)."""
    import onnx

    _needs_opset_23()
    src = ckpt(kind)
    s = export_onnx(src, tmp_path / "onnx", opset=23, kv_cache=kv_cache, activations=activations, logits="all",
                    show_progress=False)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph.node}
    assert s["opset"] == 23 and {"RMSNormalization", "RotaryEmbedding"} <= ops and not ops & {"ReduceMean", "Neg"}, \
        f"{kind}: opset-23 graph still has {sorted(ops & {'ReduceMean', 'Neg'})} / lacks the fused operators"
    ids = np.random.default_rng(1).integers(6, 380, PREFILL)
    tol = FP16_TOL if activations == "float16" else TOL[kind]
    compare_run(ReferenceModel.load(src), session(tmp_path / "onnx"), ids, DECODE, tol, f"{kind} opset 23")


def test_tensorrt_rtx_parser_accepts_the_opset_23_graph(ckpt, tmp_path):
    """TensorRT-RTX 1.7's parser takes RMSNormalization and RotaryEmbedding (TensorRT gained RMSNormalization in
    10.15: JetPack's TensorRT does not have it, which is why the TensorRT route exports opset 21)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")
    _needs_opset_23()
    export_onnx(ckpt("awq"), tmp_path / "onnx", opset=23, kv_cache="inplace", activations="float16",
                show_progress=False)
    assert "logits" in _tensorrt_rtx_outputs(tmp_path / "onnx" / "model.onnx", "awq opset 23")
