"""The local cache of derived models: HF dir -> converted checkpoint (`checkpoints/`), checkpoint -> onnxruntime
export (`onnx/`) and exports with activation outputs (`onnx-sites/`), under $TRT_GEMMA_CACHE (default
~/.cache/trt_gemma).

One entry per content key. An entry is named `<source dir name>-<key>`, the key a sha256 over a seed (our version and
the export options) and the *contents* of the source's files — not their paths or mtimes, so the embedded model is
cached once whether the package was installed from a wheel or in editable mode, and rebuilding the same bundle finds
its export again. A file's hash is remembered by (path, size, mtime) in `.hashes.json`, so a multi-GB model is read
once, not on every load.

Entries are used least-recently first out: each use touches the entry dir's mtime, and adding one evicts the oldest
others until the cache fits `TRT_GEMMA_CACHE_MAX` (default 2 GB; `2G`, `500M`, `0` or a byte count). An entry being
written (its lock held) is never evicted. `trt-gemma cache ls|prune` shows and trims it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from trt_gemma.errors import ConfigError, OutputError
from trt_gemma.fsutil import atomic_write, sha256_file

NAMESPACES = ("checkpoints", "onnx", "onnx-sites")  # onnx-sites: runtime/sites.py's exports with activation outputs
MAX_ENV = "TRT_GEMMA_CACHE_MAX"
DEFAULT_MAX_BYTES = 2 * 10**9
HASHES = ".hashes.json"
HASHES_KEPT = 512  # remembered file hashes (the oldest are forgotten first)
LOCKS = ".locks"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def cache_root() -> Path:
    return Path(os.environ.get("TRT_GEMMA_CACHE", Path.home() / ".cache" / "trt_gemma"))


def parse_size(text: str, what: str = MAX_ENV) -> int:
    """'2G' / '500MB' / '1.5GiB' / '0' / '123456' -> bytes (decimal units, binary with an i)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what}={text!r} is not a size", fix=f"use a byte count or e.g. 2G, 500M, 0 ({what})")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def max_bytes() -> int:
    value = os.environ.get(MAX_ENV)
    return DEFAULT_MAX_BYTES if value in (None, "") else parse_size(value)


# --- content keys ------------------------------------------------------------------------------------------------

def file_sha256(path: Path, root: Path) -> str:
    """sha256 of `path`'s bytes, remembered in root/.hashes.json by (resolved path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    memo_file = Path(root) / HASHES
    memo = _read_json(memo_file)
    hit = memo.get(str(path))
    if isinstance(hit, list) and hit[:2] == stamp and len(hit) == 3:
        return hit[2]
    digest = sha256_file(path)
    memo.pop(str(path), None)
    memo[str(path)] = [*stamp, digest]  # insertion order = age: the oldest are dropped first
    _write_json(memo_file, dict(list(memo.items())[-HASHES_KEPT:]))
    return digest


def content_key(seed: str, files: list[Path], root: Path) -> str:
    h = hashlib.sha256(seed.encode())
    for f in sorted(files, key=lambda p: p.name):
        h.update(f"{f.name}:{file_sha256(f, root)}\n".encode())
    return h.hexdigest()[:16]


def entry_path(namespace_dir: Path, src: Path, seed: str, files: list[Path]) -> Path:
    """namespace_dir/<src name>-<content key>; hashes are remembered in the cache root (namespace_dir's parent)."""
    return Path(namespace_dir) / f"{Path(src).resolve().name}-{content_key(seed, files, Path(namespace_dir).parent)}"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    """Best effort (a lost memo costs one re-hash), written whole by fsutil.atomic_write (never through a link)."""
    with contextlib.suppress(OSError, OutputError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data))


# --- locking, use, eviction --------------------------------------------------------------------------------------

@contextlib.contextmanager
def entry_lock(entry: Path, blocking: bool = True):
    """One writer per cache entry across threads and processes (`serve --guard default` loads the chat model and
    the guard, the same model, at once): an exclusive flock on `.locks/<entry>.lock` beside it (huggingface_hub
    keeps its cache locks the same way). Non-blocking: yields False when another holder has it."""
    locks = entry.parent / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{entry.name}.lock", "a") as f:  # each opener gets its own lock (flock is per open file)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def touch(entry: Path) -> None:
    """Mark `entry` used now (its dir mtime is the LRU clock)."""
    with contextlib.suppress(OSError):
        os.utime(entry)


def admit(entry: Path, *in_use: Path) -> None:
    """`entry` was just made or reused: mark it used, then evict the least recently used others over the cap (never
    `entry` nor what it was made from, `in_use`)."""
    touch(entry)
    prune(Path(entry).parent.parent, max_bytes(), keep={Path(p).resolve() for p in (entry, *in_use)})


@dataclass
class Entry:
    namespace: str
    name: str
    path: str
    bytes: int
    last_used_utc: str
    last_used: float


def entries(root: Path | None = None) -> list[Entry]:
    """Every finished entry, least recently used first (temp dirs, locks and the hash memo are not entries)."""
    root = Path(root) if root is not None else cache_root()
    out = []
    for ns in NAMESPACES:
        d = root / ns
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") or p.is_symlink() or not p.is_dir():
                continue
            with contextlib.suppress(OSError):  # removed meanwhile by another process
                used = p.stat().st_mtime
                out.append(Entry(ns, p.name, str(p), dir_bytes(p), time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime(used)), used))
    return sorted(out, key=lambda e: e.last_used)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def prune(root: Path | None = None, cap: int | None = None,
          keep: frozenset[Path] | set[Path] = frozenset()) -> list[Entry]:
    """Remove least-recently-used entries until the cache holds at most `cap` bytes (None: the configured cap);
    entries in `keep` and entries whose lock another process holds stay. Returns the removed entries."""
    root = Path(root) if root is not None else cache_root()
    cap = max_bytes() if cap is None else cap
    found = entries(root)
    total = sum(e.bytes for e in found)
    removed = []
    for e in found:
        if total <= cap:
            break
        p = Path(e.path)
        if p.resolve() in keep:
            continue
        with entry_lock(p, blocking=False) as mine:
            if not mine:
                continue
            shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(OSError):
            (p.parent / LOCKS / f"{p.name}.lock").unlink()
        total -= e.bytes
        removed.append(e)
    return removed


def summary(root: Path | None = None) -> dict:
    """`trt-gemma cache ls`: the entries (least recently used first), their total and the cap."""
    root = Path(root) if root is not None else cache_root()
    found = entries(root)
    return {"root": str(root), "max_bytes": max_bytes(), "total_bytes": sum(e.bytes for e in found),
            "entries": [{k: v for k, v in asdict(e).items() if k != "last_used"} for e in found]}
