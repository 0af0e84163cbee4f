"""Gemma Scope on every site (trt_gemma/scope.py SITES): the activations each site reads, through the numpy reference
and through onnxruntime (an export with site outputs, onnx/sites.py), against transformers' Gemma 2 forward hooks at
the same points; the shipped att / mlp SAEs and transcoder against SAELens's JumpReLU SAE and transcoder; the site a
release's name says."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trt_gemma.errors import ConfigError, InputError
from trt_gemma.reference.model import TAPS
from trt_gemma.scope import (SITES, JumpReLUSAE, default_sae_dir, features, fvu, load_for_features, release_site,
                             resolve_site)

TOL_SAE = 1e-5
TOL_ACT = 1e-4
TEXT = "Return a list of the keys in the dictionary. If the key is not in the dictionary, raise a KeyError."


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """The embedded model converts and exports once into this module's own cache, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRT_GEMMA_CACHE", str(tmp_path_factory.mktemp("trt_gemma_cache")))
        yield


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def hf_site_values(hf_dir, ids, layers) -> dict:
    """{(tap, layer): [T, width]} from transformers' Gemma2ForCausalLM with forward hooks at Gemma Scope's points:
    the decoder layer's output (resid_post), o_proj's input (attn_z), post_feedforward_layernorm's output (mlp_out)
    and the output of pre_feedforward_layernorm's `_norm`, the normalisation before HF multiplies by (1 + w)
    (mlp_in_normalized)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.Gemma2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    got: dict = {}

    def keep(key):
        return lambda value: got.__setitem__(key, value[0].detach().numpy().copy())

    for n in layers:
        layer = model.model.layers[n]
        layer.register_forward_hook(lambda m, a, o, k=keep(("resid_post", n)): k(o[0] if isinstance(o, tuple) else o))
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, k=keep(("attn_z", n)): k(a[0]))
        layer.post_feedforward_layernorm.register_forward_hook(lambda m, a, o, k=keep(("mlp_out", n)): k(o))
        norm = layer.pre_feedforward_layernorm
        norm._norm = (lambda f, k: lambda x: (lambda y: (k(y), y)[1])(f(x)))(norm._norm, keep(("mlp_in_normalized", n)))
    with torch.no_grad():
        model(torch.from_numpy(np.asarray(ids, np.int64))[None])
    return got


# ---- activations: reference and onnxruntime vs transformers hooks ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny Gemma 2 (heads x head_dim != hidden, window 8 < the 40-token sequence, random norms)."""
    from tiny import make_tiny_hf_model

    from trt_gemma.checkpoint.convert import convert_checkpoint

    hf = make_tiny_hf_model(tmp_path_factory.mktemp("sites_hf"))
    ckpt = tmp_path_factory.mktemp("sites_ckpt") / "c"
    convert_checkpoint(hf, ckpt, dtype=None, show_progress=False)
    return hf, ckpt


def test_every_tap_of_every_layer_equals_transformers_hooks_through_both_backends(tiny):
    from trt_gemma.reference import ReferenceModel
    from trt_gemma.runtime.sites import OrtSites

    hf, ckpt = tiny
    ref = ReferenceModel.load(ckpt)
    n = ref.config.num_hidden_layers
    assert ref.config.num_attention_heads * ref.config.head_size != ref.config.hidden_size
    ids = np.random.default_rng(0).integers(6, ref.config.vocab_size, 40)
    want = hf_site_values(hf, ids, range(n))
    ort = OrtSites.for_checkpoint(ckpt, [(t, layer) for layer in range(n) for t in TAPS])
    for layer in range(n):
        for name, reader in (("reference", ref), ("onnxruntime", ort)):
            got = reader.activations(ids, layer, TAPS)
            for tap in TAPS:
                d = _max_diff(got[tap], want[(tap, layer)])
                assert got[tap].shape == want[(tap, layer)].shape, (name, tap, layer, got[tap].shape)
                assert d <= TOL_ACT, f"{name} {tap} at layer {layer}: max|diff| {d:.3g} vs transformers hooks"


def test_site_export_adds_only_the_outputs_asked_for(tiny, tmp_path):
    import onnx

    from trt_gemma.onnx.export import export_onnx

    _, ckpt = tiny
    summary = export_onnx(ckpt, tmp_path / "o", site_outputs=[("attn_z", 1), ("mlp_in_normalized", 0)],
                          show_progress=False)
    names = [o.name for o in onnx.load(str(tmp_path / "o" / "model.onnx"), load_external_data=False).graph.output]
    sites = [n for n in names if n.startswith("site.")]
    assert sites == ["site.1.attn_z", "site.0.mlp_in_normalized"] and names[0] == "logits", names
    assert summary["outputs"][-2:] == sites
    plain = export_onnx(ckpt, tmp_path / "p", show_progress=False)
    assert not [n for n in plain["outputs"] if n.startswith("site.")]
    export_onnx(ckpt, tmp_path / "h", activations="float16", site_outputs=[("mlp_out", 0), ("mlp_in_normalized", 0)],
                show_progress=False)
    half = onnx.load(str(tmp_path / "h" / "model.onnx"), load_external_data=False).graph.output
    assert {o.name: o.type.tensor_type.elem_type for o in half if o.name.startswith("site.")} == {
        "site.0.mlp_out": onnx.TensorProto.FLOAT, "site.0.mlp_in_normalized": onnx.TensorProto.FLOAT}
    with pytest.raises(ConfigError, match="'attn_out' is not one of"):
        export_onnx(ckpt, tmp_path / "q", site_outputs=[("attn_out", 0)], show_progress=False)
    with pytest.raises(ConfigError, match="layer 9: the model has layers 0..2"):
        export_onnx(ckpt, tmp_path / "q", site_outputs=[("mlp_out", 9)], show_progress=False)


def test_ort_sites_refuses_a_site_it_was_not_exported_with(tiny):
    from trt_gemma.runtime.sites import OrtSites

    _, ckpt = tiny
    ort = OrtSites.for_checkpoint(ckpt, [("mlp_out", 1)])
    with pytest.raises(InputError, match="exported without site.1.attn_z"):
        ort.activations([6, 7, 8], 1, ("attn_z",))


# ---- the shipped SAEs on the embedded model -------------------------------------------------------------------------

def saelens_for(sae: JumpReLUSAE, npz):
    """SAELens's JumpReLU SAE, or its JumpReLU transcoder for the transcoder site, from the same params.npz, with
    Gemma Scope's config (sae_lens/loading/pretrained_sae_loaders.py get_gemma_2_config_from_hf /
    get_gemma_2_transcoder_config_from_hf: apply_b_dec_to_input False, normalize_activations none)."""
    torch = pytest.importorskip("torch")
    sae_lens = pytest.importorskip("sae_lens", reason="SAELens is the oracle: pip install '.[dev]'")
    with np.load(npz) as z:
        state = {k: torch.from_numpy(z[k]) for k in z.files}
    common = dict(d_in=sae.d_in, d_sae=sae.d_sae, dtype="float32", device="cpu", apply_b_dec_to_input=False,
                  normalize_activations="none")
    if sae.site.tap_out:
        oracle = sae_lens.JumpReLUTranscoder(sae_lens.JumpReLUTranscoderConfig(d_out=sae.d_out, **common))
    else:
        oracle = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common))
    oracle.load_state_dict(state)
    return oracle


@pytest.fixture(scope="module")
def embedded_oracle():
    """The embedded model's token ids for TEXT and transformers' values at every tap of layer 2."""
    from trt_gemma.assets import default_model_dir
    from trt_gemma.runtime.backends import reference_checkpoint
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    tok = GemmaTokenizer.from_dir(reference_checkpoint(default_model_dir()))
    ids = tok.encode(TEXT, add_bos=True)
    return ids, hf_site_values(default_model_dir(), ids, [2])


@pytest.mark.parametrize("backend", ["reference", "onnxruntime"])
@pytest.mark.parametrize("site", list(SITES))
def test_shipped_sae_features_equal_saelens_on_transformers_activations(embedded_oracle, site, backend):
    """Per token: our top features and activations (through the backend's activations) equal SAELens's encode of
    the activations transformers' hooks read; the reconstruction error is measured against the site's target."""
    import torch

    ids, want = embedded_oracle
    reader, tok, sae = load_for_features(None, None, None, 2, site=site, backend=backend)
    assert sae.site is SITES[site] and type(reader).__name__ == {"reference": "ReferenceModel",
                                                                   "onnxruntime": "OrtSites"}[backend]
    oracle = saelens_for(sae, default_sae_dir(2, SITES[site]) / "params.npz")
    x, y = want[(sae.site.tap, 2)][1:], want[(sae.site.target_tap, 2)][1:]
    with torch.no_grad():
        f_ref = oracle.encode(torch.from_numpy(x)).numpy()
        y_ref = oracle.decode(torch.from_numpy(f_ref)).numpy()
    r = features(reader, tok, sae, 2, TEXT, top_k=4, feature=0)
    assert r["site"] == site and r["hook"] == SITES[site].hooks(2) and r["backend"] == backend
    assert [e["id"] for e in r["tokens"]] == ids[1:]
    assert np.count_nonzero(f_ref) > 0, "the shipped SAE must light up on the test text"
    for e, row in zip(r["tokens"], f_ref):
        want_top = [int(j) for j in np.argsort(-row, kind="stable")[:4] if row[j] > 0]
        assert [t["feature"] for t in e["top"]] == want_top, (site, backend, e["position"])
        d = max((abs(t["activation"] - row[t["feature"]]) for t in e["top"]), default=0.0)
        assert d <= TOL_SAE * max(1.0, float(row.max())) * 10, f"{site} activation max|diff| {d:.3g} vs SAELens"
        assert e["l0"] == np.count_nonzero(row)
    err = np.linalg.norm(y - y_ref, axis=-1) / np.linalg.norm(y, axis=-1)
    assert _max_diff([e["rel_error"] for e in r["tokens"]], err) <= 1e-4
    assert r["fvu"] == pytest.approx(fvu(y, y_ref), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("site", ["random", *SITES])
def test_encode_decode_match_saelens(tmp_path, site):
    """Random residual-SAE parameters, and the shipped SAE of every site."""
    import torch

    from test_scope import random_params, write_npz

    if site == "random":
        npz, site = write_npz(tmp_path, random_params()) / "params.npz", "res"
    else:
        npz = default_sae_dir(2, SITES[site]) / "params.npz"
    ours = JumpReLUSAE.load(npz, SITES[site])
    oracle = saelens_for(ours, npz)
    x = np.random.default_rng(1).normal(0, 2.0, (64, ours.d_in)).astype(np.float32)
    with torch.no_grad():
        f_ref = oracle.encode(torch.from_numpy(x)).numpy()
        y_ref = oracle.decode(torch.from_numpy(f_ref)).numpy()
    f = ours.encode(x)
    assert np.count_nonzero(f) > 0 and np.count_nonzero(f == 0) > 0, "test input must hit both sides of threshold"
    assert _max_diff(f, f_ref) <= TOL_SAE and np.array_equal(f > 0, f_ref > 0), f"{site} encode vs SAELens"
    assert _max_diff(ours.decode(f), y_ref) <= TOL_SAE, f"{site} decode vs SAELens"


@pytest.mark.parametrize("site", list(SITES))
def test_shipped_assets_are_small_and_carded(site):
    d = default_sae_dir(2, SITES[site])
    limit = 2 * 2**20 if site == "res" else 400 * 1024
    assert (d / "params.npz").stat().st_size <= limit
    card = (d.parents[2] / "SAE_CARD.md").read_text()
    assert "Fraction of variance explained" in card and SITES[site].hook.format(layer=2) in card


# ---- which site ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,site", [
    ("google/gemma-scope-2b-pt-res", "res"), ("google/gemma-scope-9b-it-res", "res"),
    ("google/gemma-scope-2b-pt-att", "att"), ("google/gemma-scope-9b-pt-mlp", "mlp"),
    ("google/gemma-scope-2b-pt-transcoders", "transcoder"), ("gemma-scope-2b-pt-att-canonical", "att"),
    ("/cache/hub/models--google--gemma-scope-2b-pt-mlp/snapshots/abc/layer_3/width_16k/average_l0_9", "mlp"),
    ("/data/my-sae/layer_2", None), ("/srv/res/sae", None), (None, None),
])
def test_release_name_says_the_site(name, site):
    assert release_site(name) == site


def test_site_against_release():
    assert resolve_site(None, "google/gemma-scope-2b-pt-att").name == "att"
    assert resolve_site("att", "google/gemma-scope-2b-pt-att").name == "att"
    assert resolve_site("mlp", "/data/my-sae").name == "mlp"
    assert resolve_site(None, None).name == "res"
    with pytest.raises(InputError, match="--site mlp but google/gemma-scope-2b-pt-att is a Gemma Scope att release"):
        resolve_site("mlp", "google/gemma-scope-2b-pt-att")
    with pytest.raises(InputError, match="--site res but .* transcoder release"):
        load_for_features(None, "google/gemma-scope-2b-pt-transcoders", "layer_2/width_16k/average_l0_49", 2,
                          site="res")
    with pytest.raises(InputError, match="--layer 2 but the SAE layer_20/width_16k/average_l0_71 was trained on "
                                         "layer 20"):
        load_for_features(None, "google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71", 2)


def test_wrong_width_for_the_site(tmp_path):
    """An SAE of the residual's width given as an att SAE: att reads heads x head_dim (4 x 96 = 384 here)."""
    reader, tok, _ = load_for_features(None, None, None, 2, site="res", backend="reference")
    res = JumpReLUSAE.load(default_sae_dir(2, SITES["res"]), SITES["att"])
    with pytest.raises(InputError, match=r"d_in=256 but the model is 384 wide at the att site \(4 heads x 96\)"):
        features(reader, tok, res, 2, "hello")
    p = dict(np.load(default_sae_dir(2, SITES["transcoder"]) / "params.npz"))
    p["b_dec"] = p["b_dec"][:-1]
    with pytest.raises(InputError, match="W_dec has shape"):
        JumpReLUSAE.from_arrays(p, "tc", SITES["transcoder"])


def test_features_cli_site_against_release():
    """The shipped mlp SAE's dir says mlp: --site att is refused, no --site reads it at the mlp site."""
    from click.testing import CliRunner

    from trt_gemma.cli import cli

    sae = default_sae_dir(2, SITES["mlp"])
    release, inside = str(sae.parents[2]), "/".join(sae.parts[-3:])
    r = CliRunner().invoke(cli, ["features", "--site", "att", "--sae", release, "--layer", "2", "--text", "x"])
    assert r.exit_code != 0 and "is a Gemma Scope mlp release" in str(r.exception), (r.output, r.exception)
    r = CliRunner().invoke(cli, ["features", "--sae", release, "--sae-path", inside, "--layer", "2", "--text", "x",
                                 "--json", "--backend", "reference"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["site"] == "mlp" and json.loads(r.stdout)["backend"] == "reference"
