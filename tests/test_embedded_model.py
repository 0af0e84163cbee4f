"""The embedded default model (trt_gemma/assets/gemma2-pydoc-tiny): loads through transformers, has every Gemma 2 quirk
the pipeline must handle, fits the size budget, documents its corpus and license, is really trained (held-out
perplexity recomputed here far below the card's unigram baseline), and the reference runtime reproduces transformers'
logits on it after conversion."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from trt_gemma.assets import DEFAULT_MODEL_NAME, calib_text_path, default_model_dir, eval_text_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_BYTES = 25_000_000  # the "<= 25 MB on disk", counted for every file shipped in the dir
SEQ = 256  # the card's eval protocol: rows of 255 tokens after <bos>


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir()


@pytest.fixture(scope="module")
def hf_model(model_dir):
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


def _card(model_dir) -> str:
    return (model_dir / "MODEL_CARD.md").read_text()


def _card_number(card: str, label: str) -> float:
    m = re.search(rf"{label}:\s*([0-9.]+)", card)
    assert m, f"MODEL_CARD.md has no '{label}: <number>' line"
    return float(m.group(1))


def test_paths_are_package_data(model_dir):
    assert model_dir.name == DEFAULT_MODEL_NAME
    assert eval_text_path().parent == model_dir and eval_text_path().stat().st_size > 10_000
    assert calib_text_path().parent == model_dir and calib_text_path().stat().st_size > 10_000
    assert eval_text_path().read_text()[:2000] != calib_text_path().read_text()[:2000]


def test_tokenizer_has_gemma_specials_and_chat_template(hf_tokenizer, model_dir):
    from tokenizers import Tokenizer

    tok = hf_tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<pad>", "<eos>", "<bos>", "<unk>")}
    assert ids == {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    assert tok.convert_tokens_to_ids("<start_of_turn>") != tok.unk_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") != tok.unk_token_id
    text = "Return a list of the words in the string, using sep as the delimiter."
    enc = tok(text).input_ids
    assert enc[0] == 2 and enc == Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
    assert tok.decode(enc, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_config_has_every_gemma2_quirk(hf_model, model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Gemma2ForCausalLM"] and cfg["model_type"] == "gemma2"
    assert cfg["num_attention_heads"] * cfg["head_dim"] != cfg["hidden_size"]
    assert cfg["hidden_size"] % cfg["num_attention_heads"] == 0  # transformers >= 5 refuses otherwise
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["sliding_window"] < cfg["max_position_embeddings"]
    assert "sliding_attention" in cfg["layer_types"] and "full_attention" in cfg["layer_types"]
    assert cfg["attn_logit_softcapping"] and cfg["final_logit_softcapping"]
    assert cfg["tie_word_embeddings"] is True
    linears = {n: m.in_features for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == 7 * cfg["num_hidden_layers"] + 1  # q k v o gate up down per layer + lm_head
    bad = {n: f for n, f in linears.items() if f % 128}
    assert not bad, f"in_features not a multiple of 128 (INT4-AWQ g128 needs it): {bad}"


def test_files_fit_the_size_budget(model_dir):
    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"embedded model dir is {total:,} bytes > {MAX_BYTES:,}"


def test_card_states_corpus_license_and_perplexities(model_dir):
    card = _card(model_dir)
    assert "pydoc_data/topics.py" in card and "docstrings" in card
    assert "PSF License" in card
    ppl, unigram = _card_number(card, "Held-out perplexity"), _card_number(card, "Unigram baseline perplexity")
    assert 1.0 < ppl < unigram
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (model_dir / "LICENSE-DATA.txt").read_text()


def test_heldout_perplexity_far_below_unigram(hf_model, model_dir):
    """Recompute the card's protocol on the first rows of eval.txt: a trained model, not a unigram in disguise."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(eval_text_path().read_text(), add_special_tokens=False).ids
    rows = [[2, *ids[i:i + SEQ - 1]] for i in range(0, 6 * (SEQ - 1), SEQ - 1)]
    x = torch.tensor(rows)
    with torch.no_grad():
        logits = hf_model(input_ids=x).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    ppl = math.exp(nll.item())
    unigram = _card_number(_card(model_dir), "Unigram baseline perplexity")
    assert ppl < unigram / 3, f"held-out perplexity {ppl:.1f} is not well below the unigram baseline {unigram:.1f}"


def test_reference_runtime_matches_transformers(hf_model, model_dir, tmp_path):
    """Convert the shipped model to a TRT-LLM checkpoint (fp32) and compare the numpy reference's logits with
    transformers' on a held-out prompt longer than the sliding window."""
    from tokenizers import Tokenizer

    from trt_gemma import reference  # our own modules: a broken import must fail, not skip
    from trt_gemma.checkpoint import convert

    ckpt = convert.convert_checkpoint(model_dir, tmp_path / "ckpt", dtype="float32", show_progress=False)
    ref = reference.ReferenceModel.load(ckpt)
    window = json.loads((model_dir / "config.json").read_text())["sliding_window"]
    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(eval_text_path().read_text()).ids[:window + 72]
    assert len(ids) > window
    got = np.asarray(ref.forward(np.array([ids]), None), dtype=np.float32)
    with torch.no_grad():
        want = hf_model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    diff = np.abs(got - want)
    assert diff.max() <= 1e-4, f"reference vs transformers logits: max diff {diff.max():.3e}, mean {diff.mean():.3e}"
    assert (got.argmax(-1) == want.argmax(-1)).all()
