"""jetson/trt-gemma.service against systemd's own parser (`systemd-analyze verify`) and the privilege rule for the
clock pre-step. systemd.unit(5): StartLimitIntervalSec/StartLimitBurst are [Unit] settings; systemd.service(5): an
ExecStartPre command prefixed with "+" runs with full privileges although User= is set."""
from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "jetson" / "trt-gemma.service"


def _sections() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read_string(UNIT.read_text())
    return cp


def test_restart_limits_are_unit_settings_and_clocks_run_privileged():
    cp = _sections()
    assert {"StartLimitIntervalSec", "StartLimitBurst"} <= set(cp["Unit"]) and not \
        {"StartLimitIntervalSec", "StartLimitBurst"} & set(cp["Service"])
    pre = cp["Service"]["ExecStartPre"]
    prefix = pre[: len(pre) - len(pre.lstrip("+-@:!"))]
    assert "+" in prefix and pre.endswith("jetson_clocks"), pre  # User=trtgemma cannot set clocks


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this host")
def test_systemd_analyze_verify_is_clean(tmp_path):
    """The unit's programs do not exist here, so they are pointed at this Python (verify checks they are executable);
    every other line is verified as written, and systemd must not print a single warning."""
    text = UNIT.read_text().replace("/opt/trt_gemma/.venv/bin/trt-gemma", sys.executable)
    text = text.replace("/usr/bin/jetson_clocks", sys.executable)
    unit = tmp_path / "trt-gemma.service"
    unit.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
