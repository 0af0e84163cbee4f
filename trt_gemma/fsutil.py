"""Write outputs atomically and safely: build in a temp dir beside OUT, rename at the end, never leave half a result,
never replace a folder this tool did not write, never leave debris behind.

Rules every command that writes a directory follows (convert, quantize, build, and the export commands):
- `check_output_target` runs first, before any expensive work: OUT must not be the current directory or above it,
  nor the model being read (or a folder above it); an existing OUT needs --force, and --force only replaces an empty
  directory or one this tool wrote (`is_tool_output`: a provenance or manifest file of ours inside it).
- `atomic_output_dir` writes into a *marked* temp dir beside OUT and renames its payload into place at the end. The
  marker records the dir's own name and its owner (pid, host, boot id, PID namespace); a temp dir whose owner died
  (SIGKILL, power loss) is swept, with a log line, by the next run that writes beside it (`sweep_stale_temp_dirs`),
  and only then: never by its name alone, never once renamed, never from another host, boot or PID namespace.
- OUT is never a symbolic link, and nothing is written through one: files are created with O_EXCL | O_NOFOLLOW
  (mkstemp does) inside a fresh temp dir or beside their destination, then renamed over it (`atomic_write`).
  Single-file outputs a user names (`features --html FILE`) go through `write_output_file`: an existing file needs
  --force, a link is refused.
- SIGTERM is turned into an exception like Ctrl-C (`raise_on_sigterm`, installed by the CLI), so every context
  manager here cleans up on `kill` too.
- The payload dir is made with `os.mkdir`, which honours the umask (mkdtemp's 0700 would survive the rename and make a
  bundle unreadable for other users).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from trt_gemma.errors import OutputError, TrtGemmaError
from trt_gemma.safe_io import read_json

# File inside a directory -> test of its JSON content: a directory holding one that passes was written by this tool
# and --force may replace it. Each test asks for a field of our own schema, never just the file name (a user's
# trt_gemma_settings.json or someone's manifest.json makes nothing replaceable): convert and quantize write a
# provenance record ("tool": "trt_gemma convert" / "trt_gemma quantize"); build writes bundle and engine manifests
# ("format": "trt_gemma.bundle/1"), the TensorRT engine build one of kind "tensorrt-engine" with its builder;
# export-onnx and export-triton their own records. A command can also pass its own `markers`.
OUTPUT_MARKERS: dict[str, Callable[[dict], bool]] = {
    "trt_gemma_provenance.json": lambda d: str(d.get("tool", "")).startswith("trt_gemma "),
    "manifest.json": lambda d: (str(d.get("format", "")).startswith("trt_gemma.")
                                or (d.get("kind") == "tensorrt-engine" and "builder_version" in d)),
    "trt_gemma_onnx.json": lambda d: d.get("format") == "trt_gemma-onnx/1",
    "trt_gemma_triton.json": lambda d: d.get("format") == "trt_gemma.triton/1",
}
TEMP_MARKER = ".trt_gemma_tmp.json"  # inside every temp dir we make: its name, owner pid, host, boot, pid namespace
PAYLOAD = "payload"                  # the part of an output temp dir that becomes OUT
# The names of the temp dirs we make (mkdtemp adds 8 characters of [a-z0-9_]): `.<OUT>.tmp-`, `.<OUT>.old-`,
# `.<OUT>.modelopt-` beside an output, `trt-gemma-<what>-` in the system temp dir. The sweep touches no other name.
TEMP_NAME = re.compile(r"^(\..+\.(tmp|old|modelopt)|trt-gemma(-[a-z]+)?)-[a-z0-9_]{8}$", re.S)
log = logging.getLogger("trt_gemma.fsutil")


def is_tool_output(path: Path, markers: dict[str, Callable[[dict], bool]] | None = None) -> bool:
    """Whether `path` holds one of our marker files (a regular file inside it, at most 16 MiB) with our content."""
    for name, test in (markers or OUTPUT_MARKERS).items():
        try:
            data = read_json(Path(path) / name, path)
        except TrtGemmaError:
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
    if out.is_symlink():  # --force would replace the link, and the checks below would read its target
        raise OutputError(f"output {out} is a symbolic link; outputs are never written through or over links",
                          fix="name the real directory, or a new path")
    try:
        o, cwd = out.resolve(), Path.cwd().resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a link loop on the way (Path.resolve, Python < 3.13)
        raise OutputError(f"output {out} cannot be resolved: {e}", fix="choose another output path") from None
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
        names = " or ".join(markers or OUTPUT_MARKERS)
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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _pid_namespace() -> int | None:
    """The inode of this process's PID namespace: a PID names the same process only inside one namespace."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _owner() -> dict:
    return {"tool": "trt_gemma", "pid": os.getpid(), "host": socket.gethostname(), "boot_id": _boot_id(),
            "pid_namespace": _pid_namespace()}


def _stale(child: Path, owner: dict) -> dict | None:
    """The marker of `child` when it is a temp dir of ours (its name one we make, and recorded inside) whose owner
    process, on this host since this boot and in this PID namespace, is gone; else None."""
    if not TEMP_NAME.match(child.name) or child.is_symlink() or not child.is_dir():
        return None
    try:
        data = read_json(child / TEMP_MARKER, child)
    except TrtGemmaError:
        return None
    if not isinstance(data, dict) or data.get("name") != child.name:  # renamed (salvaged) dirs are the user's now
        return None
    if any(data.get(k) != v for k, v in owner.items() if k != "pid"):
        return None
    pid = data.get("pid")
    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and not _pid_alive(pid):
        return data
    return None


def sweep_stale_temp_dirs(parent: Path) -> list[Path]:
    """Delete the temp dirs in `parent` that a dead run of ours left (`_stale`), logging each; nothing else is
    touched, whatever its name or content."""
    swept: list[Path] = []
    owner = _owner()
    try:
        children = list(Path(parent).iterdir())
    except OSError:
        return swept
    for child in children:
        data = _stale(child, owner)
        if data is not None:
            shutil.rmtree(child, ignore_errors=True)
            log.warning("removed %s: temp dir of a trt-gemma run (pid %s, started %s) that ended without cleaning up",
                        child, data.get("pid"), data.get("created_utc", "?"))
            swept.append(child)
    return swept


def _make_marked_dir(parent: Path, prefix: str) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    assert TEMP_NAME.match(tmp.name), f"temp dir name {tmp.name} is not one the sweep recognises"
    record = {**_owner(), "name": tmp.name, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    fd = os.open(tmp / TEMP_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(record))
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


def atomic_write(path: Path, data: str | bytes, fix: str = "choose a writable path", replace: bool = True) -> None:
    """One file written whole or not at all: a hidden temp file beside `path` (mkstemp: O_EXCL | O_NOFOLLOW, so never
    an existing entry or link), renamed over it (which replaces a link at `path`, never its target); removed on
    error. replace=False links it into place instead, which fails if anything appeared at `path` meanwhile.
    Mode 0644 as a plain open() would give under the usual umask (mkstemp makes 0600)."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        if replace:
            os.replace(tmp, path)
        else:
            _link_no_clobber(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        raise OutputError(f"{path} appeared while it was being written", fix="choose another path") from None
    except OSError as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise OutputError(f"cannot write {path}: {e.strerror or e}", fix=fix) from e


atomic_write_text = atomic_write


def _link_no_clobber(tmp: str, path: Path) -> None:
    try:
        os.link(tmp, path, follow_symlinks=False)  # FileExistsError if anything is at `path`, a link included
    except FileExistsError:
        raise
    except OSError:  # a filesystem without hard links: check, then rename
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def check_output_file(path: Path, force: bool, option: str) -> None:
    """A file the user named (`option`, e.g. --html) may be written: not a link (never written through or replaced),
    not a directory, and not an existing file unless `force`. Run it before the work, and again by
    write_output_file."""
    path = Path(path)
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link; outputs are never written through or over links",
                          fix=f"name the real file or a new path for {option}")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory", fix=f"name a file for {option}")
    if path.exists() and not force:
        raise OutputError(f"{option} {path} already exists", fix="choose another path or pass --force to replace it")


def write_output_file(path: Path, data: str | bytes, force: bool, option: str) -> None:
    """Write a file the user named, atomically, after check_output_file."""
    check_output_file(path, force, option)
    atomic_write(path, data, fix=f"choose a writable {option} path", replace=force)


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
