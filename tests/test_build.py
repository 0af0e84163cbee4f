"""`trt-gemma build` / `inspect` on this CPU host: the bundle flow end to end, the guard paths, fit refusals.

TensorRT-LLM cannot run here, so these tests check everything up to the compile: the bundle's checkpoint (run by the
numpy reference), its recipe/plan/quality/manifest, the printed on-device commands (parsed back and compared with
trtllm_flags), and that nothing imports tensorrt_llm (a poison package on sys.path proves it). GPU tests at the
bottom compile and run a real engine and are skipped here with the reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from trt_gemma import build as B
from trt_gemma.detect import Detection
from trt_gemma.errors import ConfigError, DependencyError, FitError, OutputError, TrtGemmaError
from trt_gemma.fsutil import sha256_file
from trt_gemma.gpu_probe import gpu_unavailable_reason, nvml_device_count
from trt_gemma.manifest import MANIFEST, UNAVAILABLE, inspect_path, read_manifest
from trt_gemma.recipes import load_recipe
from trt_gemma.engine.trtllm_flags import trtllm_build_argv
from trt_gemma.targets import get_target

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
    except (ImportError, TrtGemmaError):  # not shipped in this checkout: the tiny random model stands in
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
    assert (tools["tensorrt_llm"] == UNAVAILABLE) is (importlib.util.find_spec("tensorrt_llm") is None)
    assert (tools["driver"] == UNAVAILABLE) is (nvml_device_count()[0] == 0)  # a GPU host records its driver
    if gpu_unavailable_reason() is not None:  # where TensorRT-LLM and a GPU exist the engine may compile
        assert m["engine"]["status"] == "not compiled" and m["engine"]["gpu"] == "not compiled"
    assert m["plan"]["verdict"] in ("fits", "tight")


def _check_printed_commands(output: str, bundle: Path) -> None:
    """The on-device instructions: our compile command and a raw trtllm-build argv equal to trtllm_flags'."""
    lines = [ln.strip() for ln in output.splitlines()]
    assert f"trt-gemma build --from-bundle {bundle}" in lines, output
    raw = [ln for ln in lines if ln.startswith("trtllm-build ")]
    assert len(raw) == 1, output
    recipe = B.read_bundle(bundle)[2]
    assert shlex.split(raw[0]) == trtllm_build_argv(recipe, bundle / "checkpoint", bundle / "engine")
    assert f"trt-gemma serve {bundle / 'engine'}" in lines


# --- quantized bundles: the acceptance targets (ModelOpt on CPU) -------------------------------------------------

def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def jetson_bundle(model_dir, tmp_path_factory):
    """`trt-gemma build --target jetson-orin-nano-8gb` on this GPU-less host: (bundle dir, stdout, exit code, stderr)."""
    from trt_gemma.cli import main

    out = tmp_path_factory.mktemp("jetson") / "nano"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["build", "--model", str(model_dir), "--target", "jetson-orin-nano-8gb", "--out", str(out),
              "--threads", "1"] + _sets(FAST_CALIB))
    return out, buf.getvalue(), e.value.code, err.getvalue()


@pytest.fixture(scope="module")
def h100_bundle(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("h100") / "h100"
    B.build_bundle(str(model_dir), "h100", overrides=FAST_CALIB, out=out, show_progress=False)
    return out


def test_jetson_int4_awq_bundle(jetson_bundle, model_dir):
    out, stdout, code, stderr = jetson_bundle
    assert code == 0, stdout
    m = _check_layout(out)
    _check_manifest(m, model_dir, "jetson-orin-nano-8gb", "int4_awq")
    q = json.loads((out / "checkpoint" / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == "W4A16_AWQ" and q["group_size"] == 128 and q.get("kv_cache_quant_algo") is None
    assert m["quant_algo"] == {"weights": "W4A16_AWQ", "kv_cache": None}
    _check_printed_commands(stdout, out)
    assert "--gemm_plugin auto" in stdout and "not compiled here" in stdout
    assert "1 thread (--threads)" in stderr, stderr  # issue 10: build offers --threads for calibration too
    # issue 10 defect 6: the build output itself says no TensorRT-LLM release runs Gemma 2 on Orin, and names the route
    assert "warning: no TensorRT-LLM release for Jetson Orin Nano 8GB is known to run Gemma 2" in stdout, stdout
    assert "ONNX -> TensorRT: see docs/jetson.md" in stdout
    rows = json.loads((out / "quality.json").read_text())["rows"]
    awq = [r for r in rows if r.get("quant_algo") == "W4A16_AWQ"]
    assert awq and np.isfinite(awq[0]["perplexity"]) and 0.0 < awq[0]["top1_agreement"] <= 1.0
    assert (out / "quality.md").read_text().strip()


def test_jetson_runtime_kv_settings_from_recipe(jetson_bundle):
    """What the TRT-LLM backend passes to ModelRunnerCpp.from_dir on the Orin: the recipe's fraction and token cap."""
    from trt_gemma.runtime.trtllm import runtime_kv_settings

    out = jetson_bundle[0]
    recipe = read_manifest(out)["recipe"]
    want = {"kv_cache_free_gpu_memory_fraction": recipe["kv_cache_free_gpu_memory_fraction"],
            "max_tokens_in_paged_kv_cache": recipe["kv_cache_max_tokens"]}
    assert runtime_kv_settings(out) == want
    assert recipe["kv_cache_max_tokens"] > 0


def test_h100_fp8_bundle(h100_bundle, model_dir):
    m = _check_layout(h100_bundle)
    _check_manifest(m, model_dir, "h100", "fp8")
    q = json.loads((h100_bundle / "checkpoint" / "config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8" and q["kv_cache_quant_algo"] == "FP8"
    argv = trtllm_build_argv(load_recipe(get_target("h100"), h100_bundle / "recipe.toml"), "c", "e")
    assert argv[argv.index("--gemm_plugin") + 1] == "disable"


def test_inspect_describes_both(jetson_bundle, h100_bundle, capsys):
    nano = jetson_bundle[0]
    code, stdout, _ = run_cli(["inspect", "--json", nano, h100_bundle], capsys)
    assert code == 0
    by_target = {x["target"]: x for x in json.loads(stdout)}
    assert by_target["jetson-orin-nano-8gb"]["quant"] == "int4_awq" and by_target["h100"]["quant"] == "fp8"
    for x in by_target.values():
        assert x["kind"] == "bundle" and x["engine"]["status"] == "not compiled" and not x["can_run_here"]
        assert x["quality"]["rows"]
        assert {"checkpoint/", "manifest.json", "quality.json"} <= {c["name"] for c in x["contents"]}
    orin = Detection("jetson", name="NVIDIA Jetson Orin Nano 8GB", sm=87, memory_bytes=7620 * 2**20,
                     target="jetson-orin-nano-8gb", why="test host")
    on_orin = {b.name: {c["name"]: c["ok"] for c in inspect_path(b, detection=orin)["checks"]}
               for b in (nano, h100_bundle)}
    assert on_orin[nano.name]["precision int4_awq"] is True
    assert on_orin[h100_bundle.name]["precision fp8"] is False  # SM 8.7 < 8.9
    code, stdout, _ = run_cli(["inspect", nano], capsys)
    assert code == 0 and "can run here: no" in stdout and f"trt-gemma build --from-bundle {nano}" in stdout


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
    from trt_gemma.checkpoint.st_io import read_header

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
    from trt_gemma.checkpoint.config import ModelConfig

    ctx = ModelConfig.from_file(model_dir / "config.json").max_position_embeddings
    r = B.build_bundle(str(model_dir), "rtx-a6000", out=tmp_path / "b", skip_quality=True, show_progress=False)
    assert r.recipe.max_seq_len == min(4096, ctx) and r.recipe.max_input_len < r.recipe.max_seq_len


# --- refusals and guards ------------------------------------------------------------------------------------------

def test_model_that_does_not_fit_is_refused_before_any_output(tmp_path, capsys):
    """gemma-2-27b (config only: the plan runs before any weight is read) on an Orin Nano 4GB -> FitError."""
    from trt_gemma.checkpoint.config import preset_config

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
    imports TensorRT-LLM on a GPU-less host (docs/tensorrt-llm-contract.md §0: TensorRT crashes without a GPU)."""
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
    assert "no TensorRT-LLM release" not in stdout  # a dGPU target: TensorRT-LLM is the route there


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


# --- engine dirs: inspect and serve guards -----------------------------------------------------------------------

def _engine_dir_fixture(bundle: Path, gpu: str, sm: int) -> Path:
    """An engine dir laid out as TRT-LLM writes one (§5: config.json {version, pretrained_config, build_config} +
    rank0.engine) with our manifest, as compile_bundle leaves it. The engine bytes are a placeholder: inspect and the
    serve guard read only the metadata (a real engine needs a GPU: see the gpu tests)."""
    from trt_gemma.manifest import write_manifest
    from trt_gemma.engine.trtllm_flags import build_config_kwargs

    engine = bundle / "engine"
    engine.mkdir()
    recipe = B.read_bundle(bundle)[2]
    build_cfg = {k: v for k, v in build_config_kwargs(recipe).items() if k != "plugin_config"}
    pretrained = json.loads((bundle / "checkpoint" / "config.json").read_text())
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": pretrained,
                                                    "build_config": build_cfg}))
    (engine / "rank0.engine").write_bytes(b"\0" * 4096)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (engine / f).write_bytes((bundle / "checkpoint" / f).read_bytes())
    m = read_manifest(bundle)
    m["tools"]["tensorrt_llm"] = "1.2.1"
    m["engine"] = {"status": "compiled", "gpu": gpu, "sm": f"{sm // 10}.{sm % 10}", "sm_int": sm, "bytes": 4096,
                   "build_seconds": 1.0, "dir": "engine"}
    write_manifest(engine, {**m, "kind": "engine"})
    write_manifest(bundle, m)
    return engine


def test_inspect_engine_checks_sm_and_serving_needs_a_gpu(model_dir, tmp_path, capsys):
    from trt_gemma.runtime.backends import load_backend

    bundle = B.build_bundle(str(model_dir), "rtx-a6000", out=tmp_path / "b", skip_quality=True,
                            show_progress=False).bundle_dir
    engine = _engine_dir_fixture(bundle, "NVIDIA RTX A6000", 86)
    same = inspect_path(engine, detection=_host("NVIDIA RTX A6000", 86, 48))
    checks = {c["name"]: c["ok"] for c in same["checks"]}
    assert same["kind"] == "engine" and same["target"] == "rtx-a6000"
    assert checks["engine SM"] and checks["precision bfloat16"] and checks["memory"]
    assert not checks["tensorrt_llm"] and not same["can_run_here"]  # no tensorrt_llm on this host
    other = inspect_path(engine, detection=_host("NVIDIA GeForce RTX 4090", 89, 24))
    assert not {c["name"]: c["ok"] for c in other["checks"]}["engine SM"]
    tiny_gpu = inspect_path(bundle, detection=_host("NVIDIA T1000", 75, 1))
    assert not {c["name"]: c["ok"] for c in tiny_gpu["checks"]}["precision bfloat16"]  # Turing: no bf16
    code, stdout, _ = run_cli(["inspect", engine, bundle], capsys)
    assert code == 0 and f"{engine}: engine" in stdout and f"{bundle}: bundle" in stdout
    code, stdout, _ = run_cli(["inspect", "--json", bundle], capsys)
    assert code == 0 and json.loads(stdout)[0]["engine"]["status"] == "compiled"
    with pytest.raises(DependencyError, match="cannot serve a TensorRT-LLM engine here") as e:
        load_backend(engine)
    assert "reference backend" in e.value.fix


def test_inspect_rejects_other_dirs(tmp_path, capsys):
    code, _, stderr = run_cli(["inspect", tmp_path], capsys)
    assert code == 2 and "neither a trt_gemma bundle" in stderr


# --- GPU host: a real engine (skipped here with the reason by conftest.py) ---------------------------------------

@pytest.fixture(scope="module")
def bf16_engine(model_dir, tmp_path_factory):
    """The embedded model as a bf16 bundle compiled for this GPU, with context logits gathered for comparison."""
    out = tmp_path_factory.mktemp("gpu") / "bundle"
    B.build_bundle(str(model_dir), "auto", overrides=["quant=bfloat16", "kv_cache_dtype=auto",
                                                      "gemm_plugin=auto"], out=out, compile_engine=False,
                   skip_quality=True, show_progress=False)
    B.compile_bundle(out, gather_context_logits=True)
    return out


@pytest.mark.gpu
def test_gpu_engine_logits_match_reference(bf16_engine):
    """TRT-LLM engine vs the numpy reference on the same bf16 checkpoint: softmax within 2e-2 (bf16 compute).
    The prompt is shorter than the model's sliding window, where TRT-LLM (every Gemma 2 layer global) and the
    reference (window on the sliding layers) compute the same attention."""
    import torch
    from tensorrt_llm.runtime import ModelRunnerCpp

    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    m = read_manifest(bf16_engine)
    assert m["engine"]["status"] == "compiled" and m["engine"]["bytes"] > 0
    assert m["tools"]["tensorrt_llm"] != UNAVAILABLE
    tok = GemmaTokenizer.from_dir(bf16_engine / "engine")
    ids = tok.encode("The quick brown fox jumps over the lazy dog. The server streams tokens and reports memory.")
    runner = ModelRunnerCpp.from_dir(engine_dir=str(bf16_engine / "engine"), rank=0)
    out = runner.generate([torch.tensor(ids, dtype=torch.int32)], max_new_tokens=1, end_id=tok.eos_id,
                          pad_id=tok.eos_id, return_dict=True)
    ctx = out["context_logits"]
    got = (ctx[0] if isinstance(ctx, (list, tuple)) else ctx[0]).float().cpu().numpy().reshape(len(ids), -1)
    want = _ref_logits(bf16_engine / "checkpoint", ids)
    V = want.shape[1]
    got = got[:, :V]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    d_logit = np.abs(got - want)
    d_prob = np.abs(softmax(got) - softmax(want))
    assert d_prob.max() <= 2e-2, (f"probabilities max diff {d_prob.max():.3g} mean {d_prob.mean():.3g}; "
                                  f"logits max diff {d_logit.max():.3g} mean {d_logit.mean():.3g}")
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.gpu
def test_gpu_backend_streams_and_reports_kv(bf16_engine):
    from trt_gemma.runtime.backends import GenerationParams, load_backend

    backend = load_backend(bf16_engine / "engine", slots=2)
    try:
        assert backend.name == "tensorrt_llm"
        ids = backend.encode("The quick brown fox")
        steps = list(backend.stream(ids, GenerationParams(max_tokens=8, temperature=0.0)))
        assert steps and steps[-1].finish_reason in ("stop", "length") and len(steps) <= 8
        assert all(s.finish_reason is None for s in steps[:-1])
        want = int(_ref_logits(bf16_engine / "checkpoint", ids)[-1].argmax())
        assert steps[0].token_id == want or steps[0].finish_reason == "stop"
        kv = backend.kv_usage()
        assert kv.capacity_tokens > 0 and kv.bytes_per_token > 0
    finally:
        backend.close()


def test_inspect_raw_trtllm_build_engine(model_dir, tmp_path):
    """An engine dir from a raw `trtllm-build` (no manifest): precisions/limits from its config.json, SM unknown."""
    bundle = B.build_bundle(str(model_dir), "rtx-a6000", out=tmp_path / "b", skip_quality=True,
                            show_progress=False).bundle_dir
    engine = _engine_dir_fixture(bundle, "NVIDIA RTX A6000", 86)
    (engine / MANIFEST).unlink()
    x = inspect_path(engine, detection=_host("NVIDIA RTX A6000", 86, 48))
    checks = {c["name"]: c["ok"] for c in x["checks"]}
    assert "note" in x and x["quant"] == "bfloat16"
    assert x["limits"]["max_seq_len"] == read_manifest(bundle)["recipe"]["max_seq_len"]
    assert checks["engine SM"] is None and checks["precision bfloat16"] is True and checks["tensorrt_llm"] is False


def test_default_target_header_says_the_reason_once(model_dir, tmp_path):
    """`target jetson-orin-nano-8gb (default: no NVIDIA GPU: ...)`, not the target name nested in its own reason."""
    logs = []
    r = B.build_bundle(str(model_dir), "auto", overrides=["quant=bfloat16"], out=tmp_path / "b", skip_quality=True,
                       show_progress=False, log=logs.append, detection=NO_GPU)
    assert r.target == "jetson-orin-nano-8gb"
    assert logs[0] == f"target jetson-orin-nano-8gb (default: {NO_GPU.message}; pass --target to choose)", logs[0]
    assert logs[0].count("jetson-orin-nano-8gb") == 1
    assert r.trtllm_caveat and "docs/jetson.md" in r.trtllm_caveat
