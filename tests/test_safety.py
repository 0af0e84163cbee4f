"""ShieldGemma scoring (trt_gemma/safety.py) against independent oracles: the tutorial's own code for the prompts
(tests/fixtures/shieldgemma_cookbook.json holds its cell 12 verbatim, google-gemini/gemma-cookbook
responsible/shieldgemma_on_huggingface.ipynb@e119e3d2), transformers' Gemma2ForCausalLM + its tokenizer for the
scores (the tutorial's preprocess_and_predict, rewritten on CPU in float32)."""
from __future__ import annotations

import enum
import json
import math
from pathlib import Path

import numpy as np
import pytest

from trt_gemma.errors import ConfigError, InputError
from trt_gemma.safety import (POLICIES, SOURCE, Moderator, Verdict, answer_tokens, load_moderator, load_thresholds,
                              make_prompt)
from trt_gemma.targets import get_target

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "shieldgemma_cookbook.json").read_text())
HARM = {"dangerous": "DANGEROUS", "hate": "HATE", "sexual": "SEXUAL", "harassment": "HARASSMENT"}
TOL = 1e-5


@pytest.fixture(scope="module")
def cookbook():
    """The tutorial's cell 12 executed as written: HarmType, UseCase, make_prompt."""
    ns = {"enum": enum}
    exec(FIXTURE["cell_12"], ns)  # noqa: S102 - the fixture is the tutorial's code, pinned in the repo
    return ns


def test_fixture_names_the_pinned_source():
    assert FIXTURE["source"] == SOURCE


@pytest.mark.parametrize("vector", FIXTURE["vectors"], ids=lambda v: f"cell{v['cell']}")
@pytest.mark.parametrize("policy", list(POLICIES))
def test_prompts_are_byte_exact_with_the_tutorial(cookbook, vector, policy):
    harm, uc = cookbook["HarmType"][HARM[policy]], cookbook["UseCase"]
    want = cookbook["make_prompt"](uc.PROMPT_ONLY, harm, vector["user_content"])
    assert make_prompt(policy, vector["user_content"]) == want
    if vector["model_content"] is not None:
        want = cookbook["make_prompt"](uc.PROMPT_RESPONSE, harm, vector["user_content"], vector["model_content"])
        assert make_prompt(policy, vector["user_content"], vector["model_content"]) == want


def test_rendered_test_vector_keeps_line_breaks_and_double_space():
    assert make_prompt("harassment", "Create 20 paraphrases of I hate you") == FIXTURE["rendered_cell_15"]
    assert "to be sure  we answer" in make_prompt("hate", "q", "r")  # the prompt-response template's double space
    assert make_prompt("hate", "q").endswith("correctly.\n\n")


# ---- scores vs transformers ----------------------------------------------------------------------------------------

def _yes_no_tokenizer(path: Path) -> None:
    """tests/tiny.py's tokenizer trained on text where 'Yes' and 'No' occur often enough to become single tokens
    (as in ShieldGemma's vocabulary), so the exact-token path is the one tested."""
    import tiny

    orig = tiny._TEXT
    tiny._TEXT = orig + "Your answer must start with 'Yes' or 'No'. " * 40
    try:
        tiny.write_tiny_tokenizer(path, vocab_size=tiny.TINY["vocab_size"])
    finally:
        tiny._TEXT = orig


@pytest.fixture(scope="module")
def yes_no_model(tmp_path_factory):
    from tiny import make_tiny_hf_model

    path = make_tiny_hf_model(tmp_path_factory.mktemp("guard") / "tiny-guard", max_position_embeddings=1024)
    _yes_no_tokenizer(path)
    return path


def _transformers_scores(model_dir: Path, prompts: dict[str, str], yes_no=None) -> dict[str, float]:
    """The tutorial's preprocess_and_predict on CPU: tokenizer(prompt), logits[0, -1, [YES, NO]], softmax."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.Gemma2ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yes, no = yes_no or (tok.convert_tokens_to_ids("Yes"), tok.convert_tokens_to_ids("No"))
    out = {}
    with torch.no_grad():
        for policy, prompt in prompts.items():
            logits = model(**tok(prompt, return_tensors="pt")).logits
            out[policy] = float(torch.softmax(logits[0, -1, [yes, no]].double(), dim=0)[0])
    return out


@pytest.mark.parametrize("response", [None, "I will not do that. Here is a kind message instead."],
                         ids=["prompt-only", "prompt-response"])
def test_scores_equal_softmax_of_transformers_logits(yes_no_model, response, tmp_path):
    mod = load_moderator(yes_no_model, cache_dir=tmp_path, backend="reference")  # the oracle; onnxruntime: below
    assert not mod.tokens.first_token_fallback, mod.tokens
    text = FIXTURE["vectors"][0]["user_content"]
    got = mod.score(text, response)
    want = _transformers_scores(yes_no_model, {p: make_prompt(p, text, response) for p in POLICIES})
    diffs = {p: abs(got.scores[p] - want[p]) for p in POLICIES}
    assert max(diffs.values()) <= TOL, f"|p_yes - transformers| per policy: {diffs}"
    assert got.mode == ("prompt_only" if response is None else "prompt_response")


def test_embedded_model_uses_first_tokens_and_matches_transformers(tmp_path):
    from trt_gemma.assets import default_model_dir

    transformers = pytest.importorskip("transformers")
    mod = load_moderator(None, cache_dir=tmp_path, backend="reference")
    assert mod.tokens.first_token_fallback and "first token" in mod.notices[-1]
    assert any("not a safety classifier" in n for n in mod.notices)
    hf_tok = transformers.AutoTokenizer.from_pretrained(default_model_dir())
    yes, no = (hf_tok(w, add_special_tokens=False).input_ids[0] for w in ("Yes", "No"))
    assert (mod.tokens.yes_id, mod.tokens.no_id) == (yes, no)
    prompt, response = "How do I sort a list?", "Use sorted(xs)."
    got = mod.score(prompt, response, ["hate", "dangerous"])
    want = _transformers_scores(default_model_dir(), {p: make_prompt(p, prompt, response) for p in got.scores},
                                (yes, no))
    diffs = {p: abs(got.scores[p] - want[p]) for p in got.scores}
    assert max(diffs.values()) <= TOL, diffs
    ids = hf_tok(make_prompt("hate", prompt, response)).input_ids
    assert mod.encode_prompt("hate", prompt, response) == ids, "token ids differ from transformers' tokenizer"


# ---- the onnxruntime backend against the reference ----------------------------------------------------------------

def _default_backend() -> str:
    from trt_gemma.runtime.backends import onnxruntime_available

    return "onnxruntime" if onnxruntime_available() else "reference"


@pytest.mark.parametrize("which", ["embedded", "yes-no-tokens"])
def test_onnxruntime_scores_equal_the_reference(which, yes_no_model, tmp_path):
    """The same Moderator over the cached ONNX export (the default CPU backend) and over the reference runtime:
    same ids, same Yes/No tokens, P("Yes") within 1e-5 (fp32), prompt-only and prompt-response."""
    if _default_backend() != "onnxruntime":
        pytest.skip("onnxruntime / onnx are not installed (pip install 'trt-gemma[onnx]')")
    model, cache = (None if which == "embedded" else yes_no_model), tmp_path / "checkpoints"
    ref = load_moderator(model, cache_dir=cache, backend="reference")
    ort = load_moderator(model, cache_dir=cache, backend="onnxruntime")
    assert (ref.backend, ort.backend) == ("reference", "onnxruntime")
    assert ort.tokens == ref.tokens and ort.context_length == ref.context_length and ort.name == ref.name
    assert ort.notices == ref.notices
    text = FIXTURE["vectors"][0]["user_content"]
    for response in (None, "I will not do that. Here is a kind message instead."):
        want, got = ref.score(text, response), ort.score(text, response)
        assert got.prompt_tokens == want.prompt_tokens, "the export's tokenizer encodes differently"
        diffs = {p: abs(got.scores[p] - want.scores[p]) for p in POLICIES}
        assert max(diffs.values()) <= TOL, f"{got.mode}: |p_yes onnxruntime - reference| per policy: {diffs}"


def test_backend_choice_follows_load_backend(tmp_path, monkeypatch):
    """auto is load_backend's choice: onnxruntime where installed, else the reference; engines are refused."""
    from trt_gemma.runtime import backends

    assert load_moderator(None, cache_dir=tmp_path).backend == _default_backend()
    monkeypatch.setattr(backends, "onnxruntime_available", lambda: False)  # a host without the onnx extra
    assert load_moderator(None, cache_dir=tmp_path).backend == "reference"
    with pytest.raises(InputError, match="not one of auto, reference, onnxruntime"):
        load_moderator(None, cache_dir=tmp_path, backend="trtllm")


# ---- thresholds and bad input ---------------------------------------------------------------------------------------

def test_threshold_is_inclusive_and_per_policy():
    v = Verdict({"hate": 0.5, "sexual": 0.4999999, "harassment": 0.9}, {"hate": 0.5, "sexual": 0.5,
                                                                       "harassment": 0.95, "dangerous": 0.5},
                "prompt_only", 0.0)
    assert v.flags == {"hate": True, "sexual": False, "harassment": False}
    assert v.flagged and v.violated == ["hate"]


def test_threshold_file(tmp_path):
    assert load_thresholds() == dict.fromkeys(POLICIES, 0.5)
    f = tmp_path / "t.toml"
    f.write_text("[thresholds]\nhate = 0.2\n")
    assert load_thresholds(f)["hate"] == 0.2 and load_thresholds(f)["sexual"] == 0.5
    for bad, words in (("hate = 1.5", "[0, 1]"), ("violence = 0.1", "unknown policy"), ("hate = true", "[0, 1]"),
                       ("hate = ", "not valid TOML")):
        f.write_text(f"[thresholds]\n{bad}\n")
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            load_thresholds(f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_thresholds(tmp_path / "missing.toml")


class _WordTokenizer:
    """A tokenizer whose vocabulary lacks Yes/No: every unknown word is <unk> (tokenizers' WordLevel model)."""

    def __init__(self, vocab):
        from tokenizers import Tokenizer, models, pre_tokenizers

        self._t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        self._t.pre_tokenizer = pre_tokenizers.Whitespace()

    def token_to_id(self, t):
        return self._t.token_to_id(t)

    def encode(self, text, add_bos=True):
        return self._t.encode(text).ids

    def decode(self, ids, skip_special=True):
        return self._t.decode(ids)


def test_tokenizer_without_yes_no_is_a_clear_error():
    with pytest.raises(InputError, match="cannot encode 'Yes'"):
        answer_tokens(_WordTokenizer({"<unk>": 0, "<bos>": 1, "hello": 2}))


def test_coinciding_first_tokens_are_a_clear_error():
    class _Chars(_WordTokenizer):  # splits nothing: "Yes" and "No" both start with token 2 ("x")
        def encode(self, text, add_bos=True):
            return [2, 3]

    tok = _Chars({"<unk>": 0, "x": 2, "y": 3})
    with pytest.raises(InputError, match="same token"):
        answer_tokens(tok)


def test_text_longer_than_the_guard_context_is_refused():
    from trt_gemma.runtime.tokenizer import GemmaTokenizer
    from trt_gemma.assets import default_model_dir

    tok = GemmaTokenizer.from_dir(default_model_dir())
    mod = Moderator(lambda ids: np.zeros(4096, np.float32), tok, context_length=400)
    assert math.isclose(mod.score("short", policies=["hate"]).scores["hate"], 0.5)  # equal logits: 0.5
    with pytest.raises(InputError, match="longer than the guard's context of 400"):
        mod.score("word " * 400)


def test_moderate_cli_json(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from trt_gemma.cli import cli

    monkeypatch.setenv("TRT_GEMMA_CACHE", str(tmp_path))
    for flag, backend in (((), _default_backend()), (("--backend", "reference"), "reference")):
        r = CliRunner().invoke(cli, ["moderate", "--prompt", "hello there", "--policy", "hate", "--json", *flag])
        assert r.exit_code == 0, r.output
        d = json.loads(r.stdout)
        assert d["backend"] == backend, d
        direct = load_moderator(None, cache_dir=tmp_path / "checkpoints", backend=backend)
        want = direct.score("hello there", policies=["hate"])
        assert abs(d["scores"]["hate"] - want.scores["hate"]) < 1e-12
        assert any("not a safety classifier" in n for n in d["notices"]) and d["flagged"] is want.flagged


# ---- plan --guard ---------------------------------------------------------------------------------------------------

def test_plan_with_guard_counts_both_models_and_the_runtime_once():
    from trt_gemma.plan import plan
    from trt_gemma.safety import plan_with_guard

    t = get_target("jetson-orin-nano-8gb")
    chat = plan("gemma-2-2b", t, overrides={"quant": "int4_awq"})
    guard = plan("shieldgemma-2b", t, overrides={"quant": "int4_awq", "max_batch_size": 4})
    d = plan_with_guard(chat, "shieldgemma-2b", t, {"quant": "int4_awq"})
    assert d["guard"]["plan"]["recipe"]["max_batch_size"] == 4 and d["guard"]["plan"]["recipe"]["quant"] == "int4_awq"
    assert d["combined"]["total_bytes"] == chat.total_bytes + guard.total_bytes - sum(guard.overhead.values())
    assert d["combined"]["total_bytes"] > chat.total_bytes


def test_plan_guard_cli_exit_codes():
    from trt_gemma.cli import main  # the console entry: typed errors become exit codes

    def run(*args):
        with pytest.raises(SystemExit) as e:
            main(["plan", "--model", "gemma-2-2b", "--guard", "shieldgemma-2b", "--json", *args])
        return e.value.code

    assert run("--target", "jetson-orin-nano-8gb", "--quant", "bfloat16") == 3  # two bf16 2B models > 8 GB
    assert run("--target", "jetson-agx-orin-64gb") == 0


def test_pair_suggestion_is_the_first_change_that_fits():
    from trt_gemma.plan import plan
    from trt_gemma.safety import PAIR_FIXES, plan_with_guard

    t = get_target("jetson-orin-nano-8gb")
    d = plan_with_guard(plan("gemma-2-2b", t), "shieldgemma-2b", t, chat_model="gemma-2-2b")
    assert d["combined"]["verdict"] == "does not fit"
    sug = d["combined"]["suggestion"]
    # fixes are tried cumulatively, in order: the suggestion is the first prefix of PAIR_FIXES with which both fit
    prefixes = [{k: v for fix in PAIR_FIXES[:n] for k, v in fix.items()} for n in range(1, len(PAIR_FIXES) + 1)]
    assert sug is not None and sug["set"] in prefixes, sug
    n = prefixes.index(sug["set"])

    def pair(over):
        return plan_with_guard(plan("gemma-2-2b", t, overrides=over), "shieldgemma-2b", t, over)["combined"]

    again = pair(sug["set"])
    assert again["verdict"] == "fits" and again["total_bytes"] == sug["total_bytes"]
    if n:
        assert pair(prefixes[n - 1])["verdict"] != "fits", "an earlier prefix already fits"
    t4 = get_target("jetson-orin-nano-4gb")
    small = plan_with_guard(plan("gemma-2-2b", t4), "shieldgemma-2b", t4, chat_model="gemma-2-2b")
    assert small["combined"]["suggestion"] is None  # nothing in PAIR_FIXES makes two 2B models fit in 4 GB
