"""`trt-gemma features --layer N --text TEXT [--site res|att|mlp|transcoder]`: Gemma Scope SAE / transcoder features
per token (trt_gemma.scope)."""
from __future__ import annotations

import click

from trt_gemma.scope import BACKENDS, SITES


@click.command("features")
@click.option("--model", default=None,
              help="Gemma 2 model (HF dir / hub id / checkpoint / bundle); default: the embedded model.")
@click.option("--sae", default=None,
              help="SAE dir or params.npz, or a Hub id (google/gemma-scope-2b-pt-res) with --sae-path; default: the "
                   "SAE shipped with the embedded model.")
@click.option("--sae-path", default=None, help="Path inside --sae, e.g. layer_20/width_16k/average_l0_71.")
@click.option("--layer", type=int, required=True, help="Read this block (0-based).")
@click.option("--site", type=click.Choice(list(SITES)), default=None,
              help="Where the SAE reads: the residual stream after the block, the attention heads' outputs, the MLP "
                   "output, or a transcoder (MLP input -> output); default: what the --sae release's name says, "
                   "else res.")
@click.option("--backend", type=click.Choice(BACKENDS), default=BACKENDS[0],
              show_default=True, help="Runtime that computes the activations (auto: onnxruntime where installed).")
@click.option("--text", required=True, help="Text to analyse (<bos> is prepended and left out of the results).")
@click.option("--top", "top_k", type=click.IntRange(1), default=5, show_default=True, help="Features per token.")
@click.option("--feature", type=click.IntRange(0), default=None, help="Rank tokens by this feature.")
@click.option("--html", "html_out", type=click.Path(dir_okay=False), default=None,
              help="Write a self-contained page shading each token by --feature (default: the strongest feature).")
@click.option("--force", is_flag=True, help="Replace an existing --html file (a symbolic link is never replaced).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def features(model, sae, sae_path, layer, site, backend, text, top_k, feature, html_out, force, as_json):
    """Per token: the top-K SAE features with activations, L0 and the relative reconstruction error."""
    from pathlib import Path

    from trt_gemma.console import emit
    from trt_gemma.fsutil import check_output_file, write_output_file
    from trt_gemma.scope import features as run, load_for_features, render_html

    if html_out:  # before the model loads: an existing file or a link is refused at once
        check_output_file(Path(html_out), force, "--html")
    m, tok, s = load_for_features(model, sae, sae_path, layer, site, backend)
    if html_out and feature is None:  # shade by the feature with the largest activation anywhere in the text
        feature = "strongest"
    report = run(m, tok, s, layer, text, top_k=top_k, feature=feature)
    if html_out:
        write_output_file(Path(html_out), render_html(report), force, "--html")
        report["html"] = html_out
    emit(report, as_json, _render)


def _render(d: dict) -> None:
    from rich.table import Table

    from trt_gemma.console import console

    t = Table(title=f"layer {d['layer']} {d['site']} ({d['hook']}) - SAE d_sae {d['d_sae']} - top {d['top_k']}")
    for col in ("pos", "token", "L0", "rel err", "top features (id:activation)"):
        t.add_column(col, justify="right" if col in ("pos", "L0", "rel err") else "left")
    if "feature" in d:
        t.add_column(f"f{d['feature']}", justify="right")
    for e in d["tokens"]:
        row = [str(e["position"]), repr(e["token"]), str(e["l0"]), f"{e['rel_error']:.3f}",
               "  ".join(f"{f['feature']}:{f['activation']:.2f}" for f in e["top"])]
        if "feature" in d:
            row.append(f"{e['feature_activation']:.3f}")
        t.add_row(*row)
    console.print(t)
    console.print(f"mean L0 {d['mean_l0']:.1f} ({d['l0_definition']}); mean relative error {d['mean_rel_error']:.3f}; "
                  f"variance explained {1 - d['fvu']:.3f} (<bos> excluded)")
    if "ranked" in d:
        top = ", ".join(f"{r['token']!r} {r['activation']:.2f}" for r in d["ranked"][:5])
        console.print(f"feature {d['feature']}: strongest tokens {top}")
    if d.get("html"):
        console.print(f"wrote {d['html']}")
