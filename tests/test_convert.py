"""Layout tests for `convert_checkpoint`, written from docs/tensorrt-llm-contract.md §2-4.

Expected values are computed here from the HF tensors (loaded with safetensors/torch, not with our reader) by the
reference's rules; dtype rounding is torch's. Failures print max and mean differences.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny import TINY, make_tiny_hf_model
from trt_gemma.checkpoint.convert import convert_checkpoint

NQ, NKV, D, H, F, V, L = (TINY[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size",
                                            "intermediate_size", "vocab_size", "num_hidden_layers"))
NORMS = {  # TRT name -> HF name (docs/tensorrt-llm-contract.md §3)
    "input_layernorm": "input_layernorm", "post_layernorm": "post_attention_layernorm",
    "pre_feedforward_layernorm": "pre_feedforward_layernorm", "post_feedforward_layernorm": "post_feedforward_layernorm",
}
MLP = {"fc": "gate_proj", "gate": "up_proj", "proj": "down_proj"}  # GeGLU pitfall: fc <- gate_proj, gate <- up_proj


def expected_names(layers: int = L) -> set[str]:
    names = {"transformer.vocab_embedding.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for n in range(layers):
        p = f"transformer.layers.{n}."
        names |= {p + s + ".weight" for s in ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")}
        names |= {p + s + ".weight" for s in NORMS}
    return names


def hf_tensors(model_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def ckpt(out, rank=0) -> dict[str, torch.Tensor]:
    return load_file(out / f"rank{rank}.safetensors")


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str, atol: float = 0.0) -> None:
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    diff = (got.float() - want.float()).abs()
    assert diff.max().item() <= atol, f"{what}: max abs diff {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def expected_rank(hf: dict, tp: int, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The checkpoint of one rank, built from the reference page's rules with torch ops."""
    def part(t, dim):
        return torch.chunk(t, tp, dim=dim)[rank]

    emb = hf["model.embed_tokens.weight"]
    exp = {"transformer.vocab_embedding.weight": part(emb, 0) if tp > 1 else emb,  # unscaled; split iff tp > 1
           "lm_head.weight": part(emb, 0),  # copy of the tied embedding, split on dim 0
           "transformer.ln_f.weight": hf["model.norm.weight"].float() + 1.0}
    for n in range(L):
        src, dst = f"model.layers.{n}.", f"transformer.layers.{n}."
        q, k, v = (hf[f"{src}self_attn.{x}_proj.weight"] for x in "qkv")
        exp[dst + "attention.qkv.weight"] = torch.cat([part(q, 0), part(k, 0), part(v, 0)], dim=0)
        exp[dst + "attention.dense.weight"] = part(hf[src + "self_attn.o_proj.weight"], 1)
        for trt, h in MLP.items():
            exp[dst + f"mlp.{trt}.weight"] = part(hf[src + f"mlp.{h}.weight"], 1 if trt == "proj" else 0)
        for trt, h in NORMS.items():
            exp[dst + trt + ".weight"] = hf[src + h + ".weight"].float() + 1.0  # (1+w) in float32, then cast
    return {k: v.to(dtype) for k, v in exp.items()}


@pytest.fixture(scope="module")
def fp32_ckpt(tiny_model_dir, tmp_path_factory):
    return convert_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("c") / "fp32", dtype="float32",
                              show_progress=False)


@pytest.fixture(scope="module")
def bf16_sharded_model(tmp_path_factory):
    """A bf16 model saved by transformers in 3 shards with model.safetensors.index.json."""
    return make_tiny_hf_model(tmp_path_factory.mktemp("bf16_sharded"), seed=1, dtype="bfloat16", shards=3)


def test_names_shapes_dtypes_fp32(fp32_ckpt):
    t = ckpt(fp32_ckpt)
    assert set(t) == expected_names()
    assert len(t) == 9 * L + 3  # docs/tensorrt-llm-contract.md §3: tensor count 9L + 3
    shapes = {"attention.qkv": ((NQ + 2 * NKV) * D, H), "attention.dense": (H, NQ * D), "mlp.fc": (F, H),
              "mlp.gate": (F, H), "mlp.proj": (H, F)}
    for n in range(L):
        for s, shape in shapes.items():
            assert tuple(t[f"transformer.layers.{n}.{s}.weight"].shape) == shape, s
        for s in NORMS:
            assert tuple(t[f"transformer.layers.{n}.{s}.weight"].shape) == (H,)
    assert tuple(t["transformer.vocab_embedding.weight"].shape) == (V, H) == tuple(t["lm_head.weight"].shape)
    assert all(v.dtype == torch.float32 for v in t.values())


def test_values_fp32_exact(fp32_ckpt, tiny_model_dir):
    hf, t = hf_tensors(tiny_model_dir), ckpt(fp32_ckpt)
    for name, want in expected_rank(hf, 1, 0, torch.float32).items():
        assert_same(t[name], want, name)


def test_qkv_order_mlp_mapping_and_norm_explicitly(fp32_ckpt, tiny_model_dir):
    """Spelled out once without the helper: q rows first, then k, then v; fc = gate_proj; norm = 1 + w."""
    hf, t = hf_tensors(tiny_model_dir), ckpt(fp32_ckpt)
    qkv = t["transformer.layers.1.attention.qkv.weight"]
    assert torch.equal(qkv[: NQ * D], hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(qkv[NQ * D: NQ * D + NKV * D], hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(qkv[NQ * D + NKV * D:], hf["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(t["transformer.layers.2.mlp.fc.weight"], hf["model.layers.2.mlp.gate_proj.weight"])
    assert torch.equal(t["transformer.layers.2.mlp.gate.weight"], hf["model.layers.2.mlp.up_proj.weight"])
    assert not torch.equal(t["transformer.layers.2.mlp.fc.weight"], t["transformer.layers.2.mlp.gate.weight"])
    w = hf["model.layers.0.post_attention_layernorm.weight"]
    assert w.abs().max() > 0.05  # the tiny model's norms are random, so 1+w really differs from w
    assert torch.equal(t["transformer.layers.0.post_layernorm.weight"], w + 1.0)
    assert torch.equal(t["lm_head.weight"], hf["model.embed_tokens.weight"])  # unscaled copy


def test_config_json_per_reference(fp32_ckpt):
    c = json.loads((fp32_ckpt / "config.json").read_text())
    want = {"architecture": "Gemma2ForCausalLM", "dtype": "float32", "logits_dtype": "float32", "vocab_size": V,
            "hidden_size": H, "num_hidden_layers": L, "num_attention_heads": NQ, "num_key_value_heads": NKV,
            "head_size": D, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": F, "norm_epsilon": 1e-6,
            "position_embedding_type": "rope_gpt_neox", "max_position_embeddings": TINY["max_position_embeddings"],
            "rotary_base": 10000.0, "rotary_scaling": None, "use_parallel_embedding": False,
            "embedding_sharding_dim": 0, "attn_bias": False, "mlp_bias": False, "inter_layernorms": True,
            "query_pre_attn_scalar": TINY["query_pre_attn_scalar"], "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 8.0,
            # ours, namespaced so TRT-LLM (which reads a top-level sliding_window for Gemma 3) never sees them
            "trt_gemma": {"sliding_window": 8,
                          "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}}
    assert {k: c[k] for k in want} == want
    assert c["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1, "cp_size": 1, "gpus_per_node": 8}
    q = c["quantization"]
    assert q["quant_algo"] is None and q["kv_cache_quant_algo"] is None and q["group_size"] == 128
    assert q["exclude_modules"] is None and q["has_zero_point"] is False and q["pre_quant_scale"] is False
    assert set(c) == set(want) | {"mapping", "quantization"}


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_16bit_from_fp32_rounds_like_torch(tiny_model_dir, tmp_path, dtype, torch_dtype):
    out = convert_checkpoint(tiny_model_dir, tmp_path / dtype, dtype=dtype, show_progress=False)
    hf, t = hf_tensors(tiny_model_dir), ckpt(out)
    for name, want in expected_rank(hf, 1, 0, torch_dtype).items():
        assert_same(t[name], want, name)  # round-to-nearest-even both ways: bit-exact
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_bf16_sharded_source_and_auto_dtype(bf16_sharded_model, tmp_path):
    assert len(list(bf16_sharded_model.glob("model-*.safetensors"))) >= 2
    assert (bf16_sharded_model / "model.safetensors.index.json").is_file()
    out = convert_checkpoint(bf16_sharded_model, tmp_path / "auto", dtype=None, show_progress=False)
    hf, t = hf_tensors(bf16_sharded_model), ckpt(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # None keeps the source dtype
    for name, want in expected_rank(hf, 1, 0, torch.bfloat16).items():
        assert_same(t[name], want, name)
    # no transform + same dtype = the bytes are copied unchanged
    assert torch.equal(t["transformer.layers.0.mlp.proj.weight"].view(torch.int16),
                       hf["model.layers.0.mlp.down_proj.weight"].view(torch.int16))


def test_tp2_split_rules(bf16_sharded_model, tmp_path):
    out = convert_checkpoint(bf16_sharded_model, tmp_path / "tp2", tp=2, show_progress=False)
    assert sorted(p.name for p in out.glob("rank*.safetensors")) == ["rank0.safetensors", "rank1.safetensors"]
    hf = hf_tensors(bf16_sharded_model)
    for rank in range(2):
        t = ckpt(out, rank)
        assert set(t) == expected_names()
        for name, want in expected_rank(hf, 2, rank, torch.bfloat16).items():
            assert_same(t[name], want, f"rank{rank} {name}")
        assert tuple(t["transformer.layers.0.attention.qkv.weight"].shape) == ((NQ + 2 * NKV) * D // 2, H)
        assert tuple(t["transformer.layers.0.attention.dense.weight"].shape) == (H, NQ * D // 2)
    c = json.loads((out / "config.json").read_text())
    assert c["mapping"]["tp_size"] == 2 and c["mapping"]["world_size"] == 2 and c["mapping"]["pp_size"] == 1
    assert c["use_parallel_embedding"] is True and c["embedding_sharding_dim"] == 0


def test_tp2_ranks_merge_back_to_tp1(bf16_sharded_model, tmp_path):
    """Undoing the split rules on the rank files gives the TP=1 checkpoint exactly."""
    one = ckpt(convert_checkpoint(bf16_sharded_model, tmp_path / "tp1", show_progress=False))
    two = convert_checkpoint(bf16_sharded_model, tmp_path / "tp2", tp=2, show_progress=False)
    r0, r1 = ckpt(two, 0), ckpt(two, 1)
    sizes = [NQ * D // 2, NKV * D // 2, NKV * D // 2]
    for name, full in one.items():
        if name.endswith("attention.qkv.weight"):
            parts = [torch.split(r, sizes, dim=0) for r in (r0[name], r1[name])]
            merged = torch.cat([torch.cat([parts[0][i], parts[1][i]]) for i in range(3)])
        elif name.endswith(("attention.dense.weight", "mlp.proj.weight")):
            merged = torch.cat([r0[name], r1[name]], dim=1)
        elif r0[name].dim() == 2:
            merged = torch.cat([r0[name], r1[name]], dim=0)
        else:
            assert torch.equal(r0[name], r1[name]), f"{name} must be replicated"
            merged = r0[name]
        assert_same(merged, full, name)


@pytest.mark.parametrize("wo,algo", [("int8", "W8A16"), ("int4", "W4A16")])
def test_weight_only_blocks(tiny_model_dir, tmp_path, wo, algo):
    out = convert_checkpoint(tiny_model_dir, tmp_path / wo, weight_only=wo, show_progress=False)
    q = json.loads((out / "config.json").read_text())["quantization"]
    # null, as TensorRT-LLM's Gemma converter writes it: its defaults exclude *lm_head and *vocab_embedding
    # (tests/test_trtllm_contract.py pins why an explicit ["lm_head"] would not load)
    assert q["quant_algo"] == algo and q["exclude_modules"] is None and q["kv_cache_quant_algo"] is None
    t, hf = ckpt(out), hf_tensors(tiny_model_dir)
    for name, want in expected_rank(hf, 1, 0, torch.bfloat16).items():  # weights stay in the model dtype
        assert_same(t[name], want, name)


def test_hub_2024_config_dialect(tiny_model_dir, tmp_path):
    """The Hub's Gemma 2 files: rope_theta, torch_dtype, hidden_act + hidden_activation, no layer_types, no
    rope_parameters, no dtype. Even layers slide."""
    src = tmp_path / "hub2024"
    shutil.copytree(tiny_model_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    for k in ("layer_types", "rope_parameters", "dtype"):
        cfg.pop(k, None)
    cfg.update(rope_theta=20000.0, torch_dtype="float32", hidden_act="gelu_pytorch_tanh",
               hidden_activation="gelu_pytorch_tanh", num_hidden_layers=L)
    (src / "config.json").write_text(json.dumps(cfg))
    out = convert_checkpoint(src, tmp_path / "out", dtype=None, show_progress=False)
    c = json.loads((out / "config.json").read_text())
    assert c["rotary_base"] == 20000.0 and c["dtype"] == "float32" and c["hidden_act"] == "gelu_pytorch_tanh"
    assert c["trt_gemma"]["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    for name, want in expected_rank(hf_tensors(src), 1, 0, torch.float32).items():
        assert_same(ckpt(out)[name], want, name)


def test_window_keys_read_back_namespaced_and_legacy(fp32_ckpt):
    """The reference runtime's reader finds our window keys under "trt_gemma", and still at the top level where
    checkpoints written before the namespacing put them; without either, every layer is global (TRT-LLM's view)."""
    from trt_gemma.reference import CheckpointConfig

    c = json.loads((fp32_ckpt / "config.json").read_text())
    legacy = {k: v for k, v in c.items() if k != "trt_gemma"} | c["trt_gemma"]
    bare = {k: v for k, v in c.items() if k != "trt_gemma"}
    for d, window in ((c, 8), (legacy, 8), (bare, None)):
        cfg = CheckpointConfig.from_dict(d)
        assert cfg.sliding_window == window
        assert [cfg.is_sliding(i) for i in range(L)] == ([True, False, True] if window else [False] * L)


def test_tokenizer_files_copied(fp32_ckpt, tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (fp32_ckpt / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_provenance(fp32_ckpt, tiny_model_dir):
    p = json.loads((fp32_ckpt / "trt_gemma_provenance.json").read_text())
    assert p["source"] == str(tiny_model_dir)
    files = {i["file"]: i["sha256"] for i in p["inputs"]}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert files[name] == hashlib.sha256((tiny_model_dir / name).read_bytes()).hexdigest(), name
    assert p["options"] == {"dtype": "float32", "tp": 1, "weight_only": None, "allow_nonfinite": False,
                            "force": False}
    assert set(p["versions"]) >= {"trt-gemma", "numpy", "safetensors", "python"}
    assert p["versions"]["numpy"] == np.__version__
    assert p["created_utc"].endswith("+00:00") and p["tensors_per_rank"] == 9 * L + 3


def test_every_input_tensor_used_exactly_once(tiny_model_dir, fp32_ckpt):
    """Each HF tensor's values appear in exactly one checkpoint position (the tied embedding also in lm_head)."""
    hf, t = hf_tensors(tiny_model_dir), ckpt(fp32_ckpt)
    flat = {n: v.flatten() for n, v in t.items()}
    for name, w in hf.items():
        want = w.flatten() + (1.0 if "norm" in name else 0.0)
        hits = [n for n, v in flat.items() if v.numel() >= want.numel() and
                any(torch.equal(v[i:i + want.numel()], want) for i in range(0, v.numel() - want.numel() + 1,
                                                                              want.numel()))]
        expect = 2 if name == "model.embed_tokens.weight" else 1
        assert len(hits) == expect, f"{name} found in {hits}"


def test_cli_convert_json(tiny_model_dir, tmp_path, capsys):
    from trt_gemma.cli import main

    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tiny_model_dir), str(out), "--dtype", "float16", "--tp", "2", "--json"])
    assert e.value.code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["dtype"] == "float16" and s["tp"] == 2 and s["tensors_per_rank"] == 9 * L + 3
    assert (out / "rank1.safetensors").is_file()
