"""The installed `trt-gemma` console script, run as a user runs it (not through `python -m`, whose runpy imports
modules the entry point alone does not)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trt_gemma.cli import COMMANDS

SCRIPT = Path(sys.executable).parent / "trt-gemma"


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"console script not installed beside {sys.executable}")
def test_console_script_lists_every_command():
    p = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    missing = [name for name in COMMANDS if f"  {name}" not in p.stdout]
    assert not missing, f"commands missing from --help: {missing}\n{p.stdout}"


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"console script not installed beside {sys.executable}")
def test_console_script_error_is_a_message_not_a_traceback(tmp_path):
    p = subprocess.run([str(SCRIPT), "generate", str(tmp_path / "nowhere"), "--prompt", "x"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "error:" in p.stderr and "fix:" in p.stderr and "Traceback" not in p.stderr
