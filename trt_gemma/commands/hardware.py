"""`trt-gemma targets` and `trt-gemma detect`: the target table and what this host is."""
from __future__ import annotations

import click


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets(as_json):
    """List the NVIDIA targets trt_gemma knows: SM, memory, bandwidth, precisions, recommended recipe."""
    from trt_gemma.console import emit
    from trt_gemma.recipes import load_recipe
    from trt_gemma.targets import TARGETS

    rows = []
    for t in TARGETS.values():
        r = load_recipe(t)
        rows.append(dict(t.to_dict(), recipe={"quant": r.quant, "kv_cache_dtype": r.kv_dtype,
                                              "max_batch_size": r.max_batch_size, "max_seq_len": r.max_seq_len}))
    emit(rows, as_json, _render_targets)


def _render_targets(rows: list[dict]) -> None:
    from rich.table import Table

    from trt_gemma.console import console
    from trt_gemma.targets import GiB

    table = Table(title="trt_gemma targets (* = unconfirmed figure)")
    table.add_column("target", no_wrap=True)
    for col in ("SM", "GiB", "GB/s", "fp8", "recipe"):
        table.add_column(col, no_wrap=True)
    for t in rows:
        def star(key):
            return "*" if key in t["unconfirmed"] else ""
        mem_key = "usable_bytes" if t["unified"] else "memory_bytes"
        table.add_row(t["name"], t["sm"] + star("sm"), f"{t[mem_key] / GiB:.1f}" + star(mem_key),
                      f"{t['bandwidth_gbs']:g}" + star("bandwidth_gbs"), _yn(t["precisions"]["fp8"]),
                      f"{t['recipe']['quant']}/{t['recipe']['kv_cache_dtype']}")
    console.print(table)
    console.print("GiB: usable memory (Jetson: MemTotal, shared with the OS). recipe: weights/KV from build_configs/.")
    console.print("All precisions per target and the notes: `trt-gemma targets --json`.")


def _yn(v: bool) -> str:
    return "yes" if v else "no"


@click.command("detect")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def detect(as_json):
    """Detect this host's NVIDIA GPU (NVML) or Jetson module (device tree) and map it to a target."""
    from trt_gemma.console import emit
    from trt_gemma.detect import detect as run

    emit(run().to_dict(), as_json, _render_detection)


def _render_detection(d: dict) -> None:
    from trt_gemma.console import console

    if d["kind"] == "none":
        console.print(f"[yellow]{d['message']}[/]")
        console.print("Planning still works: `trt-gemma plan --target <name>` (see `trt-gemma targets`).")
        return
    console.print(f"[bold]{d['name']}[/] ({d['kind']}, SM {d['sm'] or 'unknown'})")
    if d["memory_bytes"]:
        console.print(f"memory: {d['memory_bytes'] / 1024**3:.2f} GiB")
    if d["l4t"]:
        console.print(f"L4T {d['l4t']} (JetPack {d['jetpack'] or 'unknown'})")
    if d["target"] is None:
        console.print(f"[yellow]target: none[/] - {d['why']}")
        console.print("Plan for a named target instead: `trt-gemma plan --target <name>` (see `trt-gemma targets`).")
        return
    tag = " [yellow](approximate)[/]" if d["approximate"] else ""
    console.print(f"target: [bold]{d['target']}[/]{tag} - {d['why']}")
