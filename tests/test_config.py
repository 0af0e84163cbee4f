"""Config values, not only types: every numeric field's range is checked where a config is read (HF config.json and
TensorRT-LLM checkpoint config.json), once, for every command. Out-of-range values used to convert with exit 0 and
then produce NaN logits or only pad tokens."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import typing

import pytest

from trt_gemma.cli import main
from trt_gemma.checkpoint.config import RANGES, ModelConfig
from trt_gemma.errors import ConfigError

NAN, INF = float("nan"), float("inf")
BAD = [("rms_norm_eps", NAN), ("rms_norm_eps", INF), ("rms_norm_eps", -1e-6), ("rms_norm_eps", 0.0),
       ("rms_norm_eps", 2.0), ("rope_theta", 0.0), ("rope_theta", -10000.0), ("rope_theta", INF),
       ("attn_logit_softcapping", 0.0), ("final_logit_softcapping", 0.0), ("final_logit_softcapping", -30.0),
       ("attn_logit_softcapping", NAN), ("sliding_window", 0), ("sliding_window", -4096),
       ("query_pre_attn_scalar", 0), ("query_pre_attn_scalar", -256), ("query_pre_attn_scalar", NAN),
       ("vocab_size", 0), ("hidden_size", -256), ("head_dim", 0), ("max_position_embeddings", 0),
       ("intermediate_size", 0), ("bos_token_id", 384), ("pad_token_id", -1), ("eos_token_id", 999)]


def tiny_dict(tiny_model_dir, **values) -> dict:
    """The tiny model's config.json with `values` set (rope_theta in both dialects' places)."""
    d = json.loads((tiny_model_dir / "config.json").read_text()) | values
    if "rope_theta" in values and isinstance(d.get("rope_parameters"), dict):
        d["rope_parameters"] = d["rope_parameters"] | {"rope_theta": values["rope_theta"]}
    return d


@pytest.mark.parametrize("field,value", BAD, ids=[f"{k}={v}" for k, v in BAD])
def test_out_of_range_values_are_named(tiny_model_dir, field, value):
    d = tiny_dict(tiny_model_dir, **{field: value})
    with pytest.raises(ConfigError, match=rf"{field} = .* must be") as e:
        ModelConfig.from_dict(d, source="m/config.json")
    assert "m/config.json" in e.value.message and e.value.fix


@pytest.mark.parametrize("field,value", [("num_hidden_layers", 2.5), ("vocab_size", True), ("sliding_window", 8.5)])
def test_integers_are_not_silently_truncated(tiny_model_dir, field, value):
    with pytest.raises(ConfigError, match="wrong type"):
        ModelConfig.from_dict(tiny_dict(tiny_model_dir) | {field: value})


def test_null_turns_optional_features_off(tiny_model_dir):
    cfg = ModelConfig.from_dict(tiny_dict(tiny_model_dir) | {"attn_logit_softcapping": None,
                                                              "final_logit_softcapping": None,
                                                              "sliding_window": None})
    assert cfg.attn_logit_softcapping is None and cfg.sliding_window is None and not cfg.is_sliding(0)
    with pytest.raises(ConfigError, match="rms_norm_eps is null"):  # not optional
        from trt_gemma.checkpoint.config import check_ranges

        check_ranges({"rms_norm_eps": None}, "x", fix="f")


def test_every_numeric_field_has_a_range():
    hints = typing.get_type_hints(ModelConfig)
    numeric = {f.name for f in dataclasses.fields(ModelConfig)
               if any(t in (int, float) for t in typing.get_args(hints[f.name]) or (hints[f.name],))}
    assert numeric - set(RANGES) == set(), "a numeric ModelConfig field without a RANGES entry"
    assert set(RANGES) <= numeric


@pytest.mark.parametrize("field,value", [("rms_norm_eps", NAN), ("rope_theta", 0.0), ("final_logit_softcapping", 0.0),
                                         ("sliding_window", 0)])
def test_commands_refuse_before_writing(tiny_model_dir, tmp_path, capsys, field, value):
    """convert and plan read the same check (hf.py / plan.py -> ModelConfig.from_file): exit 2, nothing written."""
    m = tmp_path / "m"
    shutil.copytree(tiny_model_dir, m)
    (m / "config.json").write_text(json.dumps(tiny_dict(tiny_model_dir, **{field: value})))
    for args in (["convert", m, tmp_path / "out"], ["plan", "--model", m, "--target", "rtx-4090"]):
        with pytest.raises(SystemExit) as e:
            main([str(a) for a in args])
        err = capsys.readouterr().err
        assert e.value.code == ConfigError.exit_code and field in err and "fix:" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("key,value", [("norm_epsilon", NAN), ("rotary_base", 0.0), ("attn_logit_softcapping", 0.0),
                                       ("query_pre_attn_scalar", -1.0)])
def test_checkpoint_config_ranges(tiny_model_dir, tmp_path, capsys, key, value):
    """A TensorRT-LLM checkpoint (made elsewhere, or edited) is read by generate/serve/eval: same ranges."""
    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.reference.checkpoint import CheckpointConfig

    ck = convert_checkpoint(tiny_model_dir, tmp_path / "ck", show_progress=False)
    d = json.loads((ck / "config.json").read_text()) | {key: value}
    assert not (isinstance(value, float) and math.isnan(value)) or json.dumps(value) == "NaN"
    (ck / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"{key} = .* must be"):
        CheckpointConfig.from_file(ck / "config.json")
    with pytest.raises(SystemExit) as e:
        main(["generate", str(ck), "--prompt", "hi"])
    assert e.value.code == ConfigError.exit_code and key in capsys.readouterr().err
