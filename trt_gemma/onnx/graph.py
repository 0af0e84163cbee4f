"""A small ONNX graph builder that streams initializers to one external-data file.

`onnx.helper` builds the nodes; the weights never sit in the ModelProto: each initializer's bytes are appended to
`<model>.onnx.data` as soon as they are made and the TensorProto only records (location, offset, length), the
documented external-data layout (onnx/onnx/docs/ExternalData.md). Peak memory is therefore one tensor (or one row
block of a big one, through `reserve` + `write_at`), not the model. Tiny tensors (shapes, scalars) stay inline.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

INLINE_MAX = 1024  # bytes: smaller tensors live in the .onnx file itself
PAGE = 4096  # big tensors start on a page boundary, so a runtime may mmap them

NP_TO_ONNX = {np.dtype("float32"): "FLOAT", np.dtype("float16"): "FLOAT16", np.dtype("int64"): "INT64",
              np.dtype("int32"): "INT32", np.dtype("int8"): "INT8", np.dtype("bool"): "BOOL"}
# activation dtype -> ONNX element type; bfloat16 is stored as its uint16 bit pattern (numpy has no bfloat16)
ACTIVATION_TYPES = {"float32": "FLOAT", "float16": "FLOAT16", "bfloat16": "BFLOAT16"}


def to_storage(arr, elem: str) -> np.ndarray:
    """float32 values -> the numpy array holding them as ONNX element type `elem` (FLOAT, FLOAT16, BFLOAT16)."""
    arr = np.asarray(arr, np.float32)
    if elem == "BFLOAT16":
        from trt_gemma.checkpoint.dtypes import f32_to_bf16

        return f32_to_bf16(arr)
    return arr.astype(np.float16 if elem == "FLOAT16" else np.float32)


def onnx_type(name: str) -> int:
    from onnx import TensorProto

    return getattr(TensorProto, name)


class Graph:
    """Nodes, value names and initializers of one graph. `op` returns the output name(s) of the node it adds."""

    def __init__(self, data_path: Path, act: str = "FLOAT", opset: int = 21):
        self.act = act  # ONNX element type of the activations (FLOAT, FLOAT16, BFLOAT16)
        self.opset = opset  # which operators the builders may use (e.g. RMSNormalization from 23)
        self.nodes: list = []
        self.initializers: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self.data_path = Path(data_path)
        self._data = open(self.data_path, "wb")
        self.offset = 0
        self.external_bytes = 0

    # ---- nodes ----
    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, name: str | None = None, **attrs):
        from onnx import helper

        self._count += 1
        base = name or f"{op_type.lower()}_{self._count}"
        outs = outputs if isinstance(outputs, list) else [f"{base}" if outputs == 1 else f"{base}:{i}"
                                                          for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{base}/{op_type}", **attrs))
        return outs[0] if len(outs) == 1 else outs

    # ---- graph I/O ----
    def input(self, name: str, elem: str, shape: list) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, onnx_type(elem), shape))
        return name

    def output(self, value: str, name: str, elem: str, shape: list) -> None:
        from onnx import helper

        if value != name:
            self.op("Identity", value, outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, onnx_type(elem), shape))

    # ---- constants and weights ----
    def const(self, value, dtype=np.float32) -> str:
        """A small inline constant, shared by value (one int64 [2] shape tensor serves every layer)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def fconst(self, value) -> str:
        """A small float constant in the activation type (float32 in a float32 graph: the same as `const`)."""
        if self.act == "FLOAT":
            return self.const(value)
        arr = to_storage(value, self.act)
        key = (self.act, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.tensor(f"const_{len(self._consts)}", arr, self.act)
        return self._consts[key]

    def ftensor(self, name: str, arr: np.ndarray) -> str:
        """A float32 array as an initializer in the activation type (norm weights, rotary tables, scales)."""
        return self.tensor(name, to_storage(arr, self.act), self.act, np.shape(arr))

    def to_act(self, x: str, name: str | None = None) -> str:
        """Cast a float32 value to the activation type (no node in a float32 graph)."""
        return x if self.act == "FLOAT" else self.op("Cast", x, to=onnx_type(self.act), name=name)

    def tensor(self, name: str, arr: np.ndarray, elem: str | None = None, dims: tuple | None = None) -> str:
        """An initializer from a numpy array. `elem`/`dims` override the type and shape for storage arrays whose
        numpy dtype is not the ONNX one (bfloat16 as uint16, float8 as uint8, packed int4 as uint8)."""
        arr = np.ascontiguousarray(arr)
        elem = elem or NP_TO_ONNX[arr.dtype]
        dims = tuple(arr.shape) if dims is None else tuple(dims)
        raw = memoryview(arr).cast("B") if arr.size else b""
        if len(raw) <= INLINE_MAX:
            from onnx import helper

            self.initializers.append(helper.make_tensor(name, onnx_type(elem), dims, bytes(raw), raw=True))
            return name
        offset = self.reserve(name, elem, dims, len(raw))
        self.write_at(offset, raw)
        return name

    def reserve(self, name: str, elem: str, dims: tuple, nbytes: int) -> int:
        """Declare an external initializer of `nbytes` and return its file offset; fill it with `write_at`
        (e.g. column blocks of a transposed matrix). The region is zero until written."""
        from onnx import TensorProto

        self.offset += -self.offset % PAGE
        t = TensorProto()
        t.name, t.data_type = name, onnx_type(elem)
        t.dims.extend(int(d) for d in dims)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.initializers.append(t)
        start = self.offset
        self.offset += nbytes
        self.external_bytes += nbytes
        self._data.truncate(self.offset)
        return start

    def write_at(self, offset: int, data) -> None:
        os.pwrite(self._data.fileno(), data, offset)

    def write_strided(self, offset: int, row_bytes: int, col_offset: int, block: np.ndarray) -> None:
        """Write `block` (rows x bytes) into columns [col_offset, col_offset + block.shape[1]) of a row-major byte
        matrix with `row_bytes` per row starting at `offset`: how a transposed matrix is filled block by block."""
        block = np.ascontiguousarray(block).view(np.uint8).reshape(block.shape[0], -1)
        fd = self._data.fileno()
        for r in range(block.shape[0]):
            os.pwrite(fd, block[r].data, offset + r * row_bytes + col_offset)

    def close_data(self) -> None:
        if not self._data.closed:
            self._data.flush()
            os.fsync(self._data.fileno())
            self._data.close()

    def model(self, name: str, doc: str, metadata: dict[str, str]):
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, initializer=self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  producer_name="trt_gemma", doc_string=doc)
        helper.set_model_props(model, metadata)
        return model
