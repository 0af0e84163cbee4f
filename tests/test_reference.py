"""The numpy reference runtime against transformers' Gemma2ForCausalLM (eager attention) on tiny random models,
through checkpoints written by trt_gemma.checkpoint.convert. Failure messages print max and mean differences."""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from trt_gemma.checkpoint.dtypes import NAME_TO_ST, round_to  # noqa: E402
from trt_gemma.errors import ConfigError, InputError, UnsupportedModelError  # noqa: E402
from trt_gemma.reference import CheckpointConfig, ReferenceModel, SamplingParams, generate_stream  # noqa: E402
from trt_gemma.reference.generate import generate  # noqa: E402
from trt_gemma.reference.sampling import Sampler, top_k_filter, top_p_filter  # noqa: E402

SEQ = 40  # > 4 x the tiny sliding window (8): the window really cuts keys off


def _convert(src, out, **kw):
    from trt_gemma.checkpoint.convert import convert_checkpoint

    convert_checkpoint(src, out, show_progress=False, **kw)
    return out


def _diff(a, b) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return float(d.max()), float(d.mean())


def _assert_close(a, b, atol, what):
    mx, mean = _diff(a, b)
    assert mx <= atol, f"{what}: max abs diff {mx:.3g} > {atol:.3g} (mean {mean:.3g})"


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    torch.set_num_threads(1)
    return transformers.Gemma2ForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def ckpt32(tiny_model_dir, tmp_path_factory):
    return _convert(tiny_model_dir, tmp_path_factory.mktemp("ck") / "fp32", dtype="float32")


@pytest.fixture(scope="module")
def model32(ckpt32):
    return ReferenceModel.load(ckpt32)


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(6, 360, SEQ)


def _hf_logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids))[None]).logits[0].float().numpy()


def test_fp32_logits_match_transformers(model32, hf_model, ids):
    assert model32.config.sliding_window == 8 and model32.config.is_sliding(0) and not model32.config.is_sliding(1)
    _assert_close(model32.forward(ids[None]), _hf_logits(hf_model, ids), 1e-4, f"fp32 logits over {SEQ} tokens")


@pytest.mark.parametrize("shift", [-1, 1])
def test_window_boundary_is_exact(model32, hf_model, ids, shift):
    """The comparison above can see the window edge: moving it by one token breaks the agreement."""
    blocks = [dataclasses.replace(b, window=None if b.window is None else b.window + shift) for b in model32.blocks]
    moved = copy.copy(model32)
    moved.blocks = blocks
    mx, mean = _diff(moved.forward(ids), _hf_logits(hf_model, ids))
    assert mx > 1e-2, f"window {8 + shift} should not match transformers' 8 (max {mx:.3g}, mean {mean:.3g})"


def test_incremental_decode_matches_full_sequence(model32, ids):
    full = model32.forward(ids)
    cache = model32.new_cache(64)
    parts = [model32.forward(ids[:13], cache), model32.forward(ids[13:18], cache)]
    parts += [model32.forward(ids[i:i + 1], cache) for i in range(18, SEQ)]
    assert cache.length == SEQ and cache.nbytes_used == SEQ * model32.kv_bytes_per_token
    _assert_close(np.concatenate(parts), full, 5e-5, "prefill 13 + chunk 5 + one-by-one vs full sequence")
    last = model32.forward(ids, last_only=True)
    _assert_close(last, full[-1:], 1e-5, "last_only logits")


def test_cache_overflow_is_a_typed_error(model32, ids):
    cache = model32.new_cache(4)
    with pytest.raises(InputError, match="overflow"):
        model32.forward(ids[:5], cache)
    with pytest.raises(InputError, match="capacity"):
        model32.new_cache(model32.config.max_position_embeddings + 1)


def test_greedy_generation_matches_transformers_generate(tmp_path):
    """32 greedy steps past the sliding window. A smaller init than the shared tiny model keeps the residual stream
    from being dominated by the input embedding (which makes a random model repeat its last token forever)."""
    from tiny import make_tiny_hf_model

    src = make_tiny_hf_model(tmp_path / "hf", seed=3, initializer_range=0.02)
    hf = transformers.Gemma2ForCausalLM.from_pretrained(src, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None
    model = ReferenceModel.load(_convert(src, tmp_path / "ck", dtype="float32"))
    prompt = np.random.default_rng(1).integers(6, 360, 12)
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt)[None], max_new_tokens=32, do_sample=False,
                           pad_token_id=0)[0, len(prompt):].tolist()
    got = [ev.token_id for ev in generate_stream(model, prompt, SamplingParams(max_tokens=32))]
    assert len(set(want)) > 2, f"degenerate oracle output {want}"
    first_bad = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert got == want, f"greedy tokens differ from step {first_bad}: ours {got} vs transformers {want}"


def _rounded_like_checkpoint(hf, st: str):
    """The fp32 HF model with every weight rounded as a `st` checkpoint stores it: linears and the embedding
    rounded, norms stored as (1 + w) rounded (so w' = round(1 + w) - 1, exact in float32)."""
    m = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in m.named_parameters():
            x = p.detach().numpy()
            x = round_to(x + 1.0, st) - 1.0 if "norm" in name else round_to(x, st)
            p.copy_(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
    return m


# Against the unrounded fp32 model the error is the weights' rounding carried through 3 layers: bf16 keeps 8
# significant bits (relative rounding <= 2^-9), fp16 11 (2^-12), so fp16 is ~8x closer. Measured on the tiny model
# (logits mean |x| ~2.4): bf16 max 0.10 / mean 0.013, fp16 max 0.010 / mean 0.0017; bounds leave ~2.5x headroom.
LOOSE = {"bfloat16": (0.25, 0.03), "float16": (0.03, 0.004)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints(dtype, tiny_model_dir, hf_model, ids, tmp_path):
    model = ReferenceModel.load(_convert(tiny_model_dir, tmp_path / dtype, dtype=dtype))
    ours = model.forward(ids)
    # exact check: the same rounded weights in transformers, computed in float32
    exact = _hf_logits(_rounded_like_checkpoint(hf_model, NAME_TO_ST[dtype]), ids)
    _assert_close(ours, exact, 1e-4, f"{dtype} checkpoint vs transformers with {dtype}-rounded weights")
    mx, mean = _diff(ours, _hf_logits(hf_model, ids))
    max_tol, mean_tol = LOOSE[dtype]
    assert mx <= max_tol and mean <= mean_tol, \
        f"{dtype} vs fp32 transformers: max {mx:.3g} (tol {max_tol}), mean {mean:.3g} (tol {mean_tol})"


def test_tp2_checkpoint_gives_tp1_logits(tiny_model_dir, model32, ids, tmp_path):
    ck = _convert(tiny_model_dir, tmp_path / "tp2", dtype="float32", tp=2)
    assert (ck / "rank1.safetensors").exists()
    tp2 = ReferenceModel.load(ck)
    assert tp2.config.tp_size == 2
    _assert_close(tp2.forward(ids), model32.forward(ids), 1e-6, "TP=2 vs TP=1 logits")
    for a, b in zip(tp2.blocks, model32.blocks):
        assert np.array_equal(a.qkv.weight, b.qkv.weight), "merged qkv differs from the TP=1 tensor"


# ---- checkpoint reading: typed errors ------------------------------------------------------------------------------

def _copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst, json.loads((dst / "config.json").read_text())


def test_checkpoint_errors(ckpt32, tmp_path):
    ck, cfg = _copy_ckpt(ckpt32, tmp_path / "a")
    bad = dict(cfg)
    del bad["head_size"]
    (ck / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="head_size"):
        ReferenceModel.load(ck)
    (ck / "config.json").write_text(json.dumps(dict(cfg, quantization={"quant_algo": "NVFP4"})))
    with pytest.raises(UnsupportedModelError, match="NVFP4"):
        ReferenceModel.load(ck)
    (ck / "config.json").write_text(json.dumps(dict(cfg, mapping={"world_size": 2, "tp_size": 2, "pp_size": 1})))
    with pytest.raises(InputError, match="rank1.safetensors"):
        ReferenceModel.load(ck)
    for bad in (dict(cfg, mapping={"world_size": 0, "tp_size": 0, "pp_size": 1}), dict(cfg, head_size=0),
                dict(cfg, num_key_value_heads=-2)):  # sizes the loader divides by: typed, not ZeroDivisionError
        (ck / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError, match="must be >= 1"):
            ReferenceModel.load(ck)
    with pytest.raises(InputError, match="does not exist"):
        ReferenceModel.load(tmp_path / "nowhere")


def test_checkpoint_without_window_keys_is_all_global(ckpt32, model32, ids, tmp_path):
    """TRT-LLM's own Gemma 2 config has no sliding_window: every layer is then global, as TRT-LLM runs it."""
    ck, cfg = _copy_ckpt(ckpt32, tmp_path / "b")
    cfg.pop("trt_gemma", None)
    (ck / "config.json").write_text(json.dumps(cfg))
    m = ReferenceModel.load(ck)
    assert not any(m.config.is_sliding(i) for i in range(m.config.num_hidden_layers))
    assert CheckpointConfig.from_file(ck / "config.json").sliding_window is None
    short = ids[:8]  # within the window, global and sliding attention agree
    _assert_close(m.forward(short), model32.forward(short), 1e-6, "all-global model, sequence within the window")
    mx, mean = _diff(m.forward(ids), model32.forward(ids))
    assert mx > 1e-2, f"past the window, global attention should differ (max {mx:.3g}, mean {mean:.3g})"


def test_model_accounting(model32, ckpt32):
    assert model32.weight_bytes == sum(f.stat().st_size for f in ckpt32.glob("rank*.safetensors")) - \
        sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in ckpt32.glob("rank*.safetensors"))
    c = model32.config
    assert model32.kv_bytes_per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_size * 4
    cache = model32.new_cache(10)
    assert cache.capacity == 10 and cache.length == 0 and cache.nbytes_capacity == 10 * model32.kv_bytes_per_token


# ---- sampling and generation ------------------------------------------------------------------------------------

def _tokens(model, prompt, **kw):
    return [ev.token_id for ev in generate_stream(model, prompt, SamplingParams(**kw))]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model32, ids):
    prompt = ids[:6]
    a = _tokens(model32, prompt, max_tokens=12, temperature=1.0, seed=7)
    assert a == _tokens(model32, prompt, max_tokens=12, temperature=1.0, seed=7)
    others = [_tokens(model32, prompt, max_tokens=12, temperature=1.0, seed=s) for s in (8, 9, 10)]
    assert any(o != a for o in others), "different seeds gave identical samples"
    greedy = _tokens(model32, prompt, max_tokens=12)
    assert _tokens(model32, prompt, max_tokens=12, temperature=1.5, top_k=1, seed=3) == greedy


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))
    kept = np.isfinite(top_k_filter(logits, 2))
    assert kept.tolist() == [True, True, False, False, False]
    assert np.isfinite(top_p_filter(logits, 0.75)).tolist() == [True, True, False, False, False]
    assert np.isfinite(top_p_filter(logits, 0.81)).tolist() == [True, True, True, False, False]
    assert np.isfinite(top_p_filter(logits, 0.1)).sum() == 1  # always at least the top token
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    draws = {s(logits) for _ in range(300)}
    assert draws == {0, 1}, f"top_p=0.75 drew tail tokens: {sorted(draws)}"
    probs = s.probabilities(logits)
    np.testing.assert_allclose(probs[:2], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-12)


def test_bad_sampling_params():
    for kw in (dict(max_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(InputError):
            SamplingParams(**kw)


def test_stop_tokens_and_max_tokens_end_generation(model32, ids):
    prompt = ids[:6]
    free = _tokens(model32, prompt, max_tokens=10)
    stop = free[3]
    first = free.index(stop)
    events = list(generate_stream(model32, prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop,))))
    assert [e.token_id for e in events] == free[:first + 1]
    assert events[-1].finish_reason == "stop" and all(e.finish_reason is None for e in events[:-1])
    assert events[0].is_prompt_step and not any(e.is_prompt_step for e in events[1:])
    result = generate(model32, prompt, SamplingParams(max_tokens=10, stop_token_ids=(stop,)))
    assert result.token_ids == free[:first] and result.finish_reason == "stop"  # the stop token is not output
    events = list(generate_stream(model32, prompt, SamplingParams(max_tokens=4)))
    assert len(events) == 4 and events[-1].finish_reason == "length"


def test_cancel_ends_the_stream(model32, ids):
    calls = []
    events = list(generate_stream(model32, ids[:6], SamplingParams(max_tokens=20),
                                  cancel=lambda: calls.append(1) or len(calls) >= 3))
    assert len(events) == 3 and events[-1].finish_reason == "cancelled"


def test_generation_record(model32, ids):
    r = generate(model32, ids[:6], SamplingParams(max_tokens=8))
    assert r.prompt_tokens == 6 and r.generated_tokens == len(r.token_ids) == 8 and r.finish_reason == "length"
    assert r.ttft_s > 0 and r.total_s >= r.ttft_s and r.decode_tokens_per_s > 0 and r.peak_rss_bytes > 0
    assert r.effective_bandwidth_bytes_per_s == pytest.approx(model32.weight_bytes * r.decode_tokens_per_s)
    assert set(r.to_dict()) >= {"text", "token_ids", "finish_reason", "ttft_s", "decode_tokens_per_s", "peak_rss_bytes"}
