"""`trt-gemma moderate --prompt TEXT [--response TEXT]`: ShieldGemma scores per harm policy (trt_gemma.safety)."""
from __future__ import annotations

import click

from trt_gemma.safety import MODERATION_BACKENDS, POLICIES


@click.command("moderate")
@click.option("--model", default=None,
              help="ShieldGemma (HF dir / hub id / checkpoint / bundle); default: the embedded model, which is no "
                   "safety model (the output says so).")
@click.option("--prompt", required=True, help="The user's text (ShieldGemma's 'Human Question').")
@click.option("--response", default=None,
              help="The chatbot's answer: scores the response in the prompt-response template.")
@click.option("--policy", "policies", multiple=True, type=click.Choice(list(POLICIES)),
              help="Policy to score (repeatable; default: all four). One forward pass each.")
@click.option("--thresholds", type=click.Path(dir_okay=False), default=None,
              help="TOML with a [thresholds] table (policy = probability); default 0.5 each.")
@click.option("--backend", type=click.Choice(list(MODERATION_BACKENDS)), default="auto", show_default=True,
              help="CPU runtime that scores: auto = onnxruntime where installed (the ONNX export is cached), else "
                   "the numpy reference.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def moderate(model, prompt, response, policies, thresholds, backend, as_json):
    """P(violation) for each harm policy: softmax of the 'Yes'/'No' logits at the last position of ShieldGemma's
    prompt (Google's gemma-cookbook templates), and the verdict against the per-policy thresholds."""
    from trt_gemma.console import emit
    from trt_gemma.safety import load_moderator

    mod = load_moderator(model, thresholds, backend=backend)
    verdict = mod.score(prompt, response, list(policies) or None)
    record = dict(verdict.to_dict(), model=mod.name, backend=mod.backend, notices=mod.notices)
    emit(record, as_json, _render)


def _render(d: dict) -> None:
    from rich.table import Table

    from trt_gemma.console import console

    for note in d["notices"]:
        console.print(f"note: {note}")
    t = Table(title=f"{d['model']} ({d['backend']}) - {d['mode'].replace('_', '-')}")
    for col in ("policy", "P(violation)", "threshold", "verdict"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for p, s in d["scores"].items():
        t.add_row(POLICIES[p].name, f"{s:.4f}", f"{d['thresholds'][p]:g}",
                  "[red]flagged[/]" if d["flags"][p] else "[green]ok[/]")
    console.print(t)
    console.print("verdict: " + ("[red]flagged[/]" if d["flagged"] else "[green]not flagged[/]")
                  + f" ({d['seconds'] * 1000:.0f} ms)")
