"""The TensorRT route as a user meets it from the CLI: an engine asked for by name is built here or refused with the
install line, `inspect` describes the engine it recorded, and the commands the build prints run as printed where
they say they run. Missing packages are made missing for real: a subprocess whose import system cannot see them."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_RTX = importlib.util.find_spec("tensorrt_rtx") is not None
needs_rtx = pytest.mark.skipif(not HAS_RTX, reason="tensorrt-rtx is not installed (pip install 'trt-gemma[rtx]')")
needs_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="the onnx extra is missing")

# sitecustomize for a subprocess: every finder on sys.meta_path is wrapped so the named top-level packages are
# not found (find_spec -> None, import -> ModuleNotFoundError), exactly as on a host where they are not installed.
HIDE = textwrap.dedent('''
    import os, sys
    _HIDDEN = set(os.environ["TRT_GEMMA_TEST_HIDE"].split(","))

    class _Hide:
        def __init__(self, inner):
            self._inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in _HIDDEN:
                return None
            find = getattr(self._inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self._inner, attr)

    sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
''')


def run_cli(args: list[str], tmp_path: Path, hide: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if hide:
        shim = tmp_path / "hide_shim"
        shim.mkdir(exist_ok=True)
        (shim / "sitecustomize.py").write_text(HIDE)
        env["PYTHONPATH"] = os.pathsep.join([str(shim), env["PYTHONPATH"]])
        env["TRT_GEMMA_TEST_HIDE"] = ",".join(hide)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)


def test_the_blocker_hides_the_builder(tmp_path):
    """The shim really makes tensorrt_rtx absent (else the next test would pass for the wrong reason)."""
    probe = "import importlib.util as u, sys; print(u.find_spec('tensorrt_rtx'), u.find_spec('numpy') is not None)"
    p = run_cli(["-c", probe], tmp_path, hide=("tensorrt_rtx",))
    assert p.returncode == 0 and p.stdout.split() == ["None", "True"], p.stdout + p.stderr


def test_named_rtx_engine_without_its_builder_is_an_error_with_the_install_line(tmp_path):
    """`build --target rtx-4090 --engine tensorrt` without tensorrt_rtx: exit 4 before any work, the fix is the
    install line — not a bundle and "build it on the device" (TensorRT-RTX builds on any host)."""
    out = tmp_path / "b"
    p = run_cli(["-m", "trt_gemma", "build", "--target", "rtx-4090", "--engine", "tensorrt", "--skip-quality",
                 "--out", str(out)], tmp_path, hide=("tensorrt_rtx",))
    assert p.returncode == 4, p.stdout + p.stderr  # DependencyError
    assert "tensorrt_rtx is not installed" in p.stderr and "fix: pip install 'trt-gemma[rtx]'" in p.stderr, p.stderr
    assert "on the device" not in p.stdout + p.stderr and "Traceback" not in p.stderr
    assert not out.exists()


@needs_onnx
def test_device_builder_is_left_for_the_device(tmp_path):
    """A Jetson engine needs JetPack's TensorRT and the Orin itself: the bundle and its ONNX graph are made here,
    the engine is left for the device with the command to run there (exit 0)."""
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "b"
    p = run_cli(["-m", "trt_gemma", "build", "--target", "jetson-orin-nano-8gb", "--engine", "tensorrt",
                 "--set", "quant=float16", "--skip-quality", "--out", str(out), "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    trt = json.loads(p.stdout)["tensorrt"]
    assert trt["engine"] is None and "tensorrt is not installed" in trt["reason"] and trt["onnx"]
    assert trt["on_target"] == [f"trt-gemma build --from-bundle {out} --engine tensorrt"]


def _printed_commands(stdout: str) -> dict[str, str]:
    """The check commands under their printed labels: 'here' (any host) and 'device'."""
    lines = stdout.splitlines()
    out = {}
    for i, line in enumerate(lines):
        if line.startswith("compare it with onnxruntime") and "any host" in line:
            out["here"] = lines[i + 1].strip()
        if line.startswith("then on the device"):
            out["device"] = lines[i + 1].strip()
    return out


def _build_rtx(cwd: Path, dtype: str) -> subprocess.CompletedProcess:
    """`trt-gemma build --target rtx-4090 --engine tensorrt` of the embedded model in `dtype`, into cwd/bundles/b."""
    p = run_cli(["-m", "trt_gemma", "build", "--target", "rtx-4090", "--engine", "tensorrt", "--set",
                 f"quant={dtype}", "--set", f"dtype={dtype}", "--set", "kv_cache_dtype=auto", "--skip-quality",
                 "--out", "bundles/b"], cwd)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def rtx_bf16(tmp_path_factory):
    """(cwd, build stdout) of a bfloat16 rtx-4090 bundle with its TensorRT-RTX engine (built here, SM 8.9)."""
    if not HAS_RTX or importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("tensorrt-rtx and the onnx extra are needed to build the engine here")
    cwd = tmp_path_factory.mktemp("rtx_bf16")
    return cwd, _build_rtx(cwd, "bfloat16").stdout


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_printed_cpu_check_command_runs_as_printed(rtx_bf16, tmp_path, dtype):
    """`build --target rtx-4090 --engine tensorrt` prints two polygraphy commands; the one it says runs on any host
    runs here, through a shell, as printed (a bfloat16 engine is compared against a float32 export, since
    onnxruntime's CPU EP has no bfloat16 kernels), and saves finite outputs the device half loads."""
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    cwd, stdout = rtx_bf16 if dtype == "bfloat16" else (tmp_path, _build_rtx(tmp_path, dtype).stdout)
    cmds = _printed_commands(stdout)
    assert set(cmds) == {"here", "device"}, stdout
    graph = "bundles/b/onnx-check/model.onnx" if dtype == "bfloat16" else "bundles/b/onnx/model.onnx"
    assert shlex.split(cmds["here"])[:3] == ["polygraphy", "run", graph] and "--onnxrt" in cmds["here"]
    assert cmds["device"].startswith("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run bundles/b/tensorrt/model.engine")
    tol = {"bfloat16": "0.08", "float16": "0.01"}[dtype]
    assert f"--atol {tol} --rtol {tol}" in cmds["device"]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    run = subprocess.run(["bash", "-c", cmds["here"]], cwd=cwd, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from polygraphy.json import load_json

    results = load_json(str(cwd / "bundles/b/tensorrt/polygraphy_onnxrt_outputs.json"))
    arrays = [it[name] for _, iters in results.items() for it in iters for name in it.keys()]
    assert arrays and all(np.isfinite(np.asarray(a, np.float32)).all() for a in arrays)
    assert (cwd / "bundles/b/tensorrt/polygraphy_inputs.json").is_file()


def _inspect(paths, cwd: Path, hide=()) -> list[dict]:
    p = run_cli(["-m", "trt_gemma", "inspect", *map(str, paths), "--json"], cwd, hide=hide)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_inspect_reports_the_engine_of_a_copied_bundle_and_its_dir(rtx_bf16, tmp_path):
    """inspect B and B/tensorrt on a bundle copied elsewhere: builder, version, SM, precision, profiles and size as
    the builder and the recipe made them (checked against the installed package, the target table, the graph's
    profiles and the file itself), and "can run here: no" with the reason on a GPU-less host."""
    from trt_gemma.detect import detect
    from trt_gemma.engine.profiles import Limits, graph_inputs, profiles
    from trt_gemma.recipes import load_recipe
    from trt_gemma.targets import get_target

    bundle = tmp_path / "moved"
    shutil.copytree(rtx_bf16[0] / "bundles" / "b", bundle)
    b, d = _inspect([bundle, bundle / "tensorrt"], tmp_path)
    assert b["kind"] == "bundle" and d["kind"] == "tensorrt-engine" and d["model"] == b["model"]
    recipe = load_recipe(get_target("rtx-4090"), bundle / "recipe.toml")
    want_profiles = profiles(graph_inputs(bundle / "onnx" / "model.onnx"), Limits.from_recipe(recipe))
    for t in (b["tensorrt"], d["tensorrt"]):
        assert t["built"] and t["builder"] == "tensorrt_rtx" and t["not_recorded"] == []
        assert t["builder_version"] == importlib.metadata.version("tensorrt_rtx")
        assert t["sm"] == get_target("rtx-4090").sm_str == "8.9"
        assert t["activation_dtype"] == "bfloat16" and set(t["precisions"]) == {"bfloat16"}
        assert t["engine_file"] == str(bundle / "tensorrt" / "model.engine")
        assert t["engine_bytes"] == t["file_bytes"] == (bundle / "tensorrt" / "model.engine").stat().st_size
        assert {p: {n: [list(x) for x in s] for n, s in shapes.items()} for p, shapes in want_profiles.items()} \
            == t["profiles"]
        if detect().kind == "none":
            assert t["can_run_here"] is False and "no NVIDIA GPU" in t["why_not"]
    if detect().kind == "none":
        assert d["can_run_here"] is False
    moved = str(bundle / "tensorrt")  # the device command names the engine where it is now, not where it was built
    assert f"--trt --load-inputs {moved}/polygraphy_inputs.json" in d["next"]
    assert d["next"].split(": ", 1)[1].startswith(f"POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run {moved}/model.engine")
    text = run_cli(["-m", "trt_gemma", "inspect", str(bundle / "tensorrt")], tmp_path)
    assert text.returncode == 0 and "tensorrt_rtx" in text.stdout and "SM 8.9" in text.stdout


def test_inspect_says_what_an_older_build_did_not_record_and_keeps_new_fields(rtx_bf16, tmp_path):
    """A manifest without the precision fields (an older build) and with a field inspect does not know (a later
    build's per-tensor record): the missing ones are named, the unknown one passed through, nothing guessed."""
    bundle = tmp_path / "old"
    shutil.copytree(rtx_bf16[0] / "bundles" / "b", bundle)
    f = bundle / "tensorrt" / "manifest.json"
    m = json.loads(f.read_text())
    for key in ("precisions", "activation_dtype"):
        m.pop(key)
    m["io"] = [{"name": "input_ids", "dtype": "INT64"}]
    f.write_text(json.dumps(m))
    (t,) = [x["tensorrt"] for x in _inspect([bundle / "tensorrt"], tmp_path)]
    assert t["not_recorded"] == ["precisions", "activation dtype"] and t["record"]["io"] == m["io"]
    assert t["precisions"] is None and t["sm"] == "8.9"


def test_inspect_without_the_runtime_or_the_engine_file(rtx_bf16, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(rtx_bf16[0] / "bundles" / "b", bundle)
    (t,) = [x["tensorrt"] for x in _inspect([bundle / "tensorrt"], tmp_path, hide=("tensorrt_rtx",))]
    runtime = next(c for c in t["checks"] if c["name"] == "runtime tensorrt_rtx")
    assert runtime["ok"] is False and "pip install 'trt-gemma[rtx]'" in runtime["detail"]
    (bundle / "tensorrt" / "model.engine").unlink()
    (t,) = [x["tensorrt"] for x in _inspect([bundle], tmp_path)]
    assert t["present"] is False and t["can_run_here"] is False
    assert next(c for c in t["checks"] if c["name"] == "engine file")["ok"] is False
