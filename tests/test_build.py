"""`trt-gemma build` / `inspect` on this CPU host: the bundle flow end to end, the guard paths, fit refusals.

TensorRT-LLM cannot run here, so these tests check everything up to the compile: the bundle's checkpoint (run by the
numpy reference), its recipe/plan/quality/manifest, the printed on-device commands (parsed back and compared with
trtllm_flags), and that nothing imports tensorrt_llm (a poison package on sys.path proves it). GPU tests at the
bottom compile and run a real engine and are skipped here with the reason.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from trt_gemma import build as B
from trt_gemma.detect import Detection
from trt_gemma.errors import ConfigError, DependencyError, FitError, OutputError
from trt_gemma.fsutil import sha256_file
from trt_gemma.manifest import MANIFEST, UNAVAILABLE, inspect_path, read_manifest
from trt_gemma.recipes import load_recipe
from trt_gemma.trtllm_flags import trtllm_build_argv

NO_GPU = Detection("none", why="test host without NVIDIA GPU")
FAST_CALIB = ["calib_size=4", "calib_max_seq_length=64"]  # seconds, not minutes, on 2 CPU cores


def _host(name: str, sm: int, gib: int) -> Detection:
    """A detected host as trt_gemma.detect reports one (detect() takes its inputs from the machine; tests inject)."""
    return Detection("dgpu", name=name, sm=sm, memory_bytes=gib * 2**30, target=None, why="test host")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The embedded default model when it has landed, else the tiny random model."""
    try:
        from trt_gemma.assets import default_model_dir

        path = Path(default_model_dir())
        if (path / "config.json").is_file():
            return path
    except (ImportError, AttributeError, FileNotFoundError):
        pass
    from tiny import make_tiny_hf_model

    return make_tiny_hf_model(tmp_path_factory.mktemp("tiny_hf"))


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """`trt-gemma ARGS` through the real entry point (typed errors -> exit codes): (code, stdout, stderr)."""
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def _ref_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    from trt_gemma.reference import ReferenceModel

    return ReferenceModel.load(ckpt).forward(np.array([ids]), None)


def _check_layout(bundle: Path, quality: bool = True) -> dict:
    names = {p.name for p in bundle.iterdir()}
    want = {"checkpoint", "recipe.toml", "plan.json", MANIFEST} | ({"quality.json", "quality.md"} if quality else set())
    assert want <= names, f"bundle misses {sorted(want - names)}"
    assert not any(n.startswith(".") for n in names), f"temp leftovers in the bundle: {sorted(names)}"
    ckpt = bundle / "checkpoint"
    for f in ("config.json", "rank0.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / f).is_file(), f"checkpoint/{f} missing"
    return read_manifest(bundle)


def _check_manifest(m: dict, model_dir: Path, target: str, quant: str) -> None:
    assert m["kind"] == "bundle" and m["target"]["name"] == target and m["recipe"]["quant"] == quant
    for f in ("config.json", "model.safetensors"):
        assert m["model"]["inputs_sha256"][f] == sha256_file(model_dir / f), f"input hash of {f}"
    tools = m["tools"]
    assert set(tools) >= {"trt_gemma", "tensorrt_llm", "tensorrt", "cuda", "driver"}
    assert tools["tensorrt_llm"] == UNAVAILABLE and tools["driver"] == UNAVAILABLE  # this host has neither
    assert m["engine"]["status"] == "not compiled" and m["engine"]["gpu"] == "not compiled"
    assert m["plan"]["verdict"] in ("fits", "tight")


def _check_printed_commands(output: str, bundle: Path) -> None:
    """The on-device instructions: our compile command and a raw trtllm-build argv equal to trtllm_flags'."""
    lines = [ln.strip() for ln in output.splitlines()]
    assert f"trt-gemma build --from-bundle {bundle}" in lines, output
    raw = [ln for ln in lines if ln.startswith("trtllm-build ")]
    assert len(raw) == 1, output
    recipe = load_recipe(read_manifest(bundle)["target"]["name"], bundle / "recipe.toml")
    assert shlex.split(raw[0]) == trtllm_build_argv(recipe, bundle / "checkpoint", bundle / "engine")
    assert f"trt-gemma serve {bundle / 'engine'}" in lines


# --- float / weight-only bundles (the converter path) ------------------------------------------------------------

def test_rtx_bf16_bundle_via_cli(model_dir, tmp_path, capsys):
    """rtx-a6000's recipe is bf16: converter path, quality table, printed commands, exit 0."""
    out = tmp_path / "a6000"
    code, stdout, stderr = run_cli(["build", "--model", model_dir, "--target", "rtx-a6000", "--out", out], capsys)
    assert code == 0, stdout + stderr
    m = _check_layout(out)
    _check_manifest(m, model_dir, "rtx-a6000", "bfloat16")
    assert "not compiled here: tensorrt_llm is not installed" in stdout
    _check_printed_commands(stdout, out)
    cfg = json.loads((out / "checkpoint" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and (cfg.get("quantization") or {}).get("quant_algo") is None
    rows = json.loads((out / "quality.json").read_text())["rows"]
    assert rows and all(np.isfinite(r["perplexity"]) for r in rows)


def test_weight_only_bundle_and_default_out(model_dir, tmp_path, monkeypatch):
    """t4 (Turing: no bf16) -> int8 weight-only in fp16; default --out is ./bundles/<model>-<target>-<quant>."""
    monkeypatch.chdir(tmp_path)
    r = B.build_bundle(str(model_dir), "t4", skip_quality=True, show_progress=False, detection=NO_GPU)
    assert r.bundle_dir == Path("bundles") / f"{model_dir.name}-t4-int8_wo"
    m = _check_layout(tmp_path / r.bundle_dir, quality=False)
    cfg = json.loads((tmp_path / r.bundle_dir / "checkpoint" / "config.json").read_text())
    assert cfg["quantization"]["quant_algo"] == "W8A16" and cfg["dtype"] == "float16"
    assert m["recipe"]["dtype"] == "float16" and r.on_target[0].startswith("trt-gemma build --from-bundle")


def test_shared_embedding_table_keeps_logits(model_dir, tmp_path):
    """jetson-orin-nano-4gb shares the embedding table: lm_head.weight is dropped and the logits stay identical
    (the lm_head was a copy of the tied embedding)."""
    from trt_gemma.st_io import read_header

    over = ["quant=bfloat16"]
    shared = B.build_bundle(str(model_dir), "jetson-orin-nano-4gb", overrides=over, out=tmp_path / "shared",
                            skip_quality=True, show_progress=False).bundle_dir
    plain = B.build_bundle(str(model_dir), "jetson-orin-nano-4gb", overrides=over + ["share_embedding_table=false"],
                           out=tmp_path / "plain", skip_quality=True, show_progress=False).bundle_dir
    names, _ = read_header(shared / "checkpoint" / "rank0.safetensors")
    assert "lm_head.weight" not in names and "transformer.vocab_embedding.weight" in names
    assert json.loads((shared / "checkpoint" / "config.json").read_text())["share_embedding_table"] is True
    ids = [2, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 7]
    a, b = _ref_logits(shared / "checkpoint", ids), _ref_logits(plain / "checkpoint", ids)
    diff = np.abs(a - b)
    assert diff.max() == 0.0, f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"


def test_context_clamped_to_model(model_dir, tmp_path):
    from trt_gemma.config import ModelConfig

    ctx = ModelConfig.from_file(model_dir / "config.json").max_position_embeddings
    r = B.build_bundle(str(model_dir), "rtx-a6000", out=tmp_path / "b", skip_quality=True, show_progress=False)
    assert r.recipe.max_seq_len == min(4096, ctx) and r.recipe.max_input_len < r.recipe.max_seq_len


# --- refusals and guards ------------------------------------------------------------------------------------------

def test_model_that_does_not_fit_is_refused_before_any_output(tmp_path, capsys):
    """gemma-2-27b (config only: the plan runs before any weight is read) on an Orin Nano 4GB -> FitError."""
    from trt_gemma.config import preset_config

    big = tmp_path / "gemma-2-27b"
    big.mkdir()
    (big / "config.json").write_text(json.dumps(preset_config("gemma-2-27b").to_hf_dict()))
    out = tmp_path / "out"
    with pytest.raises(FitError, match="does not fit jetson-orin-nano-4gb") as e:
        B.build_bundle(str(big), "jetson-orin-nano-4gb", out=out, show_progress=False)
    assert e.value.fix and e.value.exit_code == 3
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["gemma-2-27b"]
    code, stdout, stderr = run_cli(["build", "--model", big, "--target", "jetson-orin-nano-4gb", "--out", out], capsys)
    assert code == 3 and "error:" in stderr and "fix:" in stderr and not out.exists()


def test_existing_out_needs_force(model_dir, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(OutputError, match="already exists"):
        B.build_bundle(str(model_dir), "rtx-a6000", out=out, show_progress=False)


def test_fp8_kv_without_calibration_is_refused(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        B.build_bundle(str(model_dir), "h100", overrides=["quant=bfloat16"], out=tmp_path / "x", show_progress=False)


@pytest.fixture
def poisoned_tensorrt_llm(tmp_path, monkeypatch):
    """A `tensorrt_llm` that find_spec sees but that explodes when imported: proves the guard probes NVML and never
    imports TensorRT-LLM on a GPU-less host (DESIGN.md: TensorRT crashes without a GPU)."""
    import importlib

    pkg = tmp_path / "poison" / "tensorrt_llm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('tensorrt_llm imported on a host without a GPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "poison"))
    importlib.invalidate_caches()
    yield
    importlib.invalidate_caches()


def test_guard_no_gpu_finishes_bundle_and_exits_0(model_dir, tmp_path, poisoned_tensorrt_llm, capsys):
    from trt_gemma.gpu_probe import gpu_unavailable_reason

    reason = gpu_unavailable_reason()
    assert reason and "tensorrt_llm is not installed" not in reason  # the NVML branch, not the find_spec one
    out = tmp_path / "b"
    code, stdout, stderr = run_cli(["build", "--model", model_dir, "--target", "rtx-a6000", "--out", out,
                                    "--skip-quality"], capsys)
    assert code == 0, stdout + stderr
    assert f"not compiled here: {reason}" in stdout
    _check_printed_commands(stdout, out)


def test_from_bundle_without_gpu_is_a_dependency_error(model_dir, tmp_path, poisoned_tensorrt_llm, capsys):
    out = tmp_path / "b"
    B.build_bundle(str(model_dir), "rtx-a6000", out=out, skip_quality=True, show_progress=False)
    with pytest.raises(DependencyError, match=f"cannot compile {out}") as e:
        B.compile_bundle(out)
    assert "trtllm-build --checkpoint_dir" in e.value.fix and e.value.exit_code == 4
    assert not (out / "engine").exists()
    code, _, stderr = run_cli(["build", "--from-bundle", out], capsys)
    assert code == 4 and "fix:" in stderr


def test_from_bundle_rejects_recipe_options(tmp_path, capsys):
    code, _, stderr = run_cli(["build", "--from-bundle", tmp_path, "--target", "h100"], capsys)
    assert code == ConfigError.exit_code and "--from-bundle compiles the bundle as it is" in stderr
