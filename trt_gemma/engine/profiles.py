"""Optimization profiles for a TensorRT engine, read from the ONNX graph's own inputs and sized from the recipe.

A decoder graph with a KV cache has four kinds of dynamic dimension: batch, new tokens (input_ids [batch, new]), past
tokens (past KV [batch, kv_heads, past, head_dim]) and total tokens (an attention mask [batch, past + new]). Each is
recognised by its symbolic name first (`batch_size`, `sequence_length`, `past_sequence_length`,
`total_sequence_length` are the onnxruntime / Optimum spellings), else by the input's name and the axis. Anything left
unclassified is an error naming the input and axis: a guessed profile would build an engine that refuses real shapes.

Two profiles, as TensorRT Edge-LLM builds its LLM engines (a prefill and a decode profile over one network):
- prefill: new 1..max_input_len tokens on a cache of 0..(max_seq_len - max_input_len) tokens (0 = a fresh prompt);
- decode: 1 new token on a cache of 1..max_seq_len-1 tokens.
Decode takes batch 1..max_batch_size; prefill 1..max_num_tokens // max_input_len prompts (at most max_batch_size),
because the graph returns logits for every prompt token; both are optimised for batch 1 (one user per edge device is
the common case).
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from trt_gemma.errors import InputError

ROLES = ("batch", "new", "past", "total", "slots", "capacity")
# symbolic dimension name -> role; first match wins (so "past_sequence_length" is past, not new)
DIM_NAME_ROLES: tuple[tuple[str, str], ...] = (
    (r"batch", "batch"),
    (r"slot", "slots"),  # the KV pool's slots (pool layout: past_key_values [slots, kv_heads, capacity, head_dim])
    (r"capacity", "capacity"),  # positions per slot of that pool
    (r"past|cache|history", "past"),
    (r"total|present|all_len|kv_len|attn_len|attention_len|key_len", "total"),
    (r"seq|new|len|token|query|step", "new"),
)
# (input name pattern, {axis: role}) for dimensions without a usable symbolic name; first match wins
INPUT_AXIS_ROLES: tuple[tuple[str, dict[int, str]], ...] = (
    (r"past|cache|key|value", {0: "batch", 2: "past"}),
    (r"mask", {0: "batch", 1: "total"}),
    (r"input_ids|position|token|ids", {0: "batch", 1: "new"}),
)


@dataclass(frozen=True)
class GraphInput:
    name: str
    dtype: str  # ONNX element type name (FLOAT16, INT64, ...)
    dims: tuple  # int for a fixed size, a role name for a dynamic one


@dataclass(frozen=True)
class Limits:
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int | None = None  # tokens one prefill step may hold (None: max_batch_size full prompts)

    @classmethod
    def from_recipe(cls, recipe) -> "Limits":
        return cls(recipe.max_batch_size, recipe.max_input_len, recipe.max_seq_len, recipe.max_num_tokens)

    @property
    def prefill_batch(self) -> int:
        """Prompts one prefill step may hold: a prefill step's activations grow with every prompt token, so the token
        budget (not the decode batch) bounds prefill."""
        if self.max_num_tokens is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_num_tokens // self.max_input_len))


def _role_from_name(dim_name: str) -> str | None:
    low = dim_name.lower()
    return next((role for pattern, role in DIM_NAME_ROLES if re.search(pattern, low)), None)


def _role_from_axis(input_name: str, axis: int) -> str | None:
    low = input_name.lower()
    for pattern, axes in INPUT_AXIS_ROLES:
        if re.search(pattern, low):
            return axes.get(axis)
    return None


def graph_inputs(onnx_path: str | Path) -> list[GraphInput]:
    """The graph's inputs (initializers excluded) with every dynamic dimension classified."""
    import onnx

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # OSError, protobuf DecodeError, ...: all mean the file is not a model we can read
        raise InputError(f"{onnx_path} is not a readable ONNX model: {e}",
                         fix="export it again with `trt-gemma export-onnx`") from None
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims: list[int | str] = []
        for axis, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
                continue
            role = (_role_from_name(d.dim_param) if d.dim_param else None) or _role_from_axis(vi.name, axis)
            if role is None:
                raise InputError(f"{onnx_path}: input {vi.name!r} axis {axis} ({d.dim_param or 'unnamed'}) is dynamic "
                                 "but is neither batch, new, past nor total tokens",
                                 fix="name the dimension batch_size / sequence_length / past_sequence_length / "
                                     "total_sequence_length in the exporter, or fix its size")
            dims.append(role)
        out.append(GraphInput(vi.name, onnx.TensorProto.DataType.Name(tt.elem_type), tuple(dims)))
    if not any(isinstance(d, str) for gi in out for d in gi.dims):
        raise InputError(f"{onnx_path} has no dynamic input dimension: one engine could not serve prefill and decode",
                         fix="export with dynamic batch / sequence / past-length dimensions")
    return out


def role_ranges(limits: Limits) -> dict[str, dict[str, tuple[int, int, int]]]:
    """{profile: {role: (min, opt, max)}} for the two profiles."""
    b, n, s = limits.max_batch_size, limits.max_input_len, limits.max_seq_len
    if not 1 <= n <= s or b < 1:
        raise InputError(f"limits max_batch_size={b}, max_input_len={n}, max_seq_len={s} cannot make a profile",
                         fix="use max_batch_size >= 1 and 1 <= max_input_len <= max_seq_len")
    prefill_past = s - n
    opt_new = max(1, n // 2)
    decode_past = max(1, s - 1)
    opt_past = min(decode_past, max(1, s // 2))
    pool = {"slots": (1, b, b), "capacity": (1, s, s)}  # one pool of max_batch_size x max_seq_len, either profile
    return {
        "prefill": {"batch": (1, 1, limits.prefill_batch), "new": (1, opt_new, n), "past": (0, 0, prefill_past),
                    "total": (1, opt_new, n + prefill_past), **pool},
        "decode": {"batch": (1, 1, b), "new": (1, 1, 1), "past": (1, opt_past, decode_past),
                   "total": (2, opt_past + 1, decode_past + 1), **pool},
    }


def profiles(inputs: list[GraphInput], limits: Limits) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """{profile: {input: (min_shape, opt_shape, max_shape)}} for every input with a dynamic dimension."""
    out = {}
    for prof, ranges in role_ranges(limits).items():
        shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
        for gi in inputs:
            if not any(isinstance(d, str) for d in gi.dims):
                continue
            shapes[gi.name] = tuple(tuple(d if isinstance(d, int) else ranges[d][k] for d in gi.dims)
                                    for k in range(3))
        out[prof] = shapes
    return out


def _shape_arg(shape: tuple) -> str:
    return "[" + ",".join(str(x) for x in shape) + "]"


def polygraphy_commands(onnx_path: str | Path, engine_path: str | Path, inputs: list[GraphInput],
                        limits: Limits, builder: str, work_dir: str | Path, atol: float = 1e-2,
                        rtol: float = 1e-2) -> list[str]:
    """The exact commands that compare the engine with onnxruntime on the device: onnxruntime runs the ONNX graph on
    one prefill-shaped input set and saves inputs and outputs; the engine is run on the same inputs and compared.
    With TensorRT-RTX polygraphy needs POLYGRAPHY_USE_TENSORRT_RTX=1."""
    prefill = profiles(inputs, limits)["prefill"]
    shapes = [f"{name}:{_shape_arg(shape[1])}" for name, shape in prefill.items()]
    work = Path(work_dir)
    ins, outs = work / "polygraphy_inputs.json", work / "polygraphy_onnxrt_outputs.json"
    # masks all ones (polygraphy's default random 0/1 could mask a whole row and make both sides NaN)
    masks = [f"{gi.name}:[1,1]" for gi in inputs if "mask" in gi.name.lower() and gi.name in prefill]
    first = ["polygraphy", "run", str(onnx_path), "--onnxrt", "--input-shapes", *shapes,
             *(["--val-range", *masks] if masks else []), "--save-inputs", str(ins), "--save-outputs", str(outs)]
    second = ["polygraphy", "run", str(engine_path), "--model-type", "engine", "--trt",
              "--load-inputs", str(ins), "--load-outputs", str(outs), "--atol", str(atol), "--rtol", str(rtol)]
    env = "POLYGRAPHY_USE_TENSORRT_RTX=1 " if builder == "tensorrt_rtx" else ""
    return [shlex.join(first), env + shlex.join(second)]
