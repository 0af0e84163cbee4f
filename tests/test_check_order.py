"""Cheap checks first: quantize, eval and generate refuse bad input before calibrating, converting or loading, each
refusal a typed error that names the fix; and the dtype quantize picks for INT4-AWQ from a float32 source."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")

from trt_gemma.cli import main  # noqa: E402
from trt_gemma.checkpoint.convert import convert_checkpoint  # noqa: E402
from trt_gemma.errors import ConfigError, InputError, OutputError  # noqa: E402

TEXT = ("Gemma runs on Jetson and RTX GPUs; the quick brown fox jumps over the lazy dog while TensorRT builds "
        "engines and the server streams tokens. ") * 6


def run_cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


@pytest.fixture
def no_calibration(monkeypatch):
    """The expensive step must not be reached: calibrating fails the test."""
    import trt_gemma.quant.modelopt as qz

    def refuse(*a, **k):
        raise AssertionError("calibration started before the cheap checks")

    monkeypatch.setattr(qz, "calibrate", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("TRT_GEMMA_CACHE", str(c))
    return c


def _entries(cache) -> list:
    d = cache / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


# --- quantize -----------------------------------------------------------------------------------------------------

def test_quantize_nan_weights_names_the_tensor(tiny_model_dir, tmp_path, capsys, no_calibration):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    t = load_file(d / "model.safetensors")
    t["model.layers.1.self_attn.k_proj.weight"][3, 7] = np.nan
    save_file(t, d / "model.safetensors")
    code, _, err = run_cli(["quantize", d, tmp_path / "q", "--quant", "int4_awq", "--device", "cpu"], capsys)
    assert code == InputError.exit_code and "internal error" not in err
    assert "tensor model.layers.1.self_attn.k_proj.weight contains NaN/Inf" in err and "fix:" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_quantize_onto_its_own_model_is_refused_first(tiny_model_dir, tmp_path, capsys, no_calibration):
    d = shutil.copytree(tiny_model_dir, tmp_path / "m")
    before = sorted(p.name for p in d.iterdir())
    for args, why in (([d, d, "--force"], "would replace the model being read"),  # `quantize M M --force`
                      ([d, "--force"], "not written by trt-gemma")):  # OUT forgotten: M becomes OUT
        code, _, err = run_cli(["quantize", *args, "--quant", "fp8"], capsys)
        assert code == OutputError.exit_code and why in err and f"trt-gemma quantize {d} OUT" in err, err
        assert "trt-gemma convert" not in err
    code, _, err = run_cli(["quantize", d.parent / "m", d.parent, "--quant", "fp8", "--force"], capsys)
    assert code == OutputError.exit_code  # OUT above the model
    assert sorted(p.name for p in d.iterdir()) == before


def test_calib_seq_len_beyond_the_context_names_it(tiny_model_dir, tmp_path, capsys, no_calibration):
    code, _, err = run_cli(["quantize", tiny_model_dir, tmp_path / "q", "--quant", "fp8", "--calib-seq-len",
                            "100000"], capsys)
    assert code == ConfigError.exit_code and "max_position_embeddings 256" in err
    assert "--calib-seq-len 256" in err and "GiB" not in err
    assert list(tmp_path.iterdir()) == []


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_int4_awq_from_float32_with_dtype_auto_is_bfloat16(tiny_model_dir, tmp_path, capsys):
    """Also: transformers' "`torch_dtype` is deprecated" (ModelOpt's export reads config.torch_dtype) stays out of
    our output. Its handler writes to the stderr it saw at import, so the test listens on the logger itself, with
    warning_once's memory cleared (making the tiny model already said it once in this process)."""
    pytest.importorskip("modelopt")
    from transformers.utils import logging as hf_logging  # noqa: F401  (installs Logger.warning_once)

    logging.Logger.warning_once.cache_clear()
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    out = tmp_path / "q"
    try:
        code, stdout, err = run_cli(["quantize", tiny_model_dir, out, "--quant", "int4_awq", "--calib-file", calib,
                                     "--calib-samples", "2", "--calib-seq-len", "16", "--device", "cpu", "--json"],
                                    capsys)
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert not [m for m in records.messages if "deprecated" in m], records.messages
    assert code == 0, err
    assert json.loads(stdout)["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "source is float32" in err and "writing bfloat16" in err
    assert "4 forwards in 2 passes, estimated" in err and "thread" in err  # said also with --json (on stderr)


def test_checkpoint_dtype_rule():
    from trt_gemma.quant.modelopt import checkpoint_dtype

    said = []
    assert checkpoint_dtype(None, "float32", "W4A16_AWQ", said.append) == "bfloat16" and said
    assert checkpoint_dtype("float32", "float32", "W4A16_AWQ", said.append) == "float32"  # asked for: kept
    assert checkpoint_dtype(None, "float32", "FP8", said.append) == "float32"
    assert checkpoint_dtype(None, "float16", "W4A16_AWQ", said.append) == "float16"


# --- eval ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("order")
    (d / "text.txt").write_text(TEXT)
    return {"text": d / "text.txt",
            "bf16": convert_checkpoint(tiny_model_dir, d / "bf16", dtype="bfloat16", show_progress=False),
            "int8": convert_checkpoint(tiny_model_dir, d / "int8", dtype="bfloat16", weight_only="int8",
                                       show_progress=False)}


def test_eval_baseline_without_tokenizer_fails_before_converting(tiny_model_dir, ckpts, tmp_path, cache, capsys):
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink()
    code, _, err = run_cli(["eval", ckpts["int8"], "--baseline", base, "--text", ckpts["text"]], capsys)
    assert code == InputError.exit_code and "tokenizer.json not found" in err and "fix:" in err
    assert _entries(cache) == [], "nothing was converted into the cache"


def test_eval_quantized_baseline_is_refused_unless_allowed(tiny_model_dir, ckpts, cache, capsys):
    code, _, err = run_cli(["eval", ckpts["bf16"], "--baseline", ckpts["int8"], "--text", ckpts["text"]], capsys)
    assert code == ConfigError.exit_code and "is quantized (W8A16)" in err and "--allow-quantized-baseline" in err
    code, out, err = run_cli(["eval", ckpts["bf16"], "--baseline", ckpts["int8"], "--text", ckpts["text"],
                              "--max-tokens", "20", "--allow-quantized-baseline", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["baseline"]["how"] == "given"
    assert _entries(cache) == []


def test_eval_of_one_unquantized_checkpoint_is_not_its_own_baseline(ckpts, tmp_path, capsys):
    from trt_gemma.eval import evaluate

    r = evaluate([ckpts["bf16"]], text_file=ckpts["text"], max_tokens=20)
    assert "converted to float32" in r.baseline["how"], r.baseline
    assert r.rows[0].mean_kl > 0, "bf16 vs the float32 source differ; vs itself they would not"
    orphan = shutil.copytree(ckpts["bf16"], tmp_path / "orphan")
    (orphan / "trt_gemma_provenance.json").unlink()
    with pytest.raises(ConfigError, match="compared with itself") as e:
        evaluate([orphan], text_file=ckpts["text"], max_tokens=20)
    assert "--baseline" in e.value.fix


# --- generate -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,match", [(["--max-tokens", "0"], "max_tokens"), (["--seed", "-1"], "--seed -1"),
                                        (["--top-p", "0"], "top_p"), (["--prompt", "caf\udce9"], "UTF-8")])
def test_generate_arguments_are_checked_before_converting(tiny_model_dir, cache, capsys, args, match):
    argv = ["generate", tiny_model_dir] + (args if "--prompt" in args else ["--prompt", "hi"] + args)
    code, _, err = run_cli(argv, capsys)
    assert code == InputError.exit_code and match in err and "fix:" in err and "internal error" not in err, err
    assert _entries(cache) == [], "the HF model was converted before the arguments were checked"
