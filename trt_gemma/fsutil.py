"""Write outputs atomically and safely: build in a temp dir beside OUT, rename at the end, never leave half a result,
never replace a folder this tool did not write, never leave debris behind.

Rules every command that writes a directory follows (convert, quantize, build, and the export commands):
- `check_output_target` runs first, before any expensive work: OUT must not be the current directory or above it,
  nor the model being read (or a folder above it); an existing OUT needs --force, and --force only replaces an empty
  directory or one this tool wrote (`is_tool_output`: a provenance or manifest file of ours inside it).
- `atomic_output_dir` writes into a *marked* temp dir beside OUT and renames its payload into place at the end. The
  marker records the owner's pid and host; a temp dir whose owner died (SIGKILL, power loss) is swept by the next
  run that writes beside it (`sweep_stale_temp_dirs`), and only then — never by its name alone.
- SIGTERM is turned into an exception like Ctrl-C (`raise_on_sigterm`, installed by the CLI), so every context
  manager here cleans up on `kill` too.
- The payload dir is made with `os.mkdir`, which honours the umask (mkdtemp's 0700 would survive the rename and make a
  bundle unreadable for other users).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from trt_gemma.errors import OutputError

# File inside a directory -> test of its JSON content: a directory holding one that passes was written by this tool
# and --force may replace it. convert and quantize write a provenance record ("tool": "trt_gemma convert" /
# "trt_gemma quantize"); build writes bundle and engine manifests ("format": "trt_gemma.bundle/1"), the TensorRT
# engine build one of kind "tensorrt-engine". Any other record named trt_gemma_<what>.json (OWN_RECORDS: e.g. an
# export's trt_gemma_onnx.json / trt_gemma_triton.json) counts too: no other tool writes that name. A command can
# also pass its own `markers`.
OUTPUT_MARKERS: dict[str, Callable[[dict], bool]] = {
    "trt_gemma_provenance.json": lambda d: str(d.get("tool", "")).startswith("trt_gemma"),
    "manifest.json": lambda d: (str(d.get("format", "")).startswith("trt_gemma.")
                                or d.get("kind") == "tensorrt-engine"),
}
OWN_RECORDS = "trt_gemma_*.json"
TEMP_MARKER = ".trt_gemma_tmp.json"  # inside every temp dir we make: owner pid + host
PAYLOAD = "payload"                  # the part of an output temp dir that becomes OUT


def is_tool_output(path: Path, markers: dict[str, Callable[[dict], bool]] | None = None) -> bool:
    """Whether `path` holds one of our marker files with our content (not just a file of that name)."""
    tests = dict(markers or OUTPUT_MARKERS)
    try:
        for f in Path(path).glob(OWN_RECORDS):
            tests.setdefault(f.name, lambda d: True)  # our name: any JSON object in it will do
    except OSError:
        pass
    for name, test in tests.items():
        try:
            data = json.loads((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and test(data):
            return True
    return False


def _is_empty_dir(path: Path) -> bool:
    try:
        return next(Path(path).iterdir(), None) is None
    except OSError:
        return False


def check_output_target(out: Path, force: bool, source: Path | None = None, command: str | None = None,
                        markers: dict[str, Callable[[dict], bool]] | None = None) -> None:
    """Refuse early (before any expensive work) an OUT that cannot or must not be written; see the module docstring.
    `source` is the model being read and `command` the CLI command (for the fix), when known."""
    out = Path(out)
    o, cwd = out.resolve(), Path.cwd().resolve()
    if o == cwd or o in cwd.parents:
        raise OutputError(f"output {out} is the current directory{'' if o == cwd else ' or a folder above it'}; "
                          "it cannot be replaced while in use", fix="name a new subdirectory as OUT, e.g. ./out")
    if source is not None:
        s = Path(source).resolve()
        if s == o or o in s.parents:
            usage = f"`trt-gemma {command} {source} OUT` with a new OUT" if command else "a path outside the model"
            raise OutputError(f"output {out} would replace the model being read ({source})", fix=f"use {usage}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory", fix="remove it or choose another path")
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists", fix="choose another path or pass --force to replace it")
    if out.exists() and not (_is_empty_dir(out) or is_tool_output(out, markers)):
        names = " or ".join([*(markers or OUTPUT_MARKERS), OWN_RECORDS])
        fix = f"choose another path, or delete {out} yourself if nothing in it is needed"
        if (out / "config.json").is_file():  # most likely MODEL typed without OUT: MODEL became OUT
            fix = f"pass both paths: `trt-gemma {command or 'convert'} {out} OUT`, or {fix}"
        raise OutputError(f"output {out} is not empty and was not written by trt-gemma (no {names} of ours in it); "
                          "--force only replaces trt-gemma's own outputs", fix=fix)
    parent = o.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputError(f"cannot write to {parent} (permission denied)", fix="choose a writable output path")


# --- marked temp dirs ---------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def sweep_stale_temp_dirs(parent: Path) -> list[Path]:
    """Delete temp dirs in `parent` that carry our marker and whose owner process (on this host) is gone.
    Directories without a readable marker of ours are never touched, whatever their name."""
    swept: list[Path] = []
    host = socket.gethostname()
    try:
        children = list(Path(parent).iterdir())
    except OSError:
        return swept
    for child in children:
        try:
            if child.is_symlink() or not child.is_dir():
                continue
            data = json.loads((child / TEMP_MARKER).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("tool") != "trt_gemma" or data.get("host") != host:
            continue
        pid = data.get("pid")
        if isinstance(pid, int) and pid > 0 and not _pid_alive(pid):
            shutil.rmtree(child, ignore_errors=True)
            swept.append(child)
    return swept


def _make_marked_dir(parent: Path, prefix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    record = {"tool": "trt_gemma", "pid": os.getpid(), "host": socket.gethostname(),
              "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / TEMP_MARKER).write_text(json.dumps(record))
    return tmp


@contextlib.contextmanager
def marked_temp_dir(parent: Path | None = None, prefix: str = "trt-gemma-") -> Iterator[Path]:
    """A scratch dir (in `parent`, default the system temp dir) that is deleted on exit, and swept by a later run
    if this process dies without cleaning up. Stale ones in `parent` are swept first."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep_stale_temp_dirs(parent)
    try:
        tmp = _make_marked_dir(parent, prefix)
    except OSError as e:
        raise OutputError(f"cannot create a temporary directory in {parent}: {e.strerror}",
                          fix="free space there or choose a writable output path") from e
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False,
                      markers: dict[str, Callable[[dict], bool]] | None = None) -> Iterator[Path]:
    """Yield a fresh dir (the payload of a marked temp dir beside `out`); on success it replaces `out`, on any error
    (and on Ctrl-C or SIGTERM) it is deleted. The temp dir lives in the same parent so the final step is a rename
    on one filesystem. `markers`: see check_output_target (a new command's own output marker)."""
    out = Path(out)
    check_output_target(out, force, markers=markers)
    parent = out.resolve().parent
    name = out.resolve().name
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_temp_dirs(parent)
        box = _make_marked_dir(parent, f".{name}.tmp-")
        payload = box / PAYLOAD
        payload.mkdir()  # mode 0777 & ~umask
    except OSError as e:
        raise OutputError(f"cannot create output in {parent}: {e.strerror}", fix="choose a writable output path") from e
    try:
        yield payload
        if out.exists():
            old = _make_marked_dir(parent, f".{name}.old-")
            try:
                os.rename(out, old / PAYLOAD)
                try:
                    os.rename(payload, out)
                except BaseException:
                    os.rename(old / PAYLOAD, out)  # the previous output goes back where it was
                    raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(payload, out)
    finally:
        shutil.rmtree(box, ignore_errors=True)


def atomic_write_text(path: Path, text: str, fix: str = "choose a writable path") -> None:
    """One file written whole or not at all: a hidden temp file beside `path`, renamed over it (removed on error).
    Mode 0644 as a plain open() would give under the usual umask (mkstemp makes 0600)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}", fix=fix) from e


# --- SIGTERM ------------------------------------------------------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C so every `finally` and context manager cleans up (temp dirs above). Not a
    KeyboardInterrupt: code that treats Ctrl-C as "stop quietly" (uvicorn, `telemetry --watch`) must not swallow it."""


def _on_sigterm(signum, frame):
    raise Terminated()


def raise_on_sigterm():
    """Make SIGTERM raise Terminated in the main thread; returns the previous handler (for restore_sigterm).
    A no-op (None) off the main thread or when someone else already handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


def restore_sigterm(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def die_by_sigterm() -> None:
    """After cleaning up: end the process by SIGTERM itself, so a supervisor sees the usual 'killed by signal 15'."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
