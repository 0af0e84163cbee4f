"""trt_gemma.checkpoint.hf: resolving MODEL arguments, validating a model dir, lazy reads."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from trt_gemma.checkpoint.config import FULL, SLIDING
from trt_gemma.errors import InputError, UnsupportedModelError
from trt_gemma.checkpoint.hf import HFModel, TensorExpect, resolve_model


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_resolve_local_dir_and_bad_paths(tiny_model_dir, tmp_path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(InputError, match="is a file"):
        resolve_model(str(tiny_model_dir / "config.json"))
    with pytest.raises(InputError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_resolve_default_is_embedded_model():
    from trt_gemma.assets import default_model_dir

    assert resolve_model(None) == resolve_model("default") == default_model_dir()


def test_resolve_hub_id_from_cache_and_offline_miss(tiny_model_dir, tmp_path):
    """Offline mode: a cached snapshot resolves to its folder; an uncached id is an InputError with the fix."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-gemma"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    shutil.copytree(tiny_model_dir, repo / "snapshots" / sha)
    code = ("import json; from trt_gemma.checkpoint.hf import resolve_model\n"
            "out = {'hit': str(resolve_model('acme/tiny-gemma'))}\n"
            "try:\n    resolve_model('acme/not-cached')\n"
            "except Exception as e:\n    out['miss'] = [type(e).__name__, e.message, e.fix]\n"
            "print(json.dumps(out))")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "home"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["hit"] == str(repo / "snapshots" / sha)
    kind, message, fix = out["miss"]
    assert kind == "InputError" and "acme/not-cached" in message and "HF_HUB_OFFLINE" in fix


def test_open_tiny(tiny_model_dir):
    m = HFModel.open(tiny_model_dir)
    assert m.config.num_hidden_layers == 3 and m.config.head_dim == 32
    assert len(m.tensors) == 1 + 11 * 3 + 1  # embedding, 11 per layer, final norm (tied: no lm_head)
    assert m.source_dtype == "float32" and m.index_file is None
    assert {f.name for f in m.tokenizer_files} == {"tokenizer.json", "tokenizer_config.json",
                                                   "special_tokens_map.json"}
    assert {f.name for f in m.input_files()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_lazy_reads_match_safetensors(tiny_model_dir):
    m = HFModel.open(tiny_model_dir)
    ref = load_file(tiny_model_dir / "model.safetensors")
    name = "model.embed_tokens.weight"
    np.testing.assert_array_equal(m.read(name), ref[name])
    np.testing.assert_array_equal(m.read(name, rows=slice(100, 137)), ref[name][100:137])
    np.testing.assert_array_equal(m.read_f32("model.norm.weight"), ref["model.norm.weight"])


def test_open_sharded_bf16(tmp_path):
    from tiny import make_tiny_hf_model

    d = make_tiny_hf_model(tmp_path / "m", dtype="bfloat16", shards=3)
    m = HFModel.open(d)
    assert m.index_file is not None and len(m.weight_files) >= 2 and m.source_dtype == "bfloat16"
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n: f.name for n, (f, _) in m.tensors.items()} == index
    assert m.read("model.layers.0.self_attn.q_proj.weight").dtype == np.uint16  # bf16 as bit patterns


def test_hub_2024_dialect_config(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    for k in ("layer_types", "rope_parameters", "dtype"):
        cfg.pop(k)
    cfg.update(rope_theta=5000.0, torch_dtype="float32", hidden_act="gelu_pytorch_tanh")
    (d / "config.json").write_text(json.dumps(cfg))
    m = HFModel.open(d)
    assert m.config.rope_theta == 5000.0 and m.config.layer_types == (SLIDING, FULL, SLIDING)


def test_wrong_architecture_lists_supported(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*supported: Gemma2ForCausalLM"):
        HFModel.open(d)


def _rewrite(d, edit):
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def test_missing_extra_and_non_float_tensors_are_named(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(InputError, match=r"missing: model\.layers\.2\.mlp\.up_proj\.weight"):
        HFModel.open(d)
    d = copy_model(tiny_model_dir, tmp_path / "extra")
    _rewrite(d, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(32, np.float32)}))
    with pytest.raises(InputError, match=r"unexpected tensor.*q_norm"):
        HFModel.open(d)
    d = copy_model(tiny_model_dir, tmp_path / "int")
    _rewrite(d, lambda t: t.update({"model.norm.weight": np.ones(256, np.int32)}))
    with pytest.raises(InputError, match=r"model\.norm\.weight has dtype I32"):
        HFModel.open(d)


def test_untied_lm_head_is_refused_when_config_ties(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir, tmp_path / "m")
    _rewrite(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    with pytest.raises(InputError, match="lm_head.weight"):
        HFModel.open(d)


def test_custom_expectations(tiny_model_dir):
    """The validation takes any expectation table (quantized formats bring their own)."""
    m = HFModel.open(tiny_model_dir)
    exp = {n: TensorExpect(i.shape) for n, (_, i) in m.tensors.items()}
    m.check_tensors(exp)
    exp["model.norm.weight"] = TensorExpect((256,), ("U8",))
    with pytest.raises(InputError, match="expected one of U8"):
        m.check_tensors(exp)


@pytest.mark.parametrize("extra", [{}, {"hidden_act": "gelu"}, {"sliding_window": None},
                                   {"query_pre_attn_scalar": 144, "head_dim": 128}])
def test_absent_and_odd_keys_read_like_transformers(extra):
    """Keys a config.json may lack (or carry only in the ignored `hidden_act`) take transformers' Gemma2Config
    values: the oracle the reference runtime is checked against."""
    from transformers import Gemma2Config

    from trt_gemma.checkpoint.config import ModelConfig

    d = dict(architectures=["Gemma2ForCausalLM"], vocab_size=384, hidden_size=256, intermediate_size=512,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    d.update(extra)
    ours, hf = ModelConfig.from_dict(d), Gemma2Config.from_dict(d)
    for f in ("query_pre_attn_scalar", "sliding_window", "hidden_activation", "rms_norm_eps",
              "attn_logit_softcapping", "final_logit_softcapping", "max_position_embeddings", "head_dim"):
        assert getattr(ours, f) == getattr(hf, f), f"{f}: ours {getattr(ours, f)!r}, transformers {getattr(hf, f)!r}"
    assert list(ours.layer_types) == list(hf.layer_types)
    assert ours.rope_theta == hf.rope_parameters["rope_theta"]


@pytest.mark.parametrize("index", ['{"weight_map": ["a"]}', '{"weight_map": {"model.norm.weight": 3}}',
                                   '{"metadata": {}}', "not json", "[1]"])
def test_malformed_index_is_named(tmp_path, index):
    from tiny import make_tiny_hf_model

    d = make_tiny_hf_model(tmp_path / "m", shards=2)
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(InputError, match=r"model\.safetensors\.index\.json is not a valid safetensors index") as e:
        HFModel.open(d)
    assert "re-download" in e.value.fix


@pytest.mark.parametrize("bad", [{"vocab_size": "big"}, {"eos_token_id": []}, {"rope_parameters": "x"},
                                 {"sliding_window": [8]}])
def test_config_field_of_the_wrong_type_is_a_config_error(tiny_model_dir, bad):
    from trt_gemma.checkpoint.config import ModelConfig
    from trt_gemma.errors import ConfigError

    d = json.loads((tiny_model_dir / "config.json").read_text()) | bad
    with pytest.raises(ConfigError, match="wrong type") as e:
        ModelConfig.from_dict(d)
    assert e.value.fix


def test_malformed_safetensors_header_entries_are_named(tmp_path):
    import struct

    from trt_gemma.checkpoint.st_io import read_header

    for i, entry in enumerate([{"dtype": "F32", "shape": [2], "data_offsets": ["0", "x"]},
                               {"dtype": "F32", "shape": [-2, -1], "data_offsets": [0, 8]}]):
        f = tmp_path / f"bad{i}.safetensors"
        raw = json.dumps({"w": entry}).encode()
        f.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
        with pytest.raises(InputError, match=f"bad{i}.safetensors: tensor 'w'"):
            read_header(f)
