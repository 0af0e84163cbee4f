"""One way in: every file trt-gemma reads from an artifact (bundle, checkpoint, ONNX export, Triton repository, HF
model dir) goes through here, because artifacts travel: people copy, download and unpack them, and tarballs carry
symlinks.

Rules (Python's `tarfile` "data" filter and git's safe.directory are the spirit):
- A name read from an artifact (a manifest's `model_file`, an index's shard names) is resolved under the artifact's
  root and refused when it is absolute, has a `..` part, or resolves (through links) outside the root.
- Links inside the root are resolved and checked; a link leaving the root, a link loop (ELOOP) or a dangling link is
  an InputError naming the entry. `check_tree` applies that to a whole directory once, where a command opens it.
- JSON is read with a size cap checked on the open file before reading it (a 190 MB config.json once cost 1.8 GB of
  RSS before it was refused) and a nesting cap (deeply nested JSON otherwise ends in RecursionError).
- Copies (`copy_in`) take the content of a checked regular file and write a new file that did not exist before.

A Hugging Face hub snapshot (`.../models--org--name/snapshots/<rev>/`) is the one layout whose files are links out
of their folder by design (into `../../blobs/`): for it the root is the repo's cache folder (`hub_root`).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path, PurePath
from typing import Any

from trt_gemma.errors import InputError

JSON_MAX_BYTES = 16 << 20  # our manifests and HF configs are KBs; a Gemma tokenizer.json (17 MB) is not read here
JSON_MAX_DEPTH = 64  # Gemma configs and our manifests nest < 8 levels
DEFAULT_FIX = "re-create the artifact with trt-gemma, or copy it again from its source"
_COPY_BLOCK = 4 << 20


def hub_root(root: Path) -> Path:
    """The folder links under `root` may point into: `root` itself, or for a hub cache snapshot its repo folder."""
    root = Path(root)
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        return root.parent.parent
    return root


def _real_root(root: Path, fix: str) -> Path:
    try:
        return Path(os.path.realpath(hub_root(root), strict=True))
    except OSError as e:
        raise _os_refusal(Path(root), e, fix) from None


def _os_refusal(path: Path, e: OSError, fix: str) -> InputError:
    if e.errno == errno.ELOOP:
        return InputError(f"{path} is a symbolic link loop (or passes through one)",
                          fix=f"remove or fix the link; {fix}")
    if os.path.islink(path) and not os.path.exists(path):
        return InputError(f"{path} is a dangling symbolic link (-> {os.readlink(path)})",
                          fix=f"remove the link or restore its target inside the artifact; {fix}")
    return InputError(f"{path} cannot be read: {e.strerror or e}", fix=fix)


def _inside(real: Path, base: Path) -> bool:
    return real == base or base in real.parents


def resolve_in(root: str | os.PathLike, name: str | os.PathLike, fix: str = DEFAULT_FIX,
               source: str | os.PathLike | None = None) -> Path:
    """`root/name` with every link resolved, refused (InputError) when `name` is absolute or has a `..` part, or when
    it resolves outside `root`, through a link loop or a dangling link. `source`: the file the name was read from
    (named in the error). A missing plain entry is returned unresolved (callers test is_file() and say what is
    missing in their own words)."""
    root, rel = Path(root), PurePath(name)
    if rel.is_absolute() or ".." in rel.parts or str(name) == "":
        raise InputError(f"{source or root}: the name {str(name)!r} leaves the directory {root} (absolute, empty or "
                         "with '..')", fix=f"names inside an artifact are relative and stay under it; {fix}")
    base, path = _real_root(root, fix), root / rel
    try:
        real = Path(os.path.realpath(path, strict=True))
    except FileNotFoundError:
        for i in range(1, len(rel.parts) + 1):  # a dangling link on the way, or just a missing file?
            step = root.joinpath(*rel.parts[:i])
            if os.path.islink(step) and not os.path.exists(step):
                raise _os_refusal(step, FileNotFoundError(errno.ENOENT, "dangling"), fix) from None
        real = Path(os.path.realpath(path))
        if not _inside(real, base):
            raise _outside(path, real, root, fix) from None
        return path
    except OSError as e:
        raise _os_refusal(path, e, fix) from None
    if not _inside(real, base):
        raise _outside(path, real, root, fix)
    return real


def _outside(path: Path, real: Path, root: Path, fix: str) -> InputError:
    return InputError(f"{path} resolves to {real}, outside {root}: links and names may not leave the directory",
                      fix=f"copy the file itself into {root} (e.g. `cp -L`) if you trust it; {fix}")


def check_tree(root: str | os.PathLike, fix: str = DEFAULT_FIX) -> None:
    """Refuse a directory holding a link that leaves it, a link loop or a dangling link (anywhere below it). Run once
    where a command opens an artifact, before anything in it is read."""
    root = Path(root)
    _real_root(root, fix)

    def failed(e: OSError):
        raise _os_refusal(Path(e.filename or root), e, fix)

    for top, dirs, files in os.walk(root, onerror=failed, followlinks=False):
        for name in dirs + files:
            entry = Path(top) / name
            if os.path.islink(entry):
                resolve_in(root, entry.relative_to(root), fix)


def open_in(path: str | os.PathLike, root: str | os.PathLike | None = None, fix: str = DEFAULT_FIX):
    """A binary reader for the regular file `path`, checked under `root` (default: its own folder) by resolve_in."""
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        name = path.relative_to(root)
    except ValueError:
        raise InputError(f"{path} is not under {root}", fix=fix) from None
    real = resolve_in(root, name, fix)
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"cannot read {path}: no such file", fix=fix) from None
    except OSError as e:
        raise _os_refusal(path, e, fix) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device would block or never end
        os.close(fd)
        raise InputError(f"{path} is not a regular file", fix=fix)
    return os.fdopen(fd, "rb")


def read_json(path: str | os.PathLike, root: str | os.PathLike | None = None, fix: str = DEFAULT_FIX,
              max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """The JSON value in `path` (checked under `root`, default its own folder), refused with an InputError naming the
    file when it is missing, larger than `max_bytes` (checked before reading), nested deeper than `max_depth`, not
    UTF-8 or not JSON."""
    path = Path(path)
    with open_in(path, root, fix) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise _too_big(path, size, max_bytes, fix)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since fstat
        raise _too_big(path, len(data), max_bytes, fix)
    try:
        value = json.loads(data)
    except RecursionError:
        value, deep = None, True
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path} is not valid JSON: {e}", fix=fix) from None
    else:
        deep = _deeper_than(value, max_depth)
    if deep:
        raise InputError(f"{path} nests JSON deeper than {max_depth} levels", fix=fix)
    return value


def read_json_object(path: str | os.PathLike, root: str | os.PathLike | None = None, fix: str = DEFAULT_FIX) -> dict:
    value = read_json(path, root, fix)
    if not isinstance(value, dict):
        raise InputError(f"{path} is not a JSON object", fix=fix)
    return value


TOML_MAX_BYTES = 1 << 20  # recipes are a few hundred bytes


def read_toml(path: str | os.PathLike, root: str | os.PathLike | None = None, fix: str = DEFAULT_FIX,
              max_bytes: int = TOML_MAX_BYTES) -> dict:
    """The TOML document in `path` (checked under `root`, default its own folder): refused with an InputError naming
    the file when it is missing, larger than `max_bytes` (checked before reading) or nested too deep for the parser
    (tomllib recurses per inline table or array); a syntax error is `tomllib.TOMLDecodeError` for the caller to word."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    path = Path(path)
    with open_in(path, root, fix) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise InputError(f"{path} is {size / 2**20:.1f} MiB; TOML files are capped at {max_bytes >> 10} KiB",
                             fix=fix)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"{path} grew past {max_bytes >> 10} KiB while it was read", fix=fix)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except RecursionError:
        raise InputError(f"{path} nests TOML tables or arrays too deeply to read", fix=fix) from None


def _too_big(path: Path, size: int, cap: int, fix: str) -> InputError:
    return InputError(f"{path} is {size / 2**20:.1f} MiB; JSON files read from an artifact are capped at "
                      f"{cap / 2**20:.0f} MiB", fix=fix)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than `limit`; only containers are stacked (a flat 16 MiB array costs nothing)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > limit:
            return True
        stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (dict, list)))
    return False


def copy_in(root: str | os.PathLike, name: str | os.PathLike, dst: str | os.PathLike, link: bool = False,
            fix: str = DEFAULT_FIX) -> None:
    """Copy the content of the regular file `root/name` (checked by resolve_in) to `dst`, a new file (O_EXCL |
    O_NOFOLLOW: never written through an existing entry). link=True hard-links it instead where the filesystem
    allows (engines are GBs); the link is to the checked file, never to a symlink."""
    dst = Path(dst)
    with open_in(Path(root) / name, root, fix) as src:
        real = Path(os.path.realpath(Path(root) / name))
        if link:
            try:
                os.link(real, dst, follow_symlinks=False)
                return
            except OSError:
                pass
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(src, out, _COPY_BLOCK)
    shutil.copystat(real, dst, follow_symlinks=False)
