"""`trt-gemma plan`: will a Gemma 2 model fit a target? Exits 3 (FitError) when it does not, after printing the plan."""
from __future__ import annotations

import sys

import click

from trt_gemma.detect import DEFAULT_TARGET
from trt_gemma.checkpoint.config import PRESETS


@click.command("plan")
@click.option("--model", default="default", show_default=True,
              help=f"A local HF model dir, a hub id, a preset ({', '.join(PRESETS)}), a `trt-gemma build` bundle (the "
                   "model config it carries with its recipe), or `default`: the embedded model.")
@click.option("--target", default="auto", show_default=True,
              help=f"Target name (`trt-gemma targets`); auto = the detected device, else {DEFAULT_TARGET}.")
@click.option("--quant", default=None, help="Override the recipe's weight format (recipe field `quant`).")
@click.option("--kv-dtype", default=None, help="Override the KV-cache dtype (recipe field `kv_cache_dtype`).")
@click.option("--max-seq-len", type=int, default=None, help="Override max_seq_len (<= 4096).")
@click.option("--max-batch", type=int, default=None, help="Override max_batch_size.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Your own recipe TOML instead of build_configs/<target>.toml.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any recipe field (repeatable).")
@click.option("--guard", default=None, metavar="SHIELD",
              help="Also plan a ShieldGemma guard (preset shieldgemma-2b or a dir) beside the model: both must fit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan(model, target, quant, kv_dtype, max_seq_len, max_batch, config_file, sets, as_json, guard):
    """Memory by class, a fit verdict, the largest settings that fit and a decode roofline for MODEL on TARGET.

    Recipe values come from build_configs/<target>.toml; the options above override single fields.
    """
    from trt_gemma.console import emit
    from trt_gemma.plan import require_fit
    from trt_gemma.recipes import parse_overrides
    from trt_gemma.stages import plan as run  # the planner plus bundles (their model config and recipe)

    t, source = resolve_target(target, as_json)
    overrides = parse_overrides(list(sets))
    for key, value in (("quant", quant), ("kv_cache_dtype", kv_dtype), ("max_seq_len", max_seq_len),
                       ("max_batch_size", max_batch)):
        if value is not None:
            overrides[key] = value
    p = run(model, t, overrides=overrides, config_file=config_file)
    if guard is not None:  # chat model + guard on one target (trt_gemma/safety.py)
        from trt_gemma.safety import plan_with_guard, render_pair, require_pair_fit

        d = plan_with_guard(p, guard, t, overrides, config_file, chat_model=model)
        emit(dict(d, target_source=source), as_json, render_pair(render_plan))
        return require_pair_fit(d)
    emit(dict(p.to_dict(), target_source=source), as_json, render_plan)
    require_fit(p)


def resolve_target(name: str, as_json: bool = False):
    """(Target, how it was chosen): the same choice `build` makes. Text output shows `how` in its header; with --json
    a chosen (not named) target is also said once on stderr, since stdout is the JSON document."""
    from trt_gemma.detect import resolve_target as choose

    target, how = choose(name)
    if name != "auto":
        return target, "--target"
    if as_json:
        click.echo(f"target {target.name} ({how})", err=True)
    return target, how


def render_plan(d: dict) -> None:
    from rich.table import Table

    from trt_gemma.console import console

    r = d["recipe"]
    console.print(f"[bold]{d['model']}[/] on [bold]{d['target']}[/]  ({d['target_source']})")
    console.print(f"recipe: weights {r['quant']}"
                  + (f" g{r['group_size']}" if r["quant"] == "int4_awq" else "")
                  + f", KV {d['kv_dtype']}, dtype {r['dtype']}, max_batch_size {r['max_batch_size']}, "
                  f"max_seq_len {r['max_seq_len']}, max_num_tokens {r['max_num_tokens']}")
    console.print(f"parameters: {d['parameters']:,}"
                  + (f" (published {d['parameters_published']:,})" if d["parameters_published"] else ""))
    console.print(f"  {d['parameters_note']}")
    t = Table(show_header=True)
    t.add_column("memory")
    t.add_column("bytes", justify="right")
    t.add_column("GiB", justify="right")
    w = d["weights"]
    rows = [("weights: embedding", w["embedding"]),
            ("weights: lm_head" + (" (shared with embedding)" if not w["lm_head"] else ""), w["lm_head"]),
            ("weights: linears + scales", w["linears"]), ("weights: norms", w["norms"]),
            (f"KV cache: {d['kv_tokens']:,} tokens x {d['kv_bytes_per_token']:,} B", d["kv_bytes"]),
            ("activations + logits + workspace (est.)", d["activation_bytes"])]
    rows += [(f"runtime: {k.replace('_', ' ')} (est.)", v) for k, v in d["overhead"].items()]
    # the table is TensorRT-LLM's engine and KV pool; for a TensorRT-route recipe its total is a comparison only
    own = d["route"] == "tensorrt_llm"
    total = ("total", d["total_bytes"]) if own else \
        ("total on the TensorRT-LLM route (comparison only)", d["route_totals"]["tensorrt_llm"])
    for label, n in rows + [total, ("usable on target", d["usable_bytes"])]:
        t.add_row(label, f"{n:,}", f"{n / 1024**3:.2f}")
    console.print(t)
    kv = d["kv_bytes_per_token_by_dtype"]
    console.print("KV bytes/token: " + ", ".join(f"{k} {v:,}" for k, v in kv.items()))
    if d.get("tensorrt"):
        from trt_gemma.engine.plan import render_lines

        for line in render_lines(d["tensorrt"], r["dtype"]):
            console.print(line, markup=False)
    color = {"fits": "green", "tight": "yellow"}.get(d["verdict"], "red")
    judged = "" if own else " (TensorRT route: what this recipe builds)"
    console.print(f"verdict{judged}: [{color}]{d['verdict']}[/] - {d['reason']}")
    console.print(f"largest that fits (10% margin): max_seq_len {d['max_seq_len_fit'] or 'none'} at batch "
                  f"{r['max_batch_size']}; max_batch_size {d['max_batch_fit'] or 'none'} at seq {r['max_seq_len']}")
    console.print("decode roofline, batch 1: " + ", ".join(f"{v:g} tok/s at {k.replace('_', ' ')}"
                                                          for k, v in d["decode_tok_s"].items())
                  + f" ({d['read_bytes_per_token'] / 1e9:.2f} GB read per token)")
    if d["suggestion"]:
        console.print(f"[bold]would fit with:[/] {d['suggestion']['command']} "
                      f"({d['suggestion']['total_bytes'] / 1024**3:.2f} GiB)")
    for note in d["notes"]:
        console.print(f"note: {note}")
    sys.stdout.flush()
