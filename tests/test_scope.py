"""Gemma Scope SAEs (trt_gemma/scope.py) against independent oracles: SAELens's JumpReLU SAE loaded from the same
params.npz (with Gemma Scope's SAELens config: apply_b_dec_to_input False), transformers' hidden_states for the
residual the reference runtime reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from trt_gemma.errors import InputError
from trt_gemma.scope import JumpReLUSAE, default_sae_dir, features, fvu, render_html, resolve_sae

TOL_SAE = 1e-5
TOL_RESID = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _private_cache(tmp_path_factory):
    """The embedded model converts once into this module's own cache, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRT_GEMMA_CACHE", str(tmp_path_factory.mktemp("trt_gemma_cache")))
        yield


def random_params(d_model=256, d_sae=96, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {"W_enc": rng.normal(0, 0.05, (d_model, d_sae)).astype(np.float32),
            "W_dec": rng.normal(0, 0.3, (d_sae, d_model)).astype(np.float32),
            "b_enc": rng.normal(0, 0.5, d_sae).astype(np.float32),
            "b_dec": rng.normal(0, 0.5, d_model).astype(np.float32),
            "threshold": rng.uniform(0.1, 2.0, d_sae).astype(np.float32)}


def write_npz(path: Path, params: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    np.savez(path / "params.npz", **params)
    return path


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_threshold_edge_cases():
    """pre exactly at the threshold is off (strict >); negative pre-activations are off even under a negative
    threshold (relu first); just above the threshold passes the pre-activation unchanged."""
    d = 4
    p = {"W_enc": np.eye(d, dtype=np.float32), "W_dec": np.eye(d, dtype=np.float32),
         "b_enc": np.zeros(d, np.float32), "b_dec": np.zeros(d, np.float32),
         "threshold": np.array([0.5, -1.0, 0.5, 0.0], np.float32)}
    sae = JumpReLUSAE.from_arrays(p, "edge")
    x = np.array([[0.5, -0.5, np.nextafter(np.float32(0.5), np.float32(1)), 0.0]], np.float32)
    f = sae.encode(x)[0]
    assert f[0] == 0.0 and f[1] == 0.0 and f[2] == x[0, 2] and f[3] == 0.0, f


# ---- residual read vs transformers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny import make_tiny_hf_model

    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.reference import ReferenceModel

    hf = make_tiny_hf_model(tmp_path_factory.mktemp("scope_hf"))
    ckpt = tmp_path_factory.mktemp("scope_ckpt") / "c"
    convert_checkpoint(hf, ckpt, dtype=None, show_progress=False)
    return hf, ReferenceModel.load(ckpt)


def test_residual_equals_transformers_hidden_states(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf, ref = tiny
    ids = np.random.default_rng(0).integers(6, ref.config.vocab_size, 40)  # longer than the sliding window (8)
    model = transformers.Gemma2ForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = model(torch.from_numpy(ids)[None], output_hidden_states=True).hidden_states
    for n in range(ref.config.num_hidden_layers - 1):  # the last entry of hidden_states has the final norm applied
        d = _max_diff(ref.residual(ids, n), hs[n + 1][0].numpy())
        assert d <= TOL_RESID, f"residual after block {n} vs hidden_states[{n + 1}]: max|diff| {d:.3g}"


def test_residual_leaves_forward_unchanged(tiny):
    from trt_gemma.reference.model import rms_norm, soft_cap

    _, ref = tiny
    ids = np.arange(6, 36)
    before = ref.forward(ids)
    last = ref.residual(ids, ref.config.num_hidden_layers - 1)
    assert np.array_equal(ref.forward(ids), before)
    via = soft_cap(ref.lm_head(rms_norm(last, ref.ln_f, ref.config.norm_epsilon)), ref.config.final_logit_softcapping)
    assert _max_diff(via, before) <= 1e-5, "last block's residual does not lead to forward's logits"
    with pytest.raises(InputError, match="layer 3 is out of range"):
        ref.residual(ids, 3)


# ---- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage,words", [
    (lambda p: p.update(W_dec=p["W_dec"].T.copy()), "W_dec has shape"),
    (lambda p: p.update(threshold=p["threshold"][:-1]), "threshold has shape"),
    (lambda p: p["b_enc"].__setitem__(3, np.nan), "b_enc holds 1 NaN"),
    (lambda p: p["W_enc"].__setitem__((0, 0), np.inf), "W_enc holds 1 NaN/inf"),
    (lambda p: p.pop("b_dec"), "lacks b_dec"),
    (lambda p: p.update(scaling_factor=np.full(96, 2.0, np.float32)), "scaling_factor"),
])
def test_bad_sae_files_are_typed_errors(tmp_path, damage, words):
    p = random_params()
    damage(p)
    write_npz(tmp_path, p)
    with pytest.raises(InputError, match=words):
        JumpReLUSAE.load(tmp_path)


def test_lowercase_keys_and_unit_scaling_factor_load(tmp_path):
    p = random_params()
    p["w_enc"], p["w_dec"] = p.pop("W_enc"), p.pop("W_dec")
    p["scaling_factor"] = np.ones(96, np.float32)
    assert JumpReLUSAE.load(write_npz(tmp_path, p)).d_sae == 96


def test_wrong_model_layer_text_feature(tmp_path):
    from trt_gemma.scope import load_for_features

    m, tok, sae = load_for_features(None, None, None, 2)
    wrong = JumpReLUSAE.from_arrays(random_params(d_model=128), "w")
    with pytest.raises(InputError, match="d_in=128 but the model is 256 wide at the res site"):
        features(m, tok, wrong, 2, "hello")
    with pytest.raises(InputError, match="longer than the model's context of 512"):
        features(m, tok, sae, 2, "word " * 600)
    with pytest.raises(InputError, match="out of range"):
        features(m, tok, sae, 2, "hello", feature=sae.d_sae)
    with pytest.raises(InputError, match="--layer 9 is out of range"):
        load_for_features(None, None, None, 9)
    with pytest.raises(InputError, match="covers layer"):
        load_for_features(None, None, None, 1)


def test_features_report(tmp_path):
    from trt_gemma.scope import load_for_features

    m, tok, sae = load_for_features(None, None, None, 2)
    text = "Return a list of the keys in the dictionary."
    r = features(m, tok, sae, 2, text, top_k=3, feature=7)
    ids = tok.encode(text)
    assert [e["id"] for e in r["tokens"]] == ids[1:], "<bos> must be excluded, every other token reported"
    x = m.activations(ids, 2, ("resid_post",))["resid_post"][1:]
    f = sae.encode(x)
    for e, row, xr in zip(r["tokens"], f, x):
        assert e["l0"] == np.count_nonzero(row)
        assert [t["feature"] for t in e["top"]] == [int(j) for j in np.argsort(-row, kind="stable")[:3] if row[j] > 0]
        assert abs(e["rel_error"] - np.linalg.norm(xr - sae.decode(row)) / np.linalg.norm(xr)) < 1e-6
        assert e["feature_activation"] == pytest.approx(float(row[7]))
    assert [t["activation"] for t in r["ranked"]] == sorted((float(v) for v in f[:, 7]), reverse=True)
    assert r["fvu"] == pytest.approx(fvu(x, sae.decode(f)))


def test_hub_id_through_huggingface_hub_cache(tmp_path, monkeypatch):
    """--sae ORG/NAME --sae-path P resolves through huggingface_hub.hf_hub_download; here offline, from a local
    cache laid out as the Hub client writes it (models--ORG--NAME/refs/main, snapshots/REV/...)."""
    import huggingface_hub.constants as hc

    rev = "0" * 40
    repo = tmp_path / "models--google--gemma-scope-test"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    write_npz(repo / "snapshots" / rev / "layer_2" / "width_96" / "average_l0_9", random_params())
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    p = resolve_sae("google/gemma-scope-test", "layer_2/width_96/average_l0_9")
    assert JumpReLUSAE.load(p).d_sae == 96
    with pytest.raises(InputError, match="cannot fetch"):
        resolve_sae("google/gemma-scope-test", "layer_3/width_96/average_l0_9")
    with pytest.raises(InputError, match="--sae-path"):
        resolve_sae("google/gemma-scope-test", None)


def test_local_dir_with_sae_path(tmp_path):
    write_npz(tmp_path / "layer_2" / "width_96" / "average_l0_9", random_params())
    assert JumpReLUSAE.load(resolve_sae(str(tmp_path), "layer_2/width_96/average_l0_9")).d_sae == 96


@pytest.mark.parametrize("site", [None, "transcoder"])
def test_features_cli_json_and_html(tmp_path, site):
    from click.testing import CliRunner

    from trt_gemma.cli import cli
    from trt_gemma.scope import SITES

    out = tmp_path / "f.html"
    r = CliRunner().invoke(cli, ["features", "--layer", "2", "--text", "The with statement", "--top", "2",
                                 "--html", str(out), "--json", *(["--site", site] if site else [])])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    sae = default_sae_dir(2, SITES[site or "res"])
    assert d["site"] == (site or "res") and d["hook"] == SITES[d["site"]].hooks(2) and d["sae"].startswith(str(sae))
    assert d["d_in"] == d["d_out"] == 256 and d["backend"] == "onnxruntime"
    assert f"site {d['site']}" in out.read_text() and d["hook"].split()[0] in out.read_text()
    assert d["html"] == str(out) and "feature" in d and len(d["tokens"]) >= 3
    strongest = max((f for e in d["tokens"] for f in e["top"]), key=lambda f: f["activation"])
    assert d["feature"] == strongest["feature"], (d["feature"], strongest)  # no --feature: the strongest one
    page = out.read_text()
    assert page.count('class="tok"') == len(d["tokens"]) and "<script" not in page and "http" not in page
    assert render_html(d) == page


def _chromium() -> str | None:
    import shutil

    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def test_html_page_renders_in_headless_chromium(tmp_path):
    """The --html page opened for real: Chromium's DOM after load holds one shaded span per token, the strongest
    token in the darkest blue, and a screenshot is produced."""
    import re
    import subprocess

    from trt_gemma.scope import _blue, load_for_features

    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this host (apt-get install chromium) to open the --html page")
    m, tok, sae = load_for_features(None, None, None, 2)
    r = features(m, tok, sae, 2, "Return a list of the keys in the dictionary.", feature=None)
    feat = max((f for e in r["tokens"] for f in e["top"]), key=lambda f: f["activation"])["feature"]
    r = features(m, tok, sae, 2, "Return a list of the keys in the dictionary.", feature=feat)
    page = tmp_path / "page.html"
    page.write_text(render_html(r))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    spans = re.findall(r'<span class="tok" style="background:\s*([^;"]+)', dom)
    assert len(spans) == len(r["tokens"]), f"Chromium's DOM has {len(spans)} token spans, expected {len(r['tokens'])}"
    strongest = max(range(len(r["tokens"])), key=lambda i: r["tokens"][i]["feature_activation"])
    assert spans[strongest].replace(" ", "") == _blue(1.0), spans[strongest]
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, "--window-size=900,360", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
