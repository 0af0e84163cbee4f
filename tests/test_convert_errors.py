"""Bad input and bad output paths: a typed error naming the file/tensor with a fix, exit code != 0 through the CLI,
OUT untouched (absent, or unchanged), and no temp dirs left beside it."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tiny import make_tiny_hf_model
from trt_gemma.cli import main
from trt_gemma.checkpoint.convert import FLOAT_CODEC, check_complete, convert_checkpoint, plan
from trt_gemma.errors import ConfigError, InputError, OutputError, UnsupportedModelError


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("sharded"), shards=3)


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def assert_failed_cleanly(model, out, exc, match, capsys, **kw):
    """The stage raises `exc` matching `match`; the CLI exits != 0 printing error and fix; OUT stays as it was and
    nothing else appears beside it."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in parent.iterdir()}
    snapshot = sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else None
    with pytest.raises(exc, match=match) as e:
        convert_checkpoint(model, out, show_progress=False, **kw)
    assert e.value.fix, "every user-facing error carries a fix"
    args = ["convert", model, out] + (["--force"] if kw.get("force") else [])
    code, err = run_cli(args, capsys)
    assert code != 0 and "error:" in err and "fix:" in err, err
    after = {p.name: (p.read_bytes() if p.is_file() else None) for p in parent.iterdir()}
    assert after == before, f"files beside OUT changed: {set(after) ^ set(before)}"
    if snapshot is None:
        assert not out.exists()
    else:
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == snapshot
    return e.value


def test_truncated_safetensors(tiny_model_dir, tmp_path, capsys):
    d = copy(tiny_model_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError, r"model\.safetensors.*truncated", capsys)


def test_missing_shard(sharded_dir, tmp_path, capsys):
    d = copy(sharded_dir, tmp_path / "m")
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError, victim.name, capsys)


def test_index_naming_a_missing_file(sharded_dir, tmp_path, capsys):
    d = copy(sharded_dir, tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError, "model-00009-of-00009.safetensors", capsys)


def test_tensor_in_index_missing_from_shard(sharded_dir, tmp_path, capsys):
    d = copy(sharded_dir, tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"]["model.norm.weight"]
    idx["weight_map"]["model.layers.0.self_attn.extra.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError, r"self_attn\.extra\.weight", capsys)


def test_shard_not_in_index(sharded_dir, tmp_path, capsys):
    d = copy(sharded_dir, tmp_path / "m")
    save_file({"x": np.zeros(4, np.float32)}, d / "model-extra.safetensors")
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError, "model-extra.safetensors not listed", capsys)


def test_wrong_architecture(tiny_model_dir, tmp_path, capsys):
    d = copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", UnsupportedModelError, "Gemma2ForCausalLM", capsys)


def test_shape_mismatch(tiny_model_dir, tmp_path, capsys):
    d = copy(tiny_model_dir, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.layers.1.mlp.down_proj.weight"] = np.zeros((256, 380), np.float32)
    save_file(t, d / "model.safetensors")
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError,
                          r"down_proj\.weight has shape \[256, 380\].*\[256, 384\]", capsys)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_weights(tiny_model_dir, tmp_path, capsys, bad):
    d = copy(tiny_model_dir, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.layers.1.self_attn.k_proj.weight"][3, 7] = bad
    save_file(t, d / "model.safetensors")
    err = assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError,
                                r"model\.layers\.1\.self_attn\.k_proj\.weight contains NaN/Inf", capsys)
    assert "--allow-nonfinite" in err.fix
    out = convert_checkpoint(d, tmp_path / "ok", allow_nonfinite=True, show_progress=False)
    prov = json.loads((out / "trt_gemma_provenance.json").read_text())
    assert prov["nonfinite_values"] == {"model.layers.1.self_attn.k_proj.weight": 1}


def test_nonfinite_counts_each_source_value_once(tiny_model_dir, tmp_path):
    """The embedding is read twice (tied lm_head copy), a norm once per TP rank: each bad value still counts once."""
    d = copy(tiny_model_dir, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.embed_tokens.weight"][5, :3] = np.nan
    t["model.norm.weight"][0] = np.inf
    save_file(t, d / "model.safetensors")
    out = convert_checkpoint(d, tmp_path / "ok", tp=2, allow_nonfinite=True, show_progress=False)
    prov = json.loads((out / "trt_gemma_provenance.json").read_text())
    assert prov["nonfinite_values"] == {"model.embed_tokens.weight": 3, "model.norm.weight": 1}


def test_float16_overflow_is_named(tiny_model_dir, tmp_path, capsys):
    d = copy(tiny_model_dir, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # finite in float32, Inf in float16
    save_file(t, d / "model.safetensors")
    with pytest.raises(InputError, match=r"up_proj\.weight overflows F16") as e:
        convert_checkpoint(d, tmp_path / "out", dtype="float16", show_progress=False)
    assert "bfloat16" in e.value.fix and not (tmp_path / "out").exists()


def test_unwritable_out_parent_is_a_file(tiny_model_dir, tmp_path, capsys):
    """Tests run as root, which ignores permission bits: make OUT's parent a regular file instead."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker / "ckpt"
    with pytest.raises(OutputError) as e:
        convert_checkpoint(tiny_model_dir, out, show_progress=False)
    assert str(blocker) in e.value.message and e.value.fix
    code, err = run_cli(["convert", tiny_model_dir, out], capsys)
    assert code == OutputError.exit_code != 0 and "error:" in err
    assert blocker.read_text() == "not a directory" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_existing_out_without_force(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = assert_failed_cleanly(tiny_model_dir, out, OutputError, "already exists", capsys)
    assert str(out) in err.message and "--force" in err.fix
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_conversion_with_force_keeps_old_out(tiny_model_dir, tmp_path, capsys):
    d = copy(tiny_model_dir, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.norm.weight"][0] = np.nan  # the last tensor: fails after most of the output was written
    save_file(t, d / "model.safetensors")
    out = convert_checkpoint(tiny_model_dir, tmp_path / "out" / "ckpt", show_progress=False)  # ours: replaceable
    (out / "keep.txt").write_text("old checkpoint")
    assert_failed_cleanly(d, out, InputError, r"model\.norm\.weight", capsys, force=True)
    assert (out / "keep.txt").read_text() == "old checkpoint"


def test_force_replaces_our_own_output_or_an_empty_dir(tiny_model_dir, tmp_path):
    out = convert_checkpoint(tiny_model_dir, tmp_path / "ckpt", show_progress=False)
    (out / "old.txt").write_text("x")
    convert_checkpoint(tiny_model_dir, out, force=True, show_progress=False)
    assert not (out / "old.txt").exists() and (out / "rank0.safetensors").is_file()
    (tmp_path / "empty").mkdir()
    convert_checkpoint(tiny_model_dir, tmp_path / "empty", force=True, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty"]


def test_bad_options(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="num_key_value_heads = 2 does not divide by 4"):
        convert_checkpoint(tiny_model_dir, tmp_path / "a", tp=4, show_progress=False)
    with pytest.raises(ConfigError, match="--dtype 'int8'"):
        convert_checkpoint(tiny_model_dir, tmp_path / "b", dtype="int8", show_progress=False)
    with pytest.raises(ConfigError, match="16-bit"):
        convert_checkpoint(tiny_model_dir, tmp_path / "c", dtype="float32", weight_only="int8", show_progress=False)
    code, err = run_cli(["convert", tiny_model_dir, tmp_path / "d", "--tp", "3"], capsys)
    assert code == ConfigError.exit_code and "does not divide by 3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_quantized_source_is_refused(tiny_model_dir, tmp_path):
    d = copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "W4A16_AWQ"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        convert_checkpoint(d, tmp_path / "out", show_progress=False)


def test_completeness_check_names_tensors(tiny_model_dir):
    """The mapping check itself: unmapped, missing and doubly used source names are reported by name."""
    from trt_gemma.checkpoint.hf import HFModel

    m = HFModel.open(tiny_model_dir)
    jobs = plan(m.config)
    check_complete(jobs, FLOAT_CODEC, m.tensors)
    with pytest.raises(InputError, match=r"not mapped.*model\.layers\.0\.mlp\.extra\.weight"):
        check_complete(jobs, FLOAT_CODEC, list(m.tensors) + ["model.layers.0.mlp.extra.weight"])
    with pytest.raises(InputError, match=r"missing: model\.norm\.weight"):
        check_complete(jobs, FLOAT_CODEC, [n for n in m.tensors if n != "model.norm.weight"])
    with pytest.raises(InputError, match=r"more than once: model\.layers\.0\.mlp\.up_proj\.weight"):
        check_complete(jobs + [jobs[7]], FLOAT_CODEC, m.tensors)


def test_cli_model_is_optional_and_at_most_two_paths(tmp_path, capsys):
    """`convert OUT` converts the embedded default model; three paths is a usage error, not a traceback."""
    import json

    from trt_gemma.assets import default_model_dir

    code, _ = run_cli(["convert", tmp_path / "ck", "--dtype", "float32"], capsys)
    assert code == 0
    prov = json.loads((tmp_path / "ck" / "trt_gemma_provenance.json").read_text())
    hf_cfg = json.loads((default_model_dir() / "config.json").read_text())
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["vocab_size"] == hf_cfg["vocab_size"]
    assert prov["inputs"], "provenance lists the embedded model's files"
    code, err = run_cli(["convert", "a", "b", "c"], capsys)
    assert code != 0 and "[MODEL] OUT" in err and "Traceback" not in err


@pytest.mark.parametrize("where", ["model", "parent"])
def test_out_over_the_source_is_refused_even_with_force(tiny_model_dir, tmp_path, capsys, where):
    """--force replaces OUT wholesale: OUT = the model dir (or a dir above it) would delete the model."""
    d = copy(tiny_model_dir, tmp_path / "src" / "m")
    out = d if where == "model" else d.parent
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(OutputError, match="would replace the model|not written by trt-gemma") as e:
        convert_checkpoint(d, out, force=True, show_progress=False)
    assert e.value.fix
    code, err = run_cli(["convert", d, out, "--force"], capsys)
    assert code == OutputError.exit_code and "would replace the model" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_force_does_not_replace_a_hf_model_dir(tiny_model_dir, tmp_path, capsys):
    """`convert MODEL --force` (OUT forgotten: MODEL becomes OUT, the embedded model the source) keeps MODEL."""
    d = copy(tiny_model_dir, tmp_path / "m")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    code, err = run_cli(["convert", d, "--force"], capsys)
    assert code == OutputError.exit_code and "not written by trt-gemma" in err
    assert f"fix: pass both paths: `trt-gemma convert {d} OUT`" in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_unreadable_weight_file_is_an_input_error(tiny_model_dir, tmp_path, capsys):
    """A directory where a shard should be (open() fails with an OSError): typed error naming it, not a crash."""
    d = copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    assert_failed_cleanly(d, tmp_path / "out" / "ckpt", InputError, r"cannot read .*model\.safetensors", capsys)


def test_input_vanishing_mid_conversion_is_an_input_error(tiny_model_dir, tmp_path):
    """A tokenizer file deleted after validation: the copy (or the hashing) fails on it; typed error, no OUT."""
    from trt_gemma.checkpoint.hf import HFModel

    d = copy(tiny_model_dir, tmp_path / "m")
    hf = HFModel.open(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(InputError, match=r"cannot read .*tokenizer\.json"):
        convert_checkpoint(hf, tmp_path / "out", show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
