"""`trt-gemma check BUNDLE`: the engine on this device against onnxruntime CPU on the same graph (trt_gemma/check.py)."""
from __future__ import annotations

from pathlib import Path

import click

from trt_gemma.check import MAX_TOKENS


@click.command("check")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--max-tokens", default=MAX_TOKENS, show_default=True, type=click.IntRange(1, 512),
              help="Greedy tokens per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (the check.json written).")
def check(bundle, max_tokens, as_json):
    """Greedy ids, logits, speed and memory of BUNDLE's engine on this GPU; writes BUNDLE/check.json."""
    from trt_gemma import check as C
    from trt_gemma.console import emit
    from trt_gemma.errors import MismatchError

    test = C.engine_side(bundle)  # first: without the device nothing else is worth loading
    report = C.check_bundle(bundle, test, max_tokens)
    emit(report, as_json, render)
    if not report["ok"]:
        raise MismatchError(f"{len(report['mismatches'])} of {len(report['prompts'])} prompts differ: "
                            + "; ".join(report["mismatches"][:3]), fix=f"see {report['path']} (both sides' top-5 at "
                            "the first divergence); rebuild the engine if the logits differ beyond tolerance")


def render(r: dict) -> None:
    from rich.table import Table

    from trt_gemma.console import console

    t = Table(title=f"{r['sides']['test']} vs {r['sides']['oracle']} ({r['precision']}, tolerance {r['tolerance']:g})")
    for col in ("prompt", "tokens", "ids", "logits max |Δ|", "first divergence (test / oracle top-5)"):
        t.add_column(col)
    for i, p in enumerate(r["prompts"]):
        d = p["first_divergence"]
        where = "-" if d is None else (f"step {d['step']}: " + " / ".join(
            ",".join(str(tid) for tid, _ in side) for side in d["top5"]))
        t.add_row(str(i), str(p["prompt_tokens"]), "equal" if p["ids_equal"] else "[red]differ[/]",
                  f"{p['logits_max_abs_diff']:.4g}" + ("" if p["within_tolerance"] else " [red]>[/]"), where)
    console.print(t)
    for name, s in r["speed"].items():
        extra = f", TTFT {s['ttft_s'] * 1000:.1f} ms" if "ttft_s" in s else ""
        roof = (f" ({s['fraction_of_roofline']:.0%} of the {s['roofline_tok_s']:g} tok/s roofline)"
                if s.get("fraction_of_roofline") is not None else "")
        console.print(f"{name.replace('_', ' ')}: {s['decode_tok_s']} tok/s decode{roof}{extra}")
    m = r["memory"]
    used = f"{m['device_used_bytes'] / 2**30:.2f} GiB" if m["device_used_bytes"] else "unavailable"
    plan = f"{m['plan_bytes'] / 2**30:.2f} GiB" if m["plan_bytes"] else "unknown"
    console.print(f"device memory in use: {used} (plan: {plan})")
    console.print("[green]check passed[/]" if r["ok"] else f"[red]check failed[/]: {'; '.join(r['mismatches'])}")
