"""Outputs never cost a user data and never leave debris: --force replaces only our own outputs (or an empty dir),
OUT may not be the current directory, SIGTERM cleans up like Ctrl-C, stale temp dirs of dead runs are swept by
their marker (never by name), output dirs honour the umask."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trt_gemma.cli import main
from trt_gemma.checkpoint.convert import convert_checkpoint
from trt_gemma.errors import OutputError
from trt_gemma.fsutil import (PAYLOAD, TEMP_MARKER, atomic_output_dir, check_output_target, is_tool_output,
                              marked_temp_dir, sweep_stale_temp_dirs)

ROOT = Path(__file__).resolve().parents[1]


def tree(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def home(tmp_path) -> Path:
    """A user's folder: `mkdir -p h/.ssh && echo k > h/.ssh/id`."""
    h = tmp_path / "h"
    (h / ".ssh").mkdir(parents=True)
    (h / ".ssh" / "id").write_text("k\n")
    return h


def test_force_refuses_a_folder_we_did_not_write(tiny_model_dir, home, tmp_path, capsys):
    before = tree(tmp_path)
    with pytest.raises(OutputError, match="not written by trt-gemma") as e:
        convert_checkpoint(tiny_model_dir, home, force=True, show_progress=False)
    assert str(home) in e.value.message and "delete" in e.value.fix
    code, err = run_cli(["convert", tiny_model_dir, home, "--force"], capsys)
    assert code == OutputError.exit_code and str(home) in err and "fix:" in err
    code, err = run_cli(["quantize", tiny_model_dir, home, "--quant", "fp8", "--force"], capsys)
    assert code == OutputError.exit_code and "not written by trt-gemma" in err
    assert tree(tmp_path) == before


def test_force_refuses_a_look_alike_marker(tiny_model_dir, tmp_path):
    """A manifest.json or provenance file that is not ours (someone's web app) does not make a folder replaceable."""
    for name, content in (("manifest.json", {"name": "my-web-app"}), ("trt_gemma_provenance.json", "not json")):
        d = tmp_path / name
        d.mkdir()
        (d / name).write_text(content if isinstance(content, str) else json.dumps(content))
        assert not is_tool_output(d)
        with pytest.raises(OutputError, match="not written by trt-gemma"):
            check_output_target(d, force=True)
        assert (d / name).is_file()


def test_other_commands_records_make_their_outputs_replaceable(tmp_path):
    """The TensorRT engine build writes manifest.json of kind tensorrt-engine; exports write trt_gemma_<what>.json,
    each with a field of our own schema (the file name alone is not enough: test_trust_files)."""
    for name, content in (("manifest.json", {"kind": "tensorrt-engine", "builder_version": "1.7.1"}),
                          ("trt_gemma_onnx.json", {"format": "trt_gemma-onnx/1"}),
                          ("trt_gemma_triton.json", {"format": "trt_gemma.triton/1"})):
        d = tmp_path / name
        d.mkdir()
        (d / name).write_text(json.dumps(content))
        (d / "model.bin").write_bytes(b"x")
        assert is_tool_output(d), name
        check_output_target(d, force=True)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "export.json").write_text("{}")
    assert is_tool_output(tmp_path / "own", markers={"export.json": lambda d: True})
    assert not is_tool_output(tmp_path / "own")


def test_build_force_uses_the_same_rule(tiny_model_dir, home, tmp_path):
    from trt_gemma.build import build_bundle

    before = tree(tmp_path)
    with pytest.raises(OutputError, match="not written by trt-gemma"):
        build_bundle(str(tiny_model_dir), "rtx-a6000", out=home, force=True, skip_quality=True, show_progress=False)
    assert tree(tmp_path) == before


def test_out_may_not_be_the_current_directory_or_above(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`cd d && trt-gemma convert ../base . --force` used to fail with EBUSY and leave an empty `..old-*`."""
    d = convert_checkpoint(tiny_model_dir, tmp_path / "d", show_progress=False)  # ours, so only the cwd rule stops it
    (d / "sub").mkdir()
    monkeypatch.chdir(d / "sub")
    before = tree(tmp_path)
    for out in (".", "..", str(d / "sub")):
        with pytest.raises(OutputError, match="current directory") as e:
            convert_checkpoint(tiny_model_dir, Path(out), force=True, show_progress=False)
        assert e.value.fix
        code, err = run_cli(["convert", tiny_model_dir, out, "--force"], capsys)
        assert code == OutputError.exit_code and "current directory" in err
    assert tree(tmp_path) == before


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _marked(parent: Path, name: str, pid: int, **fields) -> Path:
    """A temp dir as a run of ours leaves it (its marker as fsutil writes it), with `fields` changed."""
    from trt_gemma.fsutil import _owner

    d = parent / name
    (d / PAYLOAD).mkdir(parents=True)
    (d / PAYLOAD / "rank0.safetensors").write_bytes(b"\0" * 1024)
    (d / TEMP_MARKER).write_text(json.dumps({**_owner(), "name": name, "pid": pid, **fields}))
    return d


def test_stale_temp_dirs_are_swept_by_marker_only(tiny_model_dir, tmp_path):
    dead = _dead_pid()
    stale = _marked(tmp_path, ".ckpt.tmp-dead0000", dead)
    live = _marked(tmp_path, ".ckpt.tmp-live0000", os.getpid())                  # a run still going: kept
    remote = _marked(tmp_path, ".ckpt.tmp-remote00", dead, host="other-host")    # another host's pid says nothing
    lookalike = tmp_path / ".ckpt.tmp-unmarked"                                  # no marker: never ours
    (lookalike / "payload").mkdir(parents=True)
    (lookalike / "payload" / "precious").write_text("user data")
    convert_checkpoint(tiny_model_dir, tmp_path / "ckpt", show_progress=False)
    assert not stale.exists()
    assert live.exists() and remote.exists() and (lookalike / "payload" / "precious").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt", live.name, remote.name, lookalike.name])
    assert sweep_stale_temp_dirs(tmp_path) == []


def test_scratch_dirs_are_marked_and_removed(tmp_path):
    with marked_temp_dir(tmp_path, prefix="trt-gemma-eval-") as d:
        record = json.loads((d / TEMP_MARKER).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), atomic_output_dir(tmp_path / "out") as d:
        (d / "x").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_dirs_honour_the_umask(tiny_model_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = convert_checkpoint(tiny_model_dir, tmp_path / "ckpt", show_progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


SLOW_CONVERT = """
import sys, time
import trt_gemma.checkpoint.convert as c
real = c._write_ranks
def slow(*a, **k):
    print("writing", flush=True)
    time.sleep(60)  # a long conversion: SIGTERM arrives while the temp dir exists
    return real(*a, **k)
c._write_ranks = slow
from trt_gemma.cli import main
main(sys.argv[1:])
"""


def test_sigterm_cleans_up_like_ctrl_c(tiny_model_dir, tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", str(tiny_model_dir),
                             str(tmp_path / "ckpt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.tmp-")], "temp dir exists"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - t0 < 20, "SIGTERM ended the sleep at once"
    assert proc.returncode == -signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "no temp dir and no OUT left behind"


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    import trt_gemma.fsutil as fs

    out = tmp_path / "out"
    with atomic_output_dir(out) as d:
        (d / "trt_gemma_provenance.json").write_text('{"tool": "trt_gemma convert"}')
        (d / "v").write_text("1")
    real = os.rename

    def busy(src, dst):  # the new output cannot take OUT's place (EBUSY, as for a mount point)
        if ".tmp-" in Path(src).parent.name and Path(dst) == out:
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(fs.os, "rename", busy)
    with pytest.raises(OSError, match="busy"), atomic_output_dir(out, force=True) as d:
        (d / "v").write_text("2")
    assert (out / "v").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bundle_and_its_checkpoint_honour_the_umask(tiny_model_dir, tmp_path):
    """A bundle copied to a device or served by another user must stay readable (they were drwx------)."""
    from trt_gemma.build import build_bundle
    from trt_gemma.detect import Detection

    old = os.umask(0o022)
    try:
        build_bundle(str(tiny_model_dir), "t4", out=tmp_path / "b", skip_quality=True, show_progress=False,
                     detection=Detection("none", why="test host without NVIDIA GPU"))
    finally:
        os.umask(old)
    for d in (tmp_path / "b", tmp_path / "b" / "checkpoint"):
        assert d.stat().st_mode & 0o777 == 0o755, f"{d}: {oct(d.stat().st_mode & 0o777)}"


def test_atomic_write_text_is_whole_or_nothing(tmp_path):
    """A file replaced whole (mode 0644), and a failed rename (the path is a directory) leaves no temp file behind."""
    from trt_gemma.fsutil import atomic_write_text

    f = tmp_path / "page.html"
    f.write_text("old")
    atomic_write_text(f, "new")
    assert f.read_text() == "new" and (f.stat().st_mode & 0o777) == 0o644
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="cannot write") as e:
        atomic_write_text(tmp_path / "dir", "x", fix="pick a file path")
    assert e.value.fix == "pick a file path"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "page.html"]
