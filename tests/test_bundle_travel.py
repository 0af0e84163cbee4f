"""A bundle travels: built on one host from a model dir that is then deleted, copied to another directory, every step
that runs on the device works from the bundle alone (issue 21): `stages.plan`, `trt-gemma plan --model BUNDLE`,
`inspect`, `generate`, the server's load, `build --from-bundle` and examples/edge_assistant.py. The commands run as
fresh processes from a directory of their own, as on a device that never saw the source."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from trt_gemma import stages
from trt_gemma.assets import default_model_dir
from trt_gemma.errors import DependencyError

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
PROMPT = "A list in Python"
TARGET = "rtx-3090"  # an RTX target: its TensorRT route builds here (TensorRT-RTX targets an SM from any host)


def cli(*args: str, cwd: Path, stdin: str = "", script: Path | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(script)] if script else [sys.executable, "-m", "trt_gemma"]
    return subprocess.run([*argv, *args], cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def travelled(tmp_path_factory):
    """(the moved bundle, a fresh working dir, what the bundle said before it moved: plan and generated text)."""
    root = tmp_path_factory.mktemp("travel")
    source = root / "source-model"
    shutil.copytree(default_model_dir(), source)
    built = root / "build-host" / "bundle"
    stages.build(str(source), target=TARGET, overrides=["quant=float16", "engine=tensorrt"], out=built,
                 skip_quality=True, compile_engine=False, show_progress=False)
    before = {"plan": stages.plan(built, TARGET).to_dict(),
              "text": json.loads(cli("generate", str(built), "--prompt", PROMPT, "--max-tokens", "8", "--json",
                                     cwd=root).stdout)["text"]}
    shutil.rmtree(source)  # the device never saw the source model
    device = root / "device"
    device.mkdir()
    moved = device / "copied-bundle"
    shutil.move(str(built), moved)
    shutil.rmtree(root / "build-host")
    return moved, device, before


def test_the_manifest_keeps_the_source_as_provenance_only(travelled):
    moved, _, _ = travelled
    m = json.loads((moved / "manifest.json").read_text())
    assert not Path(m["model"]["path"]).exists()  # recorded, gone, and nothing below needs it
    assert (moved / m["model"]["config"]).is_file()


def test_stages_plan_of_the_copied_bundle(travelled):
    moved, _, before = travelled
    p = stages.plan(moved, TARGET).to_dict()
    for key in ("model", "recipe", "parameters", "total_bytes", "verdict", "route"):
        assert p[key] == before["plan"][key], key
    assert p["model"].endswith("source-model") and p["recipe"]["quant"] == "float16"  # the id the build was given


def test_cli_plan_and_inspect_of_the_copied_bundle(travelled):
    moved, device, before = travelled
    r = cli("plan", "--model", str(moved), "--target", TARGET, "--json", cwd=device)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_bytes"] == before["plan"]["total_bytes"]
    r = cli("inspect", str(moved), "--json", cwd=device)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["kind"] == "bundle"


def test_generate_and_the_servers_load_from_the_copied_bundle(travelled):
    from live_server import LiveServer

    from trt_gemma.checkpoint.hf import resolve_model
    from trt_gemma.runtime.backends import load_backend
    from trt_gemma.serve.app import create_app

    moved, device, before = travelled
    r = cli("generate", str(moved), "--prompt", PROMPT, "--max-tokens", "8", "--json", cwd=device)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == before["text"]  # the same bundle generates the same greedy text
    path = resolve_model(str(moved))  # what `trt-gemma serve BUNDLE` resolves, then loads in the server
    with LiveServer(create_app(lambda: load_backend(path, slots=1), "m")) as s:
        deadline = time.monotonic() + 120
        while (health := httpx.get(s.url + "/health")).status_code == 503:  # loading
            assert time.monotonic() < deadline, "the bundle never loaded"
            time.sleep(0.05)
        assert health.status_code == 200, health.text
        got = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 8,
                                                           "temperature": 0}, timeout=120)
    assert got.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == before["text"]


def test_build_from_the_copied_bundle(travelled):
    moved, device, _ = travelled
    r = cli("build", "--from-bundle", str(moved), cwd=device)  # TensorRT-LLM: needs its GPU host, nothing else
    if r.returncode != 0:
        assert r.returncode == DependencyError.exit_code and "cannot compile" in r.stderr, r.stderr
        assert "source-model" not in r.stderr
    if importlib.util.find_spec("tensorrt_rtx") is None:
        pytest.skip("tensorrt-rtx is not installed (pip install tensorrt-rtx): the TensorRT route is not built here")
    r = cli("build", "--from-bundle", str(moved), "--engine", "tensorrt", cwd=device)
    assert r.returncode == 0, r.stderr
    assert (moved / "tensorrt" / "model.engine").stat().st_size > 0


def test_edge_assistant_plans_and_runs_the_copied_bundle(travelled):
    moved, device, before = travelled
    r = cli(str(moved), "--target", TARGET, "--max-tokens", "8", cwd=device, stdin="hello\n",
            script=REPO / "examples" / "edge_assistant.py")
    assert r.returncode == 0, r.stderr
    assert "not planned" not in r.stderr and f"plan: {before['plan']['verdict']} on {TARGET}" in r.stderr, r.stderr
