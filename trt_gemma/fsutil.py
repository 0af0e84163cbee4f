"""Write outputs atomically: build in a temp dir beside OUT, rename at the end, never leave half a result."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from trt_gemma.errors import OutputError


def check_output_target(out: Path, force: bool) -> None:
    """Refuse early (before any expensive work) when OUT exists without --force or its parent is unwritable."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputError(f"output {out} already exists", fix="choose another path or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory", fix="remove it or choose another path")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputError(f"cannot write to {parent} (permission denied)", fix="choose a writable output path")


@contextlib.contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out`; on success it replaces `out`, on any error it is deleted.

    The temp dir lives in the same parent so the final step is a rename on one filesystem.
    """
    out = Path(out)
    check_output_target(out, force)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot create output in {parent}: {e.strerror}", fix="choose a writable output path") from e
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
