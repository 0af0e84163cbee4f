"""Quality report: metrics against independent computations (transformers' loss, torch's KL), baseline resolution,
the weight-only RTN emulation, and the quantize / eval commands end to end on the tiny model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from trt_gemma.checkpoint.convert import convert_checkpoint  # noqa: E402
from trt_gemma.errors import ConfigError, InputError  # noqa: E402
from trt_gemma.eval import evaluate  # noqa: E402

TEXT = ("Gemma runs on Jetson and RTX GPUs; the quick brown fox jumps over the lazy dog while TensorRT builds "
        "engines and the server streams tokens. ") * 6


@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    (d / "text.txt").write_text(TEXT)
    out = {"text": d / "text.txt"}
    for name, kw in {"fp32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"),
                     "int8_wo": dict(dtype="bfloat16", weight_only="int8"),
                     "int4_wo": dict(dtype="bfloat16", weight_only="int4")}.items():
        out[name] = convert_checkpoint(tiny_model_dir, d / name, show_progress=False, **kw)
    return out


def run_cli(args, capsys):
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def test_metrics_match_transformers_and_torch(ckpts, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from trt_gemma.reference import ReferenceModel
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    report = evaluate([ckpts["fp32"], ckpts["int4_wo"]], baseline=ckpts["fp32"], text_file=ckpts["text"],
                      max_tokens=60, max_context=32)
    same, rtn = report.rows
    assert same.top1_agreement == 1.0 and abs(same.mean_kl) < 1e-9 and same.perplexity == report.baseline["perplexity"]
    # independent perplexity: transformers' own next-token loss on the same <bos>-prefixed windows
    ids = GemmaTokenizer.from_dir(ckpts["fp32"]).encode(TEXT, add_bos=False)[:60]
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    nll, n, kl = 0.0, 0, []
    ref_q = ReferenceModel.load(ckpts["int4_wo"])
    for i in range(0, len(ids), 31):
        w = torch.tensor([[2] + ids[i:i + 31]])
        with torch.no_grad():
            out = hf(w, labels=w)
        nll += out.loss.item() * (w.shape[1] - 1)
        n += w.shape[1] - 1
        lp = torch.log_softmax(out.logits[0, :-1].double(), -1)
        lq = torch.log_softmax(torch.from_numpy(ref_q.forward(w[0].numpy())[:-1]).double(), -1)
        kl.append(torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
    assert report.tokens == n == 60
    assert abs(np.exp(nll / n) / report.baseline["perplexity"] - 1) < 1e-4, "perplexity vs transformers loss"
    assert abs(torch.cat(kl).mean().item() - rtn.mean_kl) < 1e-5 * max(1.0, rtn.mean_kl), "KL vs torch kl_div"
    assert rtn.mean_kl > 0 and rtn.quant_algo == "W4A16"


def test_weight_only_rows_emulate_trtllm_rtn(ckpts):
    """W8A16/W4A16 checkpoints hold float weights; the reference applies TRT-LLM's per-channel RTN."""
    from trt_gemma.reference import ReferenceModel

    w = ReferenceModel.load(ckpts["bf16"]).blocks[0].fc.weight
    for name, bits in (("int8_wo", 8), ("int4_wo", 4)):
        got = ReferenceModel.load(ckpts[name]).blocks[0].fc.weight
        qmax = 2 ** (bits - 1)
        scale = np.abs(w).max(axis=1, keepdims=True) / qmax  # cutlass_preprocessors.cpp symmetric_quantize
        q = np.clip(np.trunc(w / scale + np.copysign(0.5, w)), -qmax, qmax - 1)
        bf16_scale = torch.from_numpy(scale).to(torch.bfloat16).float().numpy()
        np.testing.assert_allclose(got, q * bf16_scale, rtol=0, atol=1e-6, err_msg=name)
        assert len(np.unique(np.round(got[0] / bf16_scale[0]))) <= 2 ** bits


def test_baseline_resolution(ckpts, tmp_path):
    r = evaluate([ckpts["int8_wo"], ckpts["bf16"]], text_file=ckpts["text"], max_tokens=20)
    assert r.baseline["name"] == "bf16" and r.baseline["how"] == "first unquantized checkpoint"
    q = shutil.copytree(ckpts["int8_wo"], tmp_path / "q")
    (q / "trt_gemma_provenance.json").unlink()
    with pytest.raises(ConfigError, match="--baseline"):
        evaluate([q], text_file=ckpts["text"], max_tokens=20)
    with pytest.raises(InputError, match="does not exist"):
        evaluate([q], baseline=ckpts["fp32"], text_file=tmp_path / "nope.txt")


def test_bundles_and_hf_dirs_are_evaluated_like_generate_runs_them(ckpts, tiny_model_dir, tmp_path, monkeypatch):
    """A build bundle scores its checkpoint/, an HF dir is converted into the cache; rows keep the names given."""
    monkeypatch.setenv("TRT_GEMMA_CACHE", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    shutil.copytree(ckpts["int8_wo"], bundle / "checkpoint")
    (bundle / "manifest.json").write_text("{}")
    r = evaluate([bundle, tiny_model_dir], baseline=ckpts["fp32"], text_file=ckpts["text"], max_tokens=20)
    (b, hf), want = r.rows, evaluate([ckpts["int8_wo"]], baseline=ckpts["fp32"], text_file=ckpts["text"],
                                     max_tokens=20).rows[0]
    assert (b.name, b.quant_algo, hf.name) == ("bundle", "W8A16", tiny_model_dir.name)
    assert (b.perplexity, b.mean_kl) == (want.perplexity, want.mean_kl), "bundle row differs from its checkpoint's"
    assert hf.top1_agreement == 1.0 and abs(hf.mean_kl) < 1e-9, "the float32 HF model is the fp32 baseline"
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"build_config": {}, "pretrained_config": {}}))
    (engine / "rank0.engine").write_bytes(b"\0")
    with pytest.raises(InputError, match="TensorRT engine"):
        evaluate([engine], baseline=ckpts["fp32"], text_file=ckpts["text"], max_tokens=20)


def test_quantize_and_eval_commands(tiny_model_dir, ckpts, tmp_path, capsys):
    pytest.importorskip("modelopt")
    out = tmp_path / "fp8"
    code, stdout, err = run_cli(["quantize", tiny_model_dir, out, "--quant", "fp8", "--kv-cache", "fp8",
                                 "--calib-file", ckpts["text"], "--calib-samples", "2", "--calib-seq-len", "16",
                                 "--dtype", "float32", "--device", "cpu", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["quantization"]["quant_algo"] == "FP8" and summary["quantization"]["kv_cache_quant_algo"] == "FP8"
    assert summary["calibration"]["calib_samples"] == 2 and summary["source"] == str(tiny_model_dir)
    code, stdout, err = run_cli(["eval", out, "--text", ckpts["text"], "--max-tokens", "30", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(stdout)  # baseline found through the provenance: the source model, converted to float32
    assert "converted to float32" in rep["baseline"]["how"] and rep["rows"][0]["kv_cache_quant_algo"] == "FP8"
    assert 0.5 < rep["rows"][0]["top1_agreement"] <= 1.0
    code, _, err = run_cli(["quantize", tiny_model_dir, out, "--quant", "fp8"], capsys)
    assert code != 0 and "exists" in err  # no --force: OUT untouched
    code, _, err = run_cli(["quantize", out, tmp_path / "again", "--quant", "int4_awq"], capsys)
    assert code == InputError.exit_code and "is a TensorRT-LLM checkpoint (FP8)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp8"]
