"""GemmaTokenizer (tokenizers only) against transformers' AutoTokenizer + apply_chat_template on the tiny tokenizer."""
from __future__ import annotations

import pytest

from trt_gemma.errors import InputError
from trt_gemma.runtime.tokenizer import GemmaTokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["The quick brown fox", "  leading and trailing  ", "héllo wörld, 日本語 ✓ 🚀", "line one\nline two",
         "<start_of_turn>user\nhi<end_of_turn>"]
CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "  What is TensorRT?\n"}, {"role": "assistant", "content": " An SDK. "},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "a"}, {"role": "model", "content": "b"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tiny import write_tiny_tokenizer

    d = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return GemmaTokenizer.from_dir(tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_ids_and_sizes(tok, hf_tok):
    assert (tok.bos_id, tok.eos_id, tok.end_of_turn_id) == (2, 1, 5)
    assert tok.stop_token_ids == (1, 5)
    assert tok.vocab_size == len(hf_tok)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    """Text is text: transformers with split_special_tokens=True (special-token strings tokenized as characters)."""
    assert tok.encode(text) == hf_tok(text, split_special_tokens=True)["input_ids"]
    assert tok.encode(text, add_bos=False) == hf_tok(text, add_special_tokens=False,
                                                     split_special_tokens=True)["input_ids"]
    ids = tok.encode(text)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special=False) == hf_tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("gen", [True, False])
def test_chat_matches_apply_chat_template(tok, hf_tok, messages, gen):
    hf_msgs = [dict(m, role="assistant" if m["role"] == "model" else m["role"]) for m in messages]
    want = hf_tok.apply_chat_template(hf_msgs, tokenize=False, add_generation_prompt=gen)
    assert tok.render_chat(messages, add_generation_prompt=gen) == want
    ids = tok.encode_chat(messages, add_generation_prompt=gen)
    assert ids == hf_tok(want, add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id  # no double <bos>


def test_system_message_is_folded_into_the_first_user_turn(tok, hf_tok):
    msgs = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": " Hi"}]
    want = hf_tok.apply_chat_template([{"role": "user", "content": "Be brief.\n\nHi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert tok.render_chat(msgs) == want
    alone = tok.render_chat([{"role": "system", "content": "Rules"}])
    assert alone == "<bos><start_of_turn>user\nRules<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("messages", [
    [], [{"role": "assistant", "content": "x"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}],
    [{"role": "tool", "content": "a"}], [{"role": "user", "content": 3}], ["hello"],
])
def test_bad_conversations_are_input_errors(tok, messages):
    with pytest.raises(InputError):
        tok.render_chat(messages)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoder_reassembles_text(tok, text):
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    pieces = [dec.push(t) for t in ids]
    pieces.append(dec.flush())
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces), f"a split character leaked: {pieces}"


def test_missing_tokenizer_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="tokenizer.json"):
        GemmaTokenizer.from_dir(tmp_path)


def test_special_tokens_fall_back_to_the_map_and_bad_files_are_input_errors(tok_dir, tmp_path):
    import json
    import shutil

    d = shutil.copytree(tok_dir, tmp_path / "t")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192}))  # no bos/eos here
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": "<eos>"}, "eos_token": "<bos>"}))
    swapped = GemmaTokenizer.from_dir(d)
    assert (swapped.bos_id, swapped.eos_id) == (1, 2), "special_tokens_map.json was not read"
    (d / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="not a JSON object"):
        GemmaTokenizer.from_dir(d)
