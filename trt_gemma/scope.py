"""Gemma Scope: JumpReLU sparse autoencoders and transcoders on Gemma 2, read at the site each release was trained on.

Format (Gemma Scope's `params.npz`, e.g. google/gemma-scope-2b-pt-res `layer_{N}/width_{W}/average_l0_{K}/params.npz`):
float32 `W_enc` [d_in, d_sae], `W_dec` [d_sae, d_out], `b_enc` [d_sae], `b_dec` [d_out], `threshold` [d_sae];
d_out = d_in except for transcoders. The maths is SAELens's JumpReLU SAE and transcoder (jbloomAus/SAELens
`sae_lens/saes/jumprelu_sae.py`, `sae_lens/saes/transcoder.py`, sae-lens 6.54.12; Google's "Gemma Scope from Scratch"
tutorial writes the same):
    pre  = x @ W_enc + b_enc                    (no b_dec subtraction, no normalisation: apply_b_dec_to_input False)
    f    = relu(pre) * (pre > threshold)        (strictly above the per-feature threshold)
    y_hat = f @ W_dec + b_dec                   (x itself for an SAE; the MLP's output for a transcoder)
Sites (SITES; docs/scope.md has the hook points and their sources): `res` the residual stream after block N, `att` the
attention heads' outputs before o_proj, `mlp` the MLP output after the post-feedforward norm, `transcoder` the
pre-feedforward norm before its gain -> the MLP output. Gemma Scope was not trained on <bos> ("tend to give nonsense
when we apply them to it"), so position 0 is left out of every feature list and metric. L0 here counts features with
f > 0 (the tutorial's plots use f > 1).
"""
from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trt_gemma.errors import InputError

PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
ASSET_PREFIX = "gemma2-pydoc-tiny-scope-"  # + release suffix: shipped beside the embedded model
BACKENDS = ("auto", "reference", "onnxruntime")


@dataclass(frozen=True)
class Site:
    """Where a Gemma Scope release reads Gemma 2: SAELens's hook names, and the reference runtime's taps (TAPS in
    reference/model.py, the same names as the ONNX site outputs) for the input and, for transcoders, the output."""

    name: str
    suffix: str  # how the release's name ends: google/gemma-scope-2b-pt-<suffix>
    hook: str
    tap: str
    what: str
    hook_out: str | None = None
    tap_out: str | None = None

    @property
    def target_tap(self) -> str:
        return self.tap_out or self.tap

    def hooks(self, layer: int | str) -> str:
        h = self.hook.format(layer=layer)
        return h if self.hook_out is None else f"{h} -> {self.hook_out.format(layer=layer)}"

    @property
    def taps(self) -> tuple[str, ...]:
        """What the site reads: its input tap, and for a transcoder the output tap too."""
        return tuple(dict.fromkeys((self.tap, self.target_tap)))


# sites -> hooks: SAELens get_gemma_2_config_from_hf / get_gemma_2_transcoder_config_from_hf (docs/scope.md)
SITES = {s.name: s for s in (
    Site("res", "res", "blocks.{layer}.hook_resid_post", "resid_post", "the residual stream after block {layer}"),
    Site("att", "att", "blocks.{layer}.attn.hook_z", "attn_z",
         "block {layer}'s attention heads' outputs, concatenated, before o_proj"),
    Site("mlp", "mlp", "blocks.{layer}.hook_mlp_out", "mlp_out",
         "block {layer}'s MLP output after the post-feedforward norm"),
    Site("transcoder", "transcoders", "blocks.{layer}.ln2.hook_normalized", "mlp_in_normalized",
         "block {layer}'s pre-feedforward norm before its gain -> the MLP output after the post-feedforward norm",
         hook_out="blocks.{layer}.hook_mlp_out", tap_out="mlp_out"),
)}
_RELEASE_SITE = re.compile(r"-(" + "|".join(s.suffix for s in SITES.values()) + r")(?:-canonical)?$")


@dataclass(frozen=True)
class JumpReLUSAE:
    W_enc: np.ndarray
    W_dec: np.ndarray
    b_enc: np.ndarray
    b_dec: np.ndarray
    threshold: np.ndarray
    source: str = ""
    site: Site = SITES["res"]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in PARAMS)

    @classmethod
    def from_arrays(cls, arrays: dict, source: str, site: Site = SITES["res"]) -> "JumpReLUSAE":
        """Validates keys, shapes and finiteness. SAELens renames `w_*` keys to `W_*`; a `scaling_factor` of ones is
        dropped as SAELens does (any other value is a fine-tuning scale Gemma Scope's SAEs do not use)."""
        arrays = {("W" + k[1:] if k.startswith("w_") else k): v for k, v in arrays.items()}
        sf = arrays.pop("scaling_factor", None)
        if sf is not None and not np.all(np.asarray(sf) == 1):
            raise InputError(f"{source}: scaling_factor is not all ones (a fine-tuned SAE)",
                             fix="use a Gemma Scope SAE (params.npz without a scaling factor)")
        missing = [k for k in PARAMS if k not in arrays]
        if missing:
            raise InputError(f"{source} lacks {', '.join(missing)} (has {', '.join(sorted(arrays))})",
                             fix="pass a Gemma Scope params.npz (W_enc, W_dec, b_enc, b_dec, threshold)")
        a = {k: np.asarray(arrays[k], dtype=np.float32) for k in PARAMS}
        d_in, d_sae = a["W_enc"].shape if a["W_enc"].ndim == 2 else (-1, -1)
        d_out = a["b_dec"].shape[0] if a["b_dec"].ndim == 1 and site.tap_out else d_in
        want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,),
                "threshold": (d_sae,)}
        for k, shape in want.items():
            if a[k].shape != shape or d_in < 1:
                raise InputError(f"{source}: {k} has shape {list(a[k].shape)}, expected {list(shape)} "
                                 f"(W_enc is {list(a['W_enc'].shape)} = [d_in, d_sae])",
                                 fix="the file is damaged or not a Gemma Scope SAE: re-download it")
            bad = int(np.size(a[k]) - np.count_nonzero(np.isfinite(a[k])))
            if bad:
                raise InputError(f"{source}: {k} holds {bad} NaN/inf value(s)", fix="re-download or retrain the SAE")
        return cls(**a, source=source, site=site)

    @classmethod
    def load(cls, path: str | Path, site: Site = SITES["res"]) -> "JumpReLUSAE":
        path = Path(path)
        f = path / "params.npz" if path.is_dir() else path
        if not f.is_file():
            raise InputError(f"no SAE at {path} (expected a params.npz, or a dir holding one)",
                             fix="pass a Gemma Scope SAE dir such as layer_2/width_16k/average_l0_X, or --sae-path")
        try:
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise InputError(f"{f} is not a readable .npz: {e}", fix="re-download the SAE") from e
        return cls.from_arrays(arrays, str(f), site)

    def check_model(self, cfg, what: str) -> None:
        """The SAE's widths against the model's at its site (att reads heads x head_dim, the rest hidden_size)."""
        from trt_gemma.reference.model import tap_width

        for side, got, tap in (("d_in", self.d_in, self.site.tap), ("d_out", self.d_out, self.site.target_tap)):
            want = tap_width(cfg, tap)
            if got != want:
                shape = (f"{cfg.num_attention_heads} heads x {cfg.head_size}" if tap == "attn_z"
                         else "its hidden size")
                raise InputError(f"the SAE {self.source} has {side}={got} but {what} is {want} wide at the "
                                 f"{self.site.name} site ({shape})",
                                 fix="use an SAE trained on this model and site (Gemma Scope 2b: res/mlp 2304, "
                                     "att 2048; 9b: 3584, att 4096)")

    def pre(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.W_enc + self.b_enc

    def encode(self, x: np.ndarray) -> np.ndarray:
        pre = self.pre(x)
        return np.where(pre > self.threshold, np.maximum(pre, 0), np.float32(0)).astype(np.float32)

    def decode(self, f: np.ndarray) -> np.ndarray:
        return np.asarray(f, np.float32) @ self.W_dec + self.b_dec


# ---- which SAE, which site ---------------------------------------------------------------------------------------

def release_site(sae: str | None) -> str | None:
    """The site a release's name says (`...-pt-att` -> att, `-transcoders` -> transcoder), from the deepest path
    component that says one (Hub id, local copy, huggingface_hub cache dir `models--google--gemma-scope-2b-pt-att`)."""
    for part in reversed(Path(sae).parts if sae else ()):
        m = _RELEASE_SITE.search(part)
        if m:
            return next(s.name for s in SITES.values() if s.suffix == m.group(1))
    return None


def resolve_site(site: str | None, sae: str | None) -> Site:
    """--site against the release: the release's own site where its name says one; a different --site is an error."""
    if site is not None and site not in SITES:
        raise InputError(f"--site {site!r} is not one of {', '.join(SITES)}", fix="use --site res, att, mlp or "
                                                                                   "transcoder")
    named = release_site(sae)
    if site is not None and named is not None and site != named:
        raise InputError(f"--site {site} but {sae} is a Gemma Scope {named} release ({SITES[named].hooks('N')})",
                         fix=f"drop --site, or pass --site {named}, or an SAE trained at the {site} site")
    return SITES[site or named or "res"]


def check_layer(layer: int, *paths: str | None) -> None:
    """A `layer_N` path component (Gemma Scope's layout) that disagrees with --layer is an error."""
    for p in paths:
        for part in Path(p).parts if p else ():
            m = re.fullmatch(r"layer_(\d+)", part)
            if m and int(m.group(1)) != layer:
                raise InputError(f"--layer {layer} but the SAE {p} was trained on layer {m.group(1)}",
                                 fix=f"pass --layer {m.group(1)}, or the SAE of layer {layer}")


def resolve_sae(sae: str | None, sae_path: str | None = None, layer: int | None = None,
                site: Site = SITES["res"]) -> Path:
    """--sae/--sae-path -> a local params.npz dir or file.

    None: the SAE shipped with the embedded model for `site`. An existing path: itself, or PATH/sae_path. Anything
    else is a Hub id (google/gemma-scope-2b-pt-res) and `sae_path` (layer_N/width_16k/average_l0_K) names the file
    in it, fetched with huggingface_hub (honours HF_HUB_CACHE and HF_HUB_OFFLINE)."""
    if sae is None:
        return default_sae_dir(layer, site)
    p = Path(sae).expanduser()
    if p.exists():
        return p / sae_path if sae_path else p
    if sae.startswith(("/", ".", "~")) or sae.count("/") != 1:
        raise InputError(f"SAE {sae} does not exist", fix="check the path, or pass a Hub id with --sae-path")
    if not sae_path:
        raise InputError(f"--sae {sae} is a Hub id: the file inside it is needed",
                         fix="add --sae-path layer_N/width_16k/average_l0_K (Neuronpedia lists the canonical ones)")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=sae, filename=f"{sae_path.strip('/')}/params.npz"))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"cannot fetch {sae_path}/params.npz from {sae}: {e}",
                         fix="check the id and path (huggingface.co/" + sae + "), network, HF_TOKEN") from e


def default_sae_dir(layer: int | None, site: Site = SITES["res"]) -> Path:
    base = Path(__file__).parent / "assets" / (ASSET_PREFIX + site.suffix)
    layers = sorted(int(d.name.split("_")[1]) for d in base.glob("layer_*") if d.is_dir())
    if layer not in layers:
        raise InputError(f"the {site.name} SAE shipped with the embedded model covers layer(s) {layers}, not {layer}",
                         fix=f"pass --layer {layers[0] if layers else 2}, or your own --sae")
    found = sorted((base / f"layer_{layer}").glob("width_*/average_l0_*/params.npz"))
    return found[0].parent


# ---- features of a text ----------------------------------------------------------------------------------------------

def features(model, tokenizer, sae: JumpReLUSAE, layer: int, text: str, top_k: int = 5,
             feature: int | str | None = None) -> dict:
    """Per token (after <bos>): the top-k features and activations, L0 and the relative reconstruction error
    ||y - y_hat|| / ||y|| (y: the site's activation, or the MLP output for a transcoder); with `feature`, that
    feature's activation per token and the tokens ranked by it. feature="strongest": the feature with the largest
    activation anywhere in the text (one forward pass). `model`: anything with `config` and
    `activations(ids, layer, taps)` (the reference runtime, runtime.sites.OrtSites)."""
    cfg, site = model.config, sae.site
    sae.check_model(cfg, "the model")
    if feature != "strongest" and feature is not None and not 0 <= feature < sae.d_sae:
        raise InputError(f"--feature {feature} is out of range: the SAE has features 0..{sae.d_sae - 1}",
                         fix="pick a feature index below d_sae")
    if top_k < 1:
        raise InputError("--top must be at least 1", fix="e.g. --top 5")
    ids = list(tokenizer.encode(text, add_bos=True))
    if len(ids) < 2:
        raise InputError("the text is empty", fix="pass some text with --text")
    if len(ids) > cfg.max_position_embeddings:
        raise InputError(f"the text is {len(ids)} tokens, longer than the model's context of "
                         f"{cfg.max_position_embeddings}", fix="pass a shorter text")
    acts = {t: v[1:] for t, v in model.activations(ids, layer, site.taps).items()}  # <bos> excluded: not trained on it
    f = sae.encode(acts[site.tap])
    if feature == "strongest":  # first token, then lowest id among ties: the order of the per-token top lists
        feature = int(np.unravel_index(np.argmax(f), f.shape)[1])
    y, y_hat = acts[site.target_tap], sae.decode(f)
    err = np.linalg.norm(y - y_hat, axis=-1) / np.maximum(np.linalg.norm(y, axis=-1), 1e-12)
    pieces = [tokenizer.decode([i], skip_special=False) for i in ids[1:]]
    k = min(top_k, sae.d_sae)
    top = np.argsort(-f, axis=-1, kind="stable")[:, :k]
    tokens = []
    for t, (piece, row) in enumerate(zip(pieces, f)):
        entry = {"position": t + 1, "id": ids[t + 1], "token": piece, "l0": int(np.count_nonzero(row)),
                 "rel_error": float(err[t]),
                 "top": [{"feature": int(j), "activation": float(row[j])} for j in top[t] if row[j] > 0]}
        if feature is not None:
            entry["feature_activation"] = float(row[feature])
        tokens.append(entry)
    out = {"layer": layer, "site": site.name, "hook": site.hooks(layer), "reads": site.what.format(layer=layer),
           "sae": sae.source, "d_in": sae.d_in, "d_out": sae.d_out, "d_sae": sae.d_sae, "top_k": k,
           "tokens": tokens, "mean_l0": float(np.mean([e["l0"] for e in tokens])),
           "mean_rel_error": float(np.mean(err)), "fvu": fvu(y, y_hat), "l0_definition": "features with f > 0",
           "bos_excluded": True, "backend": getattr(model, "backend", "reference")}
    if feature is not None:
        out["feature"] = feature
        out["ranked"] = sorted(({"position": e["position"], "token": e["token"],
                                 "activation": e["feature_activation"]} for e in tokens),
                               key=lambda e: -e["activation"])
    return out


def fvu(x: np.ndarray, x_hat: np.ndarray) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 - FVU = variance explained)."""
    num = float(np.sum(np.square(x - x_hat), dtype=np.float64))
    den = float(np.sum(np.square(x - x.mean(axis=0)), dtype=np.float64))
    return num / den if den > 0 else float("nan")


def load_for_features(model_spec: str | None, sae: str | None, sae_path: str | None, layer: int,
                      site: str | None = None, backend: str = "auto"):
    """(activation reader, tokenizer, SAE) for the CLI. The reader is the reference runtime, or with onnxruntime
    (`backend` "onnxruntime", or "auto" where it is installed) an export of the checkpoint with exactly the SAE's
    site outputs (runtime/sites.py). HF dirs convert once; the SAE knows its site (resolve_site)."""
    from trt_gemma.checkpoint.hf import resolve_model
    from trt_gemma.reference.checkpoint import CheckpointConfig
    from trt_gemma.runtime.backends import onnxruntime_available, reference_checkpoint
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    if backend not in BACKENDS:
        raise InputError(f"--backend {backend!r} is not one of {', '.join(BACKENDS)}", fix="use --backend auto")
    where = resolve_site(site, sae)
    check_layer(layer, sae_path, sae)
    path = resolve_model(model_spec)
    ckpt = reference_checkpoint(path)
    cfg = CheckpointConfig.from_file(ckpt / "config.json")
    n = cfg.num_hidden_layers
    if not 0 <= layer < n:
        raise InputError(f"--layer {layer} is out of range: the model has layers 0..{n - 1}",
                         fix=f"pass --layer between 0 and {n - 1}")
    if sae is None and model_spec not in (None, "default"):
        raise InputError("--sae is required for a model other than the embedded one",
                         fix="e.g. --sae google/gemma-scope-2b-pt-res --sae-path layer_20/width_16k/average_l0_71")
    s = JumpReLUSAE.load(resolve_sae(sae, sae_path, layer, where), where)
    s.check_model(cfg, str(path))
    if backend == "onnxruntime" or (backend == "auto" and onnxruntime_available()):
        from trt_gemma.runtime.sites import OrtSites

        reader: object = OrtSites.for_checkpoint(ckpt, [(t, layer) for t in where.taps])
    else:
        from trt_gemma.reference import ReferenceModel

        reader = ReferenceModel.load(ckpt)
    return reader, GemmaTokenizer.from_dir(ckpt), s


# ---- HTML view -------------------------------------------------------------------------------------------------------

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #1a1a1a; }}
.text {{ font-family: ui-monospace, monospace; font-size: 16px; line-height: 2.1; white-space: pre-wrap; }}
.tok {{ padding: 2px 0; border-radius: 3px; }}
.legend span {{ display: inline-block; width: 2.2em; height: 1em; }}
small {{ color: #555; }}
</style></head><body>
<h2>{title}</h2>
<p><small>{subtitle}</small></p>
<div class="text">{tokens}</div>
<p class="legend"><small>0</small> {legend} <small>{vmax}</small></p>
</body></html>
"""


def _blue(a: float) -> str:
    """Blue gradient (white -> rgb(30, 90, 220)), the colour of Gemma Scope's and Neuronpedia's token views."""
    r, g, b = (round(255 + (c - 255) * a) for c in (30, 90, 220))
    return f"rgb({r},{g},{b})"


def render_html(report: dict) -> str:
    """A self-contained page (no scripts, no external resources) shading each token by `report['feature']`."""
    feat = report["feature"]
    vmax = max((e["feature_activation"] for e in report["tokens"]), default=0.0)
    spans = []
    for e in report["tokens"]:
        a = e["feature_activation"] / vmax if vmax > 0 else 0.0
        color = "#fff" if a > 0.6 else "#000"
        spans.append(f'<span class="tok" style="background:{_blue(a)};color:{color}" '
                     f'title="token {e["position"]}: {html.escape(repr(e["token"]))} f{feat}='
                     f'{e["feature_activation"]:.3f}" data-act="{e["feature_activation"]:.6g}">'
                     f'{html.escape(e["token"])}</span>')
    legend = "".join(f'<span style="background:{_blue(i / 4)}"></span>' for i in range(5))
    title = f"feature {feat} at layer {report['layer']}, site {report['site']}"
    subtitle = html.escape(f"{report['reads']} ({report['hook']}); "
                           f"SAE {Path(report['sae']).parent.name or report['sae']} (d_sae {report['d_sae']}); "
                           f"max activation {vmax:.3f}; <bos> not shown; mean L0 {report['mean_l0']:.1f}, mean "
                           f"relative reconstruction error {report['mean_rel_error']:.3f}")
    return _PAGE.format(title=title, subtitle=subtitle, tokens="".join(spans), legend=legend, vmax=f"{vmax:.3f}")
