"""Streaming: converting a model much larger than one row block must not grow the process by the model's size.

Measured as ru_maxrss growth of a child process across the conversion (imports done before), on a synthetic bf16
model with a 65536 x 1024 embedding written by benchmarks/convert_memory.py (StreamingWriter, no torch).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

from tiny import tiny_config

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_memory.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("convert_memory", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_rss_growth_is_far_below_model_size(tmp_path):
    bench = _bench_module()
    cfg = tiny_config(vocab_size=65536, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=128, query_pre_attn_scalar=128)
    model_bytes = bench.write_synthetic_model(tmp_path / "m", cfg, shards=2)
    assert model_bytes > 180 * 2**20
    r = subprocess.run([sys.executable, str(BENCH), "--child", "ours", "--model", str(tmp_path / "m"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    growth = (rec["peak_rss_kb"] - rec["rss_before_kb"]) * 1024
    out_bytes = sum(p.stat().st_size for p in (tmp_path / "out").glob("rank*.safetensors"))
    assert out_bytes > model_bytes  # the lm_head copy is written too
    assert growth < model_bytes / 4, (f"peak RSS grew by {growth / 2**20:.1f} MiB converting a "
                                      f"{model_bytes / 2**20:.0f} MiB model")


def test_workdir_is_created_or_refused_cleanly(tmp_path):
    """`--workdir DIR` with a DIR that does not exist once ended in a FileNotFoundError traceback."""
    bench = _bench_module()
    work = bench.prepare_workdir(tmp_path / "new" / "nested")
    assert work.is_dir() and work.parent == tmp_path / "new" / "nested"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, str(BENCH), "--workdir", str(blocker / "sub"), "--skip-baseline"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"error: --workdir {blocker / 'sub'}" in r.stderr
