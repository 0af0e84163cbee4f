"""safetensors reading and *streaming* writing without loading whole files.

Format (documented by safetensors): 8-byte little-endian header length N, N bytes of JSON header
{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}, then raw little-endian data.
`save_file` needs every tensor in memory at once; `StreamingWriter` writes the header from the known shapes first,
then each tensor's bytes in order, so peak memory is one tensor (or one row block of it).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trt_gemma.checkpoint.dtypes import ST_DTYPES
from trt_gemma.errors import InputError, OutputError

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorExpect:
    """What a source tensor must look like: its shape and the safetensors dtypes accepted for it."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...] = FLOAT_DTYPES


_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensors, metadata). Truncation/corruption -> InputError."""
    path = Path(path)
    fix = f"re-download or re-create {path.name}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise InputError(f"{path}: file is truncated (shorter than the 8-byte header length)", fix=fix)
            (n,) = struct.unpack("<Q", raw_len)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(f"{path}: header length {n} exceeds the file size {size} (truncated or not "
                                 "a safetensors file)", fix=fix)
            header = json.loads(f.read(n))
    except FileNotFoundError as e:
        raise InputError(f"{path} not found", fix=fix) from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: deeply nested
        raise InputError(f"{path}: header is not valid JSON ({e})", fix=fix) from None
    except OSError as e:  # a directory named *.safetensors, no read permission, I/O error
        raise InputError(f"cannot read {path}: {e.strerror}", fix="check the file and its permissions") from e
    if not isinstance(header, dict):
        raise InputError(f"{path}: header is not a JSON object", fix=fix)
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(s) for s in h["shape"]), map(int, h["data_offsets"])
        except (KeyError, TypeError, ValueError) as ex:
            raise InputError(f"{path}: tensor {name!r} has a malformed header entry", fix=fix) from ex
        if dtype not in ST_DTYPES:
            raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype}", fix=fix)
        expect = math.prod(shape) * ST_DTYPES[dtype].itemsize
        if e - b != expect or b < 0 or any(s < 0 for s in shape):
            raise InputError(f"{path}: tensor {name!r} byte range {b}..{e} does not match shape {list(shape)} "
                             f"{dtype}", fix=fix)
        if base + e > size:
            raise InputError(f"{path}: tensor {name!r} ends at byte {base + e} but the file has {size} bytes "
                             "(truncated)", fix=fix)
        tensors[name] = TensorInfo(name, dtype, shape, base + b, base + e)
    return tensors, meta


def read_tensor(path: Path, info: TensorInfo, rows: slice | None = None) -> np.ndarray:
    """Read one tensor (or a block of its leading rows) as its storage dtype (bf16 as uint16, fp8 as uint8)."""
    dt = ST_DTYPES[info.dtype]
    shape = info.shape
    begin, count = info.begin, math.prod(shape)
    if rows is not None:
        start, stop, _ = rows.indices(shape[0])
        row = math.prod(shape[1:])
        begin += start * row * dt.itemsize
        count = (stop - start) * row
        shape = (stop - start,) + tuple(shape[1:])
    with open(path, "rb") as f:
        f.seek(begin)
        buf = f.read(count * dt.itemsize)
    if len(buf) != count * dt.itemsize:
        raise InputError(f"{path}: tensor {info.name!r} is truncated", fix=f"re-download {Path(path).name}")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


class StreamingWriter:
    """Write a safetensors file tensor by tensor. Declare every (name, dtype, shape) up front; then `write` each,
    in the declared order, possibly in several row blocks. `close` checks every byte was written."""

    def __init__(self, path: Path, specs: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {}
        offset = 0
        self._order: list[tuple[str, int]] = []
        for name, dtype, shape in specs:
            nbytes = math.prod(shape) * ST_DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors itself does
        self._dtypes = {name: dtype for name, dtype, _ in specs}
        self._total = offset
        self._idx, self._written_in_current = 0, 0
        try:
            self._f = open(self.path, "wb")
            self._f.write(struct.pack("<Q", len(raw)) + raw)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror}", fix="check free space and permissions") from e

    def write(self, name: str, data: np.ndarray) -> None:
        """Append `data` (storage dtype, C order) to tensor `name` (the current one in declaration order)."""
        if self._idx >= len(self._order):
            raise AssertionError(f"{self.path}: no tensor left to write for {name!r}")
        cur, nbytes = self._order[self._idx]
        assert name == cur, f"tensors must be written in declared order: expected {cur!r}, got {name!r}"
        expected_dtype = ST_DTYPES[self._dtypes[name]]
        assert data.dtype == expected_dtype, f"{name}: dtype {data.dtype} != declared {expected_dtype}"
        buf = memoryview(np.ascontiguousarray(data)).cast("B")  # no extra copy of the block
        assert self._written_in_current + len(buf) <= nbytes, f"{name}: more bytes than its declared shape"
        try:
            self._f.write(buf)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror}", fix="check free space") from e
        self._written_in_current += len(buf)
        if self._written_in_current == nbytes:
            self._idx, self._written_in_current = self._idx + 1, 0

    def close(self) -> None:
        done = self._idx == len(self._order)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        assert done, f"{self.path}: closed before every declared tensor was written"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
