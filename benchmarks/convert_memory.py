"""Peak memory and wall time of `convert_checkpoint` against two baselines, measured side by side in one run.

    python benchmarks/convert_memory.py [--workdir DIR] [--skip-baseline] [--keep]

1. Writes a synthetic bf16 Gemma-2-2B checkpoint (real shapes, ~5.2 GB, 3 shards + model.safetensors.index.json like
   the Hub's) with StreamingWriter; values are a tiled random block, so no minutes go into the RNG.
2. Runs, each in its own subprocess (peak RSS = the child's ru_maxrss, wall = the operation itself):
   - ours:  trt_gemma.checkpoint.convert.convert_checkpoint(..., dtype="bfloat16")  (streams, fsyncs, hashes the inputs)
   - (a) fp32 in memory: what TensorRT-LLM's converter does (docs/tensorrt-llm-contract.md §3: load the whole model,
         `flatten_params` to float32 numpy, convert into a dict of output tensors, save_file) -- needs ~17 GB, skipped
         if absent
   - (b) copy: safetensors.torch load_file + save_file per shard (numpy cannot hold bf16)
3. Prints a table with the ratios; goals (issue 3 §6): ours peak RSS <= 1.5 GB and >= 6x below (a); wall <= 1.5x (b).
Deletes every file it wrote unless --keep.
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from trt_gemma.checkpoint.config import PRESETS, ModelConfig
from trt_gemma.checkpoint.convert import FLOAT_CODEC, LINEAR, plan
from trt_gemma.checkpoint.dtypes import f32_to_bf16
from trt_gemma.checkpoint.st_io import StreamingWriter

_TILE = 1 << 22  # 4 Mi bf16 values (8 MiB) of random data, tiled over every tensor


def hf_tensor_specs(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a float Gemma 2, in module order (from the converter's mapping table)."""
    specs = []
    for job in plan(cfg):
        if job.counted:
            for name, shape in job.sources:
                names = FLOAT_CODEC.source_tensors(name, shape) if job.entry.kind == LINEAR else {name: None}
                specs += [(n, shape) for n in names]
    return specs


def write_synthetic_model(path: Path, hf_config: dict, shards: int = 3, seed: int = 0) -> int:
    """A bf16 HF Gemma 2 dir (config.json + shards + index) with random values; returns the weight bytes."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(hf_config)
    specs = hf_tensor_specs(cfg)
    sizes = [math.prod(s) * 2 for _, s in specs]
    total, budget = sum(sizes), sum(sizes) / shards
    groups: list[list[tuple[str, tuple]]] = [[] for _ in range(shards)]
    acc = 0
    for (name, shape), size in zip(specs, sizes):
        groups[min(int(acc // budget), shards - 1)].append((name, shape))
        acc += size
    rng = np.random.default_rng(seed)
    tile = f32_to_bf16(rng.standard_normal(_TILE, dtype=np.float32) * np.float32(0.02))
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
             for k in range(shards)]
    weight_map = {}
    for fname, group in zip(names, groups):
        with StreamingWriter(path / fname, [(n, "BF16", s) for n, s in group], {"format": "pt"}) as w:
            for n, s in group:
                remaining, off = math.prod(s), int(rng.integers(0, _TILE))
                while remaining:
                    take = min(remaining, _TILE - off)
                    w.write(n, tile[off:off + take])
                    remaining, off = remaining - take, 0
                weight_map[n] = fname
    if shards > 1:
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(dict(hf_config, torch_dtype="bfloat16"), indent=2))
    return total


# --- the three measured operations (each runs in a child process) -------------------------------------------------

def run_ours(model: Path, out: Path) -> None:
    from trt_gemma.checkpoint.convert import convert_checkpoint

    convert_checkpoint(model, out, dtype="bfloat16", show_progress=False)


def run_fp32_in_memory(model: Path, out: Path) -> None:
    """TensorRT-LLM's way (docs/tensorrt-llm-contract.md §3): every weight as float32 numpy,
    converted into an in-memory dict, saved."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = ModelConfig.from_file(model / "config.json")
    params = {}
    for f in sorted(model.glob("*.safetensors")):
        params.update({k: v.float().numpy() for k, v in load_file(f).items()})  # flatten_params: float32 numpy
    weights = {}

    def add(name, arr):  # add_trt_llm_weight: stored in the target dtype
        weights[name] = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.bfloat16)

    emb = params["model.embed_tokens.weight"]
    add("transformer.vocab_embedding.weight", emb)
    add("lm_head.weight", np.copy(emb))
    add("transformer.ln_f.weight", params["model.norm.weight"] + 1.0)
    for n in range(cfg.num_hidden_layers):
        s, t = f"model.layers.{n}.", f"transformer.layers.{n}."
        add(t + "attention.qkv.weight", np.concatenate([params[s + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        add(t + "attention.dense.weight", params[s + "self_attn.o_proj.weight"])
        for trt, hf in (("fc", "gate_proj"), ("gate", "up_proj"), ("proj", "down_proj")):
            add(t + f"mlp.{trt}.weight", params[s + f"mlp.{hf}.weight"])
        for trt, hf in (("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm"),
                        ("pre_feedforward_layernorm", "pre_feedforward_layernorm"),
                        ("post_feedforward_layernorm", "post_feedforward_layernorm")):
            add(t + trt + ".weight", params[s + hf + ".weight"] + 1.0)
    out.mkdir(parents=True)
    save_file(weights, out / "rank0.safetensors")


def run_copy(model: Path, out: Path) -> None:
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for f in sorted(model.glob("*.safetensors")):
        save_file(load_file(f), out / f.name, metadata={"format": "pt"})


MODES = {"ours": run_ours, "fp32_in_memory": run_fp32_in_memory, "copy": run_copy}


def child(mode: str, model: Path, out: Path) -> None:
    import trt_gemma.checkpoint.convert  # noqa: F401  imports before the baseline RSS (torch only for the baselines)

    if mode != "ours":
        import safetensors.torch  # noqa: F401

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    MODES[mode](model, out)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_rss_kb": peak, "rss_before_kb": before}))


def measure(mode: str, model: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, __file__, "--child", mode, "--model", str(model), "--out", str(out)],
                       capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if r.returncode:
        raise SystemExit(f"{mode} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mem_available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where the synthetic model goes (default: a /tmp dir)")
    ap.add_argument("--skip-baseline", action="store_true", help="skip (a), the ~17 GB fp32 in-memory baseline")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model, args.out)

    work = prepare_workdir(args.workdir)
    try:
        bench(work, args.skip_baseline)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def prepare_workdir(workdir: Path | None) -> Path:
    """A fresh temp dir under --workdir, which is created when missing; a path that cannot hold one ends the run
    with a one-line message (exit status 1), not a traceback."""
    try:
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="convert_memory-", dir=workdir))
    except OSError as e:
        sys.exit(f"error: --workdir {workdir}: {e.strerror or e} (pass a writable directory)")


def bench(work: Path, skip_baseline: bool) -> None:
    model = work / "gemma-2-2b-synthetic"
    t0 = time.perf_counter()
    size = write_synthetic_model(model, PRESETS["gemma-2-2b"], shards=3)
    print(f"synthetic gemma-2-2b bf16: {size / 1e9:.2f} GB in 3 shards, written in {time.perf_counter() - t0:.0f} s",
          flush=True)
    rows = {"copy": measure("copy", model, work / "out"), "ours": measure("ours", model, work / "out")}
    need_gb = size * 2 / 2**30 + size * 1.23 / 2**30 + 1.0  # fp32 params + bf16 outputs (+lm_head) + slack
    if skip_baseline:
        print("(a) skipped (--skip-baseline)")
    elif mem_available_gb() < need_gb:
        print(f"(a) skipped: needs ~{need_gb:.1f} GiB, {mem_available_gb():.1f} GiB available")
    else:
        rows["fp32_in_memory"] = measure("fp32_in_memory", model, work / "out")
    print_table(rows, size)


def print_table(rows: dict, size: int) -> None:
    ours = rows["ours"]
    labels = {"ours": "ours (streaming)", "fp32_in_memory": "(a) fp32 in memory", "copy": "(b) safetensors copy"}
    print(f"\n{'run':24} {'peak RSS':>10} {'wall':>8}  {'RSS vs ours':>11} {'wall vs ours':>12}")
    for mode in ("ours", "fp32_in_memory", "copy"):
        if mode in rows:
            r = rows[mode]
            print(f"{labels[mode]:24} {r['peak_rss_kb'] / 2**20:8.2f} GiB {r['wall_s']:7.1f}s  "
                  f"{r['peak_rss_kb'] / ours['peak_rss_kb']:10.1f}x {r['wall_s'] / ours['wall_s']:11.2f}x")
    rss_gb = ours["peak_rss_kb"] * 1024 / 1e9
    print(f"\nmodel {size / 1e9:.2f} GB; goals: ours peak RSS {rss_gb:.2f} GB <= 1.5 GB: {rss_gb <= 1.5}")
    if "fp32_in_memory" in rows:
        ratio = rows["fp32_in_memory"]["peak_rss_kb"] / ours["peak_rss_kb"]
        print(f"  (a)/ours peak RSS = {ratio:.1f}x >= 6x: {ratio >= 6}")
    wall = ours["wall_s"] / rows["copy"]["wall_s"]
    print(f"  ours/(b) wall = {wall:.2f}x <= 1.5x: {wall <= 1.5}")


if __name__ == "__main__":
    main()
