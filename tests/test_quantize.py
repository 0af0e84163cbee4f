"""Quantization: our TRT-LLM checkpoints, run by the numpy reference, against ModelOpt's own quantized torch model.

The oracle (docs/quantization.md): the calibrated ModelOpt fake-quant model after `prepare_for_export` and after
ModelOpt's own `requantize_resmooth_fused_llm_layers` (the first thing its export does: averages the q/k/v and
gate/up AWQ scales, re-smooths and re-quantizes the weights, folds the shared scale into Gemma's (1+w) norms).
That model computes what the exported checkpoint holds; the reference must reproduce its logits within 1e-4 (fp32).

INT4-AWQ has no activation quantization, so logits are compared directly. FP8 rounds every GEMM input (and K/V) to
e4m3: a 1e-7 difference between torch's and numpy's float32 sums flips one rounding now and then, and a flipped
e4m3 rounding moves a random tiny model's logits by ~1e-2, so a plain end-to-end comparison would test summation
order, not the checkpoint. The FP8 test therefore teacher-forces at the quantization points: every reference
quantizer must (a) see an input within 1e-4 of ModelOpt's, (b) turn ModelOpt's exact input into ModelOpt's exact
output (bit-for-bit math), and then (c) hands ModelOpt's output on, so rounding decisions cannot cascade; the final
logits must then agree within 1e-4.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")

from trt_gemma.checkpoint.convert import convert_checkpoint  # noqa: E402
from trt_gemma.errors import ConfigError, InputError, ResourceError, UnsupportedModelError  # noqa: E402
from trt_gemma.quant.formats import FORMATS, unpack_int4  # noqa: E402
from trt_gemma.reference import ReferenceModel  # noqa: E402
from trt_gemma.checkpoint.st_io import read_header  # noqa: E402

TOL = 1e-4
LINEARS = {"qkv": "self_attn.q_proj", "dense": "self_attn.o_proj", "fc": "mlp.gate_proj", "gate": "mlp.up_proj",
           "proj": "mlp.down_proj"}
HF_OF = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "attention.dense": ("self_attn.o_proj",), "mlp.fc": ("mlp.gate_proj",), "mlp.gate": ("mlp.up_proj",),
         "mlp.proj": ("mlp.down_proj",)}


@dataclasses.dataclass
class Quantized:
    model: object      # calibrated ModelOpt model after prepare_for_export
    oracle: object     # deep copy after ModelOpt's own resmoothing (what the export writes)
    unified: Path      # ModelOpt unified-HF export
    ckpt: Path         # our TRT-LLM checkpoint (float32)


def _quantize(src: Path, work: Path, quant: str, kv: str | None = None, group: int = 128, samples: int = 4,
              seq: int = 32, calib: Path | None = None) -> Quantized:
    from modelopt.torch.export.unified_export_hf import requantize_resmooth_fused_llm_layers

    from tiny import _TEXT
    from trt_gemma.quant.modelopt import (calibrate, calibration_batches, export_unified, load_model,
                                    prepare_for_export)

    torch.set_num_threads(2)
    work.mkdir(parents=True, exist_ok=True)
    if calib is None:
        calib = work / "calib.txt"
        calib.write_text(_TEXT * 3)
    model = calibrate(load_model(src, "cpu"), quant, calibration_batches(src, calib, samples, seq), group, kv,
                      show_progress=False, log=lambda m: None)
    prepare_for_export(model)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        requantize_resmooth_fused_llm_layers(oracle)
    unified = export_unified(model, work / "unified", tokenizer_dir=src)
    ckpt = convert_checkpoint(unified, work / "ckpt", dtype="float32", show_progress=False)
    return Quantized(model, oracle, unified, ckpt)


_MADE: dict = {}


def _made(which: str, quant: str, kv, tiny_dir: Path, factory) -> Quantized:
    """One calibration per (model, recipe) for the whole module: the tiny random model, or the embedded model
    (trained weights, its own calibration text)."""
    key = (which, quant, kv)
    if key not in _MADE:
        work = factory.mktemp(f"{which}-{quant}-{kv}")
        samples = 2 if quant == "int4_awq" else 4  # awq_lite's alpha search costs ~11 forwards per sample
        if which == "tiny":
            _MADE[key] = _quantize(tiny_dir, work, quant, kv=kv, samples=samples)
        else:
            from trt_gemma.assets import calib_text_path, default_model_dir

            _MADE[key] = _quantize(default_model_dir(), work, quant, kv=kv, samples=samples, seq=48,
                                   calib=calib_text_path())
    return _MADE[key]


@pytest.fixture(scope="module")
def awq(tiny_model_dir, tmp_path_factory):
    return _made("tiny", "int4_awq", None, tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def fp8kv(tiny_model_dir, tmp_path_factory):
    return _made("tiny", "fp8", "fp8", tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def awq_any(request, tiny_model_dir, tmp_path_factory):
    return _made(request.param, "int4_awq", None, tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module", params=["tiny", "embedded"])
def fp8kv_any(request, tiny_model_dir, tmp_path_factory):
    return _made(request.param, "fp8", "fp8", tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(5)
    return np.concatenate([[2], rng.integers(6, 384, size=39)])  # 40 tokens > the tiny sliding window (8)


def _oracle_logits(oracle, ids) -> np.ndarray:
    with torch.no_grad():
        return oracle(torch.from_numpy(np.asarray([ids], np.int64))).logits[0].float().numpy()


def _assert_close(got, want, tol, what):
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    assert diff.max() <= tol, f"{what}: max abs diff {diff.max():.3g} (mean {diff.mean():.3g}) > {tol}"
    return float(diff.max())


# --- logits equivalence -------------------------------------------------------------------------------------------

def _check_awq(q: Quantized, ids, what: str) -> None:
    ref = ReferenceModel.load(q.ckpt)
    want = _oracle_logits(q.oracle, ids)
    _assert_close(ref.forward(ids), want, TOL, f"{what}: reference vs ModelOpt fake-quant")
    cache = ref.new_cache(len(ids))  # incremental decode through the same quantized layers
    steps = [ref.forward(ids[:30], cache)] + [ref.forward(ids[i:i + 1], cache) for i in range(30, len(ids))]
    _assert_close(np.concatenate(steps), want, TOL, f"{what}: incremental decode vs ModelOpt")
    # the resmoothing is real: without it (the calibrated model as is) the logits differ
    assert np.abs(_oracle_logits(q.model, ids) - want).max() > 10 * TOL


def test_int4_awq_reproduces_modelopt(awq_any, ids):
    _check_awq(awq_any, ids, "INT4-AWQ g128")


def test_int4_awq_group_64_and_tp2(tiny_model_dir, tmp_path, ids):
    q = _quantize(tiny_model_dir, tmp_path, "int4_awq", group=64, samples=1)
    _check_awq(q, ids, "INT4-AWQ g64")
    # TP=2 (dense in_features 128 / 2 = 64: one group per rank): the reference merges the ranks back exactly
    tp2 = convert_checkpoint(q.unified, tmp_path / "tp2", dtype="float32", tp=2, show_progress=False)
    assert json.loads((tp2 / "config.json").read_text())["quantization"]["group_size"] == 64
    _assert_close(ReferenceModel.load(tp2).forward(ids), ReferenceModel.load(q.ckpt).forward(ids), 1e-6,
                  "INT4-AWQ g64 TP2 vs TP1")


def test_fp8_tp2_merges_to_tp1(fp8kv, tmp_path, ids):
    tp2 = convert_checkpoint(fp8kv.unified, tmp_path / "tp2", dtype="float32", tp=2, show_progress=False)
    _assert_close(ReferenceModel.load(tp2).forward(ids), ReferenceModel.load(fp8kv.ckpt).forward(ids), 1e-6,
                  "FP8 + FP8 KV TP2 vs TP1")


class _Forced:
    """A reference quantizer under teacher forcing (see the module docstring)."""

    def __init__(self, quant, rec_in, rec_out, what, log):
        self.quant, self.rec_in, self.rec_out, self.what, self.log = quant, rec_in, rec_out, what, log

    def __call__(self, x):
        mine = self.quant(self.rec_in)  # (b) ModelOpt's input through our math
        scale = max(1.0, float(np.abs(self.rec_out).max()))
        exact = float(np.abs(mine - self.rec_out).max()) / scale
        assert exact <= 1e-6, f"{self.what}: our fp8 math on ModelOpt's input differs by {exact:.3g} (relative)"
        seen = float(np.abs(x - self.rec_in).max()) / max(1.0, float(np.abs(self.rec_in).max()))
        self.log.append((self.what, seen, int(np.count_nonzero(self.quant(x) != self.rec_out))))
        return self.rec_out  # (c)


class _ForcedKV:
    """The block's one KV quantizer is called for K, then V: route each call to its forced quantizer."""

    def __init__(self, k, v):
        self.k, self.v, self.calls = k, v, 0

    def __call__(self, x):
        forced = (self.k if self.calls % 2 == 0 else self.v)
        self.calls += 1
        return forced(x)


def _record(oracle, ids):
    """Inputs and outputs of every enabled quantizer of the ModelOpt model, by module name."""
    rec, hooks = {}, []
    for name, mod in oracle.named_modules():
        if name.endswith(("input_quantizer", "k_bmm_quantizer", "v_bmm_quantizer")) and mod.is_enabled:
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, n=name: rec.__setitem__(n, (a[0].detach().float().numpy(), o.detach().float().numpy()))))
    logits = _oracle_logits(oracle, ids)
    for h in hooks:
        h.remove()
    return rec, logits


def test_fp8_with_fp8_kv_reproduces_modelopt(fp8kv_any, ids):
    rec, want = _record(fp8kv_any.oracle, ids)
    ref = ReferenceModel.load(fp8kv_any.ckpt)
    log = []
    for i, b in enumerate(ref.blocks):
        p = f"model.layers.{i}."
        forced = {}
        for field, hf in LINEARS.items():
            x, y = rec[p + hf + ".input_quantizer"]
            lin = getattr(b, field)
            forced[field] = dataclasses.replace(lin, act=_Forced(lin.act, x[0], y[0], f"layer {i} {field}", log))
        kv = [rec[p + f"self_attn.{n}_bmm_quantizer"] for n in "kv"]
        k, v = [_Forced(b.kv_quant, x[0].transpose(1, 0, 2), y[0].transpose(1, 0, 2), f"layer {i} {n} cache", log)
                for (x, y), n in zip(kv, "kv")]
        ref.blocks[i] = dataclasses.replace(b, kv_quant=_ForcedKV(k, v), **forced)
    got = ref.forward(ids)
    assert len(log) == 7 * len(ref.blocks), "every FP8 quantizer of the checkpoint was exercised"
    worst = max(log, key=lambda r: r[1])
    assert worst[1] <= TOL, f"{worst[0]}: reference input differs from ModelOpt's by {worst[1]:.3g} (relative)"
    _assert_close(got, want, TOL, "FP8 + FP8 KV reference (teacher-forced at e4m3 roundings) vs ModelOpt")


def test_fp8_plain_forward_is_close(fp8kv_any, ids):
    """Without teacher forcing the only differences are rare e4m3 rounding flips: bounded, and few."""
    got = ReferenceModel.load(fp8kv_any.ckpt).forward(ids)
    want = _oracle_logits(fp8kv_any.oracle, ids)
    diff = np.abs(got - want)
    assert np.median(diff) < 1e-3 and diff.max() < 0.5, f"FP8 free-running: max {diff.max():.3g}"


# --- layout and config --------------------------------------------------------------------------------------------

def _specs(ckpt: Path) -> dict:
    return {n: (i.dtype, tuple(i.shape)) for n, i in read_header(ckpt / "rank0.safetensors")[0].items()}


def test_awq_layout_and_nibble_order(awq):
    specs, cfg = _specs(awq.ckpt), json.loads((awq.ckpt / "config.json").read_text())
    H, nq, nkv, d = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_size"]
    F, layers = cfg["intermediate_size"], cfg["num_hidden_layers"]
    dims = {"attention.qkv": ((nq + 2 * nkv) * d, H), "attention.dense": (H, nq * d), "mlp.fc": (F, H),
            "mlp.gate": (F, H), "mlp.proj": (H, F)}
    for i in range(layers):
        for lin, (o, n) in dims.items():
            for name, dt, shape in FORMATS["int4_awq"].checkpoint_tensors(f"transformer.layers.{i}.{lin}", o, n,
                                                                           "float32", 128):
                assert specs.pop(name) == (dt, shape), name
    assert specs.pop("lm_head.weight") == ("F32", (cfg["vocab_size"], H))  # unquantized, a copy of the embedding
    assert all(dt == "F32" for dt, _ in specs.values()), specs  # embedding + norms stay float
    # nibble order: unpack our packed qkv and compare row by row with ModelOpt's fake-quantized q/k/v weights
    from trt_gemma.reference.checkpoint import CheckpointConfig, ShardSet

    shards = ShardSet(awq.ckpt, CheckpointConfig.from_file(awq.ckpt / "config.json"))
    packed = shards.get("transformer.layers.1.attention.qkv.weight")
    wsf = shards.get_f32("transformer.layers.1.attention.qkv.weights_scaling_factor")
    q = unpack_int4(packed).astype(np.float32) * np.repeat(wsf, 128, axis=1)
    attn = awq.oracle.model.layers[1].self_attn
    with torch.no_grad():
        want = torch.cat([m.weight_quantizer(m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]).numpy()
    _assert_close(q, want, 1e-6, "int4 weights (low nibble = even row) vs ModelOpt fake-quant")
    assert packed.dtype == np.int8 and np.array_equal(q[0::2] != 0, (packed.view(np.uint8) & 0x0F) != 0)


def test_fp8_layout(fp8kv):
    specs, cfg = _specs(fp8kv.ckpt), json.loads((fp8kv.ckpt / "config.json").read_text())
    for i in range(cfg["num_hidden_layers"]):
        for lin in HF_OF:
            assert specs[f"transformer.layers.{i}.{lin}.weight"][0] == "F8_E4M3"
            for s in ("weights_scaling_factor", "activation_scaling_factor"):
                assert specs[f"transformer.layers.{i}.{lin}.{s}"] == ("F32", (1,))
        assert specs[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] == ("F32", (1,))
    assert specs["lm_head.weight"][0] == specs["transformer.vocab_embedding.weight"][0] == "F32"


def test_config_blocks(awq, fp8kv):
    base = {"has_zero_point": False, "exclude_modules": ["lm_head"], "smoothquant_val": 0.5, "clamp_val": None,
            "use_meta_recipe": False}
    q = json.loads((awq.ckpt / "config.json").read_text())["quantization"]
    assert q == dict(base, quant_algo="W4A16_AWQ", kv_cache_quant_algo=None, group_size=128, pre_quant_scale=True)
    q = json.loads((fp8kv.ckpt / "config.json").read_text())["quantization"]
    assert q == dict(base, quant_algo="FP8", kv_cache_quant_algo="FP8", group_size=128, pre_quant_scale=False)


def test_awq_prequant_scales_are_carried(awq):
    """q/k/v and fc/gate: ModelOpt folded their shared AWQ scale into the (1+w) norm, so ours are ones and the norm
    is ModelOpt's folded (1+w)*s; o_proj/down_proj keep their own pre-quant scale."""
    from safetensors.numpy import load_file

    ours = load_file(str(awq.ckpt / "rank0.safetensors"))
    theirs = load_file(str(awq.unified / "model.safetensors"))
    for lin in ("attention.qkv", "mlp.fc", "mlp.gate"):
        assert np.all(ours[f"transformer.layers.0.{lin}.prequant_scaling_factor"] == 1.0)
    for lin, hf in (("attention.dense", "self_attn.o_proj"), ("mlp.proj", "mlp.down_proj")):
        np.testing.assert_array_equal(ours[f"transformer.layers.0.{lin}.prequant_scaling_factor"],
                                      theirs[f"model.layers.0.{hf}.pre_quant_scale"])
    norm = awq.oracle.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(ours["transformer.layers.0.input_layernorm.weight"], norm + 1.0, rtol=0, atol=1e-6)


# --- already-quantized input, bad input, memory ---------------------------------------------------------------------

def test_prequantized_input_converts_without_recalibration(awq, tmp_path, ids):
    from trt_gemma.quant.modelopt import quantize_checkpoint

    out = quantize_checkpoint(awq.unified, tmp_path / "q", dtype="float32", show_progress=False)
    assert (out / "rank0.safetensors").read_bytes() == (awq.ckpt / "rank0.safetensors").read_bytes()
    prov = json.loads((out / "trt_gemma_provenance.json").read_text())
    assert prov["quantization"]["prequantized"] is True
    with pytest.raises(ConfigError, match="already quantized as W4A16_AWQ"):
        quantize_checkpoint(awq.unified, tmp_path / "r", quant="fp8", show_progress=False)
    with pytest.raises(ConfigError, match="--group-size 64 cannot change it"):
        quantize_checkpoint(awq.unified, tmp_path / "r", group_size=64, show_progress=False)
    assert not (tmp_path / "r").exists()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensor(path: Path, name: str, fn) -> None:
    """Rewrite one tensor of a safetensors file (torch: numpy has no float8); fn None deletes it."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    if fn is None:
        del t[name]
    else:
        t[name] = fn(t[name]).contiguous()
    save_file(t, str(path), metadata={"format": "pt"})


def _nan_code(w):
    w = w.clone()
    w.view(torch.uint8).view(-1)[7] = 0x7F  # e4m3fn NaN
    return w


@pytest.mark.parametrize("name,fn,err,match", [
    ("model.layers.0.self_attn.q_proj.weight_scale", None, UnsupportedModelError, "not ModelOpt's unified"),
    ("model.layers.1.mlp.down_proj.weight_scale", None, InputError, "missing"),
    ("model.layers.1.mlp.down_proj.pre_quant_scale", lambda a: a[:-1], InputError, "shape"),
    ("model.layers.0.self_attn.k_proj.weight", lambda a: a.float(), InputError, "dtype"),
])
def test_corrupt_quantized_input_is_refused(awq, tmp_path, name, fn, err, match):
    src = _copy(awq.unified, tmp_path / "u")
    _rewrite_tensor(src / "model.safetensors", name, fn)
    with pytest.raises(err, match=match):
        convert_checkpoint(src, tmp_path / "out", dtype="float32", show_progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,fn,match", [
    ("model.layers.2.mlp.up_proj.input_scale", lambda a: a * float("nan"), "input_scale"),
    ("model.layers.1.self_attn.v_proj.v_scale", lambda a: -a, "v_scale"),
    ("model.layers.0.mlp.gate_proj.weight", _nan_code, "NaN codes"),
])
def test_bad_fp8_scales_and_codes_are_refused(fp8kv, tmp_path, name, fn, match):
    src = _copy(fp8kv.unified, tmp_path / "u")
    _rewrite_tensor(src / "model.safetensors", name, fn)
    with pytest.raises(InputError, match=match):
        convert_checkpoint(src, tmp_path / "out", dtype="float32", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_reference_refuses_checkpoints_missing_scales(awq, fp8kv, tmp_path):
    for q, name in ((awq, "transformer.layers.1.mlp.proj.prequant_scaling_factor"),
                    (fp8kv, "transformer.layers.2.attention.kv_cache_scaling_factor"),
                    (fp8kv, "transformer.layers.0.attention.dense.activation_scaling_factor")):
        ck = _copy(q.ckpt, tmp_path / name)
        _rewrite_tensor(ck / "rank0.safetensors", name, None)
        with pytest.raises(InputError, match=name.rsplit(".", 1)[-1]):
            ReferenceModel.load(ck)


def test_memory_refusal_leaves_no_output(tiny_model_dir, tmp_path, monkeypatch):
    import trt_gemma.quant.modelopt as qz

    monkeypatch.setattr(qz, "available_memory", lambda: 1 << 20)  # a 1 MiB host
    with pytest.raises(ResourceError, match="--allow-low-memory"):
        qz.quantize_checkpoint(tiny_model_dir, tmp_path / "out", quant="fp8", device="cpu", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_options_are_checked_before_work(tiny_model_dir, tmp_path):
    from trt_gemma.checkpoint.config import preset_config
    from trt_gemma.quant.modelopt import _check_options, quantize_checkpoint

    with pytest.raises(ConfigError, match="--quant is missing"):
        quantize_checkpoint(tiny_model_dir, tmp_path / "a", show_progress=False)
    with pytest.raises(ConfigError, match="--group-size 32"):
        quantize_checkpoint(tiny_model_dir, tmp_path / "b", quant="int4_awq", group_size=32, show_progress=False)
    odd = dataclasses.replace(preset_config("gemma-2-2b"), hidden_size=2240)
    with pytest.raises(ConfigError, match="--group-size 64"):
        _check_options("int4_awq", 128, None, odd)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
