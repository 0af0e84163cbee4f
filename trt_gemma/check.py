"""`trt-gemma check BUNDLE`: on the device, does the engine compute what its graph computes, as fast and as small
as the plan said?

Two sides run the same fixed prompts greedily: the engine (the side under test) and onnxruntime's CPU provider on the
bundle's own ONNX graph (the oracle: same weights, same operators, an independent runtime). Per prompt the greedy ids
are compared — the first divergence is reported with both sides' top-5 there, so a near-tie reads as one — and the
last-position logits of every step up to it give max |Δ| against a tolerance for the graph's activation precision.
Then time to first token and decode tok/s at batch 1 and at the recipe's max batch, against the plan's roofline, and
the device memory in use (NVML, or NvMap/meminfo on a Jetson) against the plan's prediction.

A side is anything with `name`, `new_cache(capacity)` and `forward(ids, cache, last_only=True) -> [1, vocab]` (the
reference model, `OrtModel`, the TensorRT backend's step model), so the comparison runs on a CPU host with two CPU
sides, and the engine side plugs in on the device (`engine_side`).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from trt_gemma.errors import InputError, NeedsDeviceError
from trt_gemma.safe_io import read_json_object

# Fixed prompts: plain, code, a list, a question; short enough for any recipe's max_input_len.
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Three things to pack for a hike:\n1.",
           "Q: Why is the sky blue?\nA:")
MAX_TOKENS = 24
TOP_K = 5
# max |Δ| of last-position logits (Gemma 2 soft-caps them to ±30) between an engine and onnxruntime CPU on the same
# graph: fp32 differs by accumulation order only; fp16/bf16 by one rounding per op (~2^-11 / 2^-8 relative) over
# ~10^2 ops a layer; INT4/FP8 weights are dequantized identically on both sides, so the activation dtype decides.
TOLERANCE = {"float32": 1e-2, "float16": 0.25, "bfloat16": 1.0}


class StepModel(Protocol):
    def new_cache(self, capacity: int = 512): ...

    def forward(self, ids, cache=None, last_only: bool = False) -> np.ndarray: ...


@dataclass
class Side:
    name: str
    model: StepModel


@dataclass
class Trace:
    """One greedy run: ids, per step the logits it chose from (top-k) and the full last-position logits."""

    ids: list[int] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    logits: list[np.ndarray] = field(default_factory=list)
    ttft_s: float = 0.0
    decode_s: float = 0.0


def greedy(side: Side, prompt: list[int], max_tokens: int) -> Trace:
    """Prompt in one step (its last position's logits pick the first token), then one token per step."""
    t = Trace()
    cache = side.model.new_cache(len(prompt) + max_tokens)
    t0 = time.perf_counter()
    row = side.model.forward(np.array([prompt]), cache, last_only=True)[-1]
    t.ttft_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for step in range(max_tokens):
        row = np.asarray(row, np.float32)
        top = np.argsort(-row, kind="stable")[:TOP_K]
        t.ids.append(int(top[0]))
        t.top.append([(int(i), float(row[i])) for i in top])
        t.logits.append(row)
        if step + 1 < max_tokens:
            row = side.model.forward(np.array([[t.ids[-1]]]), cache, last_only=True)[-1]
    t.decode_s = time.perf_counter() - t1
    return t


def compare(test: Trace, oracle: Trace, tolerance: float) -> dict:
    """Ids, first divergence with both top-5s, and max |Δ| of the logits over the steps both sides saw the same
    inputs (up to and including the first divergence)."""
    n = min(len(test.ids), len(oracle.ids))
    first = next((i for i in range(n) if test.ids[i] != oracle.ids[i]), None)
    upto = n if first is None else first + 1
    diff = max(float(np.abs(test.logits[i] - oracle.logits[i]).max()) for i in range(upto))
    out = {"ids_equal": first is None and len(test.ids) == len(oracle.ids), "steps": n,
           "logits_max_abs_diff": diff, "tolerance": tolerance, "within_tolerance": diff <= tolerance,
           "first_divergence": None}
    if first is not None:
        out["first_divergence"] = {"step": first, "ids": [test.ids[first], oracle.ids[first]],
                                   "top5": [test.top[first], oracle.top[first]]}
    return out


def batch_tok_s(side: Side, prompts: list[list[int]], max_tokens: int) -> float:
    """Aggregate decode tok/s of `len(prompts)` sequences advanced in turn, one token each per round. A side whose
    model batches (the TensorRT backend's step loop) advances them in one step; one that does not shows here what
    interleaving costs it. A model with its own `batch_tok_s(prompts, max_tokens)` measures itself."""
    own = getattr(side.model, "batch_tok_s", None)
    if own is not None:
        return own(prompts, max_tokens)
    caches = [side.model.new_cache(len(p) + max_tokens) for p in prompts]
    last = [int(np.argmax(side.model.forward(np.array([p]), c, last_only=True)[-1])) for p, c in zip(prompts, caches)]
    t0 = time.perf_counter()
    for _ in range(max_tokens - 1):
        for i, c in enumerate(caches):
            last[i] = int(np.argmax(side.model.forward(np.array([[last[i]]]), c, last_only=True)[-1]))
    seconds = time.perf_counter() - t0
    return round(len(prompts) * (max_tokens - 1) / seconds, 2) if seconds > 0 else float("inf")


def run_check(test: Side, oracle: Side, prompts: list[list[int]], *, precision: str, max_batch: int, plan: dict,
              device_used: int | None, max_tokens: int = MAX_TOKENS) -> dict:
    """The whole report (what check.json holds); `ok` is False on any id mismatch or logits beyond tolerance."""
    if precision not in TOLERANCE:
        raise InputError(f"no logits tolerance for activation dtype {precision!r}",
                         fix=f"export the graph in one of {', '.join(TOLERANCE)}")
    tol = TOLERANCE[precision]
    rows, traces = [], []
    for p in prompts:
        a, b = greedy(test, p, max_tokens), greedy(oracle, p, max_tokens)
        traces.append(a)
        rows.append({"prompt_tokens": len(p), **compare(a, b, tol)})
    decode = [t.decode_s for t in traces]
    batch1 = {"ttft_s": round(float(np.median([t.ttft_s for t in traces])), 4),
              "decode_tok_s": round((max_tokens - 1) * len(traces) / sum(decode), 2) if sum(decode) else None}
    batch_n = max(1, max_batch)
    speed = {"batch_1": batch1, f"batch_{batch_n}": {
        "decode_tok_s": batch_tok_s(test, [prompts[i % len(prompts)] for i in range(batch_n)], max_tokens)}}
    roof = roofline_tok_s(plan)
    for s in speed.values():
        s["roofline_tok_s"] = roof
        s["fraction_of_roofline"] = round(s["decode_tok_s"] / roof, 3) if roof and s["decode_tok_s"] else None
    planned = plan.get("tensorrt", {}).get("total_bytes") or plan.get("total_bytes")
    memory = {"device_used_bytes": device_used, "plan_bytes": planned,
              "ratio": round(device_used / planned, 3) if device_used and planned else None}
    mismatches = [f"prompt {i}: " + ("ids diverge at step {step}".format(**r["first_divergence"])
                                     if r["first_divergence"] else "ids equal")
                  + (f", logits max |Δ| {r['logits_max_abs_diff']:.4g} > {tol:g}" if not r["within_tolerance"] else "")
                  for i, r in enumerate(rows) if not (r["ids_equal"] and r["within_tolerance"])]
    return {"sides": {"test": test.name, "oracle": oracle.name}, "precision": precision, "tolerance": tol,
            "max_tokens": max_tokens, "prompts": rows, "speed": speed, "memory": memory,
            "mismatches": mismatches, "ok": not mismatches}


def roofline_tok_s(plan: dict) -> float | None:
    """The plan's batch-1 decode roofline at context 0 for the recipe's lm_head (TensorRT route), else the plan's."""
    t = plan.get("tensorrt") or {}
    head = t.get("lm_head")
    if head and head in t.get("lm_head_roofline", {}):
        return t["lm_head_roofline"][head]["tok_s_context_0"]
    return (plan.get("decode_tok_s") or {}).get("context_0")


# --- the bundle's sides -----------------------------------------------------------------------------------------------

def oracle_side(bundle: Path, cache_dir: Path | None = None) -> tuple[Side, str]:
    """(onnxruntime CPU on BUNDLE/onnx, the graph the engine was built from, at accuracy level 0 — float activations
    in the INT4 MatMuls, as the engine computes them; the graph's activation dtype, which sets the tolerance).
    onnxruntime's CPU provider has no bfloat16 kernels, so for a bfloat16 graph the oracle is a float32 export of the
    same checkpoint (the backends' export cache) and the report says so."""
    from trt_gemma.runtime.onnxruntime import KV_NUMPY

    onnx_dir = Path(bundle) / "onnx"
    man = onnx_dir / "trt_gemma_onnx.json"
    if not man.is_file():
        raise InputError(f"{bundle} has no ONNX graph ({onnx_dir} is missing)",
                         fix=f"trt-gemma build --from-bundle {bundle} --engine tensorrt")
    act = (read_json_object(man).get("model") or {}).get("activation_dtype", "float32")
    if act in KV_NUMPY:
        return Side("onnxruntime-cpu", ort_step_model(onnx_dir)), act
    from trt_gemma.runtime.backends import ensure_onnx

    path = ensure_onnx(Path(bundle) / "checkpoint", cache_dir)
    return Side(f"onnxruntime-cpu (float32 export of the checkpoint: no {act} kernels on the CPU)",
                ort_step_model(path)), act


def ort_step_model(onnx_dir: Path) -> StepModel:
    """onnxruntime CPU on an export at accuracy level 0: a pool-layout graph through the step loop the engine runs
    under (runtime/engine_backend.py), any other through OrtModel."""
    from trt_gemma.onnx.export import read_manifest
    from trt_gemma.runtime.onnxruntime import OrtModel, session_options

    if read_manifest(Path(onnx_dir))["model"].get("kv_cache") != "pool":
        return OrtModel(onnx_dir, accuracy_level=0)
    from trt_gemma.runtime.engine_backend import step_model
    from trt_gemma.runtime.ort_executor import OrtExecutor

    return step_model(OrtExecutor.open(Path(onnx_dir), session_options(0)), onnx_dir)


def check_bundle(bundle: Path, test: Side, max_tokens: int = MAX_TOKENS, cache_dir: Path | None = None) -> dict:
    """The whole check of `test` (the engine, on the device) against the bundle's oracle: the fixed prompts through
    the bundle's tokenizer, the recipe's max batch, the plan's roofline and memory; writes BUNDLE/check.json."""
    from trt_gemma.build import read_bundle
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    bundle = Path(bundle)
    _, _, recipe = read_bundle(bundle)
    oracle, precision = oracle_side(bundle, cache_dir)
    tok = GemmaTokenizer.from_dir(bundle / "checkpoint")
    prompts = [list(tok.encode(p, add_bos=True)) for p in PROMPTS]
    plan = read_json_object(bundle / "plan.json")
    report = run_check(test, oracle, prompts, precision=precision, max_batch=recipe.max_batch_size, plan=plan,
                       device_used=device_used_bytes(), max_tokens=max_tokens)
    report["bundle"], report["path"] = str(bundle), str(bundle / "check.json")
    write_report(bundle, report)
    return report


def engine_side(bundle: Path) -> Side:
    """The engine on this device, through the TensorRT runtime's step model. Without the engine's GPU, TensorRT and
    cuda-python this is a NeedsDeviceError (exit 2) saying what is missing."""
    from trt_gemma.runtime.engine_backend import load_step_model
    from trt_gemma.runtime.tensorrt import read_record, unavailable_reason

    record = read_record(Path(bundle))
    why = unavailable_reason(record.get("builder"))
    if why:
        raise NeedsDeviceError(f"trt-gemma check runs the engine, and this host cannot: {why}",
                               fix=f"copy {bundle} to the device it was built for ({record.get('target')}, SM "
                                   f"{record.get('sm')}) and run trt-gemma check there")
    return Side(f"{record.get('builder')} {record.get('builder_version')}", load_step_model(Path(bundle)))


def device_used_bytes() -> int | None:
    from trt_gemma.telemetry import snapshot
    from trt_gemma.telemetry.fields import available

    used = snapshot()["memory_bytes"]["device_used"]
    return int(used) if available(used) else None


def write_report(bundle: Path, report: dict) -> Path:
    """BUNDLE/check.json, written whole then renamed (a reader never sees half a report; a new temp file, never
    written through a link placed in the bundle)."""
    from trt_gemma.fsutil import atomic_write

    path = Path(bundle) / "check.json"
    atomic_write(path, json.dumps(report, indent=2) + "\n")
    return path
