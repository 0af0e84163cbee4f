"""Activations inside the exported graph as extra outputs: the values Gemma Scope's SAEs and transcoders read.

A site output is (tap, layer) with `tap` one of the reference runtime's TAPS (reference/model.py), so the numpy
oracle and the graph name the same four values of block `layer`:

    resid_post         the block's output (`transformer.layers.L.mlp_residual`)
    attn_z             the attention heads' outputs, concatenated, before o_proj ([batch, seq, heads * head_size];
                       named by the export where it feeds the dense projection)
    mlp_in_normalized  the pre-feedforward RMSNorm of `transformer.layers.L.attention_residual` before its (1 + w) gain:
                       computed here (x / sqrt(mean(x^2) + eps), float32), since the graph's norm applies the gain in
                       the same node (RMSNormalization) or leaves no gain-free value to name
    mlp_out            the MLP output after the post-feedforward norm
                       (`transformer.layers.L.post_feedforward_layernorm`)

Each requested pair becomes one float32 graph output `site.L.tap` of shape [batch, sequence, width]; nothing is added
for sites not asked for. docs/scope.md says which Gemma Scope hook each tap is.
"""
from __future__ import annotations

import numpy as np

from trt_gemma.errors import ConfigError
from trt_gemma.reference.model import TAPS, tap_width


def block_tensor(layer: int, value: str) -> str:
    """Names the export gives to values of block `layer` that sites read (the export's block builder uses these)."""
    return f"transformer.layers.{layer}.{value}"


# tap -> the block tensor it is (None: built from another by `_normalized`)
TAP_TENSORS = {"resid_post": "mlp_residual", "attn_z": "attention.z", "mlp_in_normalized": None,
               "mlp_out": "post_feedforward_layernorm"}
assert set(TAP_TENSORS) == set(TAPS)


def output_name(tap: str, layer: int) -> str:
    return f"site.{layer}.{tap}"


def parse_site_outputs(outputs, num_layers: int) -> tuple[tuple[str, int], ...]:
    """(tap, layer) pairs, checked and de-duplicated in the order given."""
    seen: list[tuple[str, int]] = []
    for tap, layer in outputs:
        if tap not in TAP_TENSORS:
            raise ConfigError(f"site output {tap!r} is not one of {', '.join(TAP_TENSORS)}",
                              fix="ask for resid_post, attn_z, mlp_in_normalized or mlp_out")
        if not 0 <= int(layer) < num_layers:
            raise ConfigError(f"site output {tap} at layer {layer}: the model has layers 0..{num_layers - 1}",
                              fix=f"pick a layer between 0 and {num_layers - 1}")
        if (tap, int(layer)) not in seen:
            seen.append((tap, int(layer)))
    return tuple(seen)


def add_site_outputs(g, cfg, outputs: tuple[tuple[str, int], ...]) -> list[str]:
    """Append one float32 output per (tap, layer) to graph `g` (after the blocks are built); returns their names."""
    from trt_gemma.onnx.graph import onnx_type

    names = []
    for tap, layer in outputs:
        width = tap_width(cfg, tap)
        tensor = TAP_TENSORS[tap]
        if tensor is None:
            value = _normalized(g, block_tensor(layer, "attention_residual"), cfg.norm_epsilon)
        else:
            value = block_tensor(layer, tensor)
            if g.act != "FLOAT":
                value = g.op("Cast", value, to=onnx_type("FLOAT"))
        name = output_name(tap, layer)
        g.output(value, name, "FLOAT", ["batch", "sequence", width])
        names.append(name)
    return names


def _normalized(g, x: str, eps: float) -> str:
    """x / sqrt(mean(x^2) + eps) in float32: the reference's rms_norm with a gain of one."""
    from trt_gemma.onnx.graph import onnx_type

    x32 = x if g.act == "FLOAT" else g.op("Cast", x, to=onnx_type("FLOAT"))
    ms = g.op("ReduceMean", g.op("Mul", x32, x32), g.const([-1], np.int64), keepdims=1)
    return g.op("Div", x32, g.op("Sqrt", g.op("Add", ms, g.const(float(eps)))))
