"""Streaming export: `export-onnx` of a model much larger than one row block must not grow by the model's size.

Two synthetic INT4-AWQ checkpoints written by benchmarks/cpu_decode.py (StreamingWriter, random codes) differ only
in their vocabulary (4096 vs 65536 rows of a bf16 [vocab, 1024] embedding, +120 MiB); each is exported with
`--lm-head int4` (the embedding copied and quantized a second time, transposed) in its own process, whose peak RSS
(VmHWM) the --json summary reports. Holding the embedding, or the quantized head, would add >= 110 MiB.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import tiny_config

pytest.importorskip("onnx", reason="the ONNX route needs the onnx extra: pip install '.[onnx]'")
BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_decode.py"
SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128)


def _bench_module():
    spec = importlib.util.spec_from_file_location("cpu_decode", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _export_peak(ckpt: Path, out: Path) -> int:
    r = subprocess.run([sys.executable, "-m", "trt_gemma", "export-onnx", str(ckpt), str(out), "--lm-head", "int4",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["peak_rss_bytes"]


def test_export_peak_rss_does_not_grow_with_the_model(tmp_path):
    bench = _bench_module()
    small = bench.write_synthetic_awq(tmp_path / "small", tiny_config(vocab_size=4096, **SHAPE))
    big = bench.write_synthetic_awq(tmp_path / "big", tiny_config(vocab_size=65536, **SHAPE))
    assert big - small > 110 * 2**20
    growth = _export_peak(tmp_path / "big", tmp_path / "o-big") - _export_peak(tmp_path / "small", tmp_path / "o-small")
    assert growth < (big - small) / 4, (f"export peak RSS grew by {growth / 2**20:.1f} MiB for a "
                                        f"{(big - small) / 2**20:.0f} MiB larger checkpoint")
