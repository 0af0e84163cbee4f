"""The TensorRT route as a user meets it from the CLI: an engine asked for by name is built here or refused with the
install line, `inspect` describes the engine it recorded, and the commands the build prints run as printed where
they say they run. Missing packages are made missing for real: a subprocess whose import system cannot see them."""
from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

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
    """`build --target rtx-4090 --engine tensorrt` without tensorrt_rtx: exit 5 before any work, the fix is the
    install line — not a bundle and "build it on the device" (TensorRT-RTX builds on any host)."""
    out = tmp_path / "b"
    p = run_cli(["-m", "trt_gemma", "build", "--target", "rtx-4090", "--engine", "tensorrt", "--skip-quality",
                 "--out", str(out)], tmp_path, hide=("tensorrt_rtx",))
    assert p.returncode != 0, p.stdout + p.stderr
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


@needs_rtx
@needs_onnx
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_printed_cpu_check_command_runs_as_printed(tmp_path, dtype):
    """`build --target rtx-4090 --engine tensorrt` prints two polygraphy commands; the one it says runs on any host
    runs here, through a shell, as printed (a bfloat16 engine is compared against a float32 export, since
    onnxruntime's CPU EP has no bfloat16 kernels), and saves finite outputs the device half loads."""
    pytest.importorskip("polygraphy", reason="polygraphy is not installed")
    p = run_cli(["-m", "trt_gemma", "build", "--target", "rtx-4090", "--engine", "tensorrt", "--set",
                 f"quant={dtype}", "--set", f"dtype={dtype}", "--set", "kv_cache_dtype=auto", "--skip-quality",
                 "--out", "bundles/b"], tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    cmds = _printed_commands(p.stdout)
    assert set(cmds) == {"here", "device"}, p.stdout
    graph = "bundles/b/onnx-check/model.onnx" if dtype == "bfloat16" else "bundles/b/onnx/model.onnx"
    assert shlex.split(cmds["here"])[:3] == ["polygraphy", "run", graph] and "--onnxrt" in cmds["here"]
    assert cmds["device"].startswith("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy run bundles/b/tensorrt/model.engine")
    tol = {"bfloat16": "0.08", "float16": "0.01"}[dtype]
    assert f"--atol {tol} --rtol {tol}" in cmds["device"]
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    run = subprocess.run(["bash", "-c", cmds["here"]], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    from polygraphy.json import load_json

    results = load_json(str(tmp_path / "bundles/b/tensorrt/polygraphy_onnxrt_outputs.json"))
    arrays = [it[name] for _, iters in results.items() for it in iters for name in it.keys()]
    assert arrays and all(__import__("numpy").isfinite(a).all() for a in arrays)
    assert (tmp_path / "bundles/b/tensorrt/polygraphy_inputs.json").is_file()
