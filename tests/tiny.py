"""Tiny random Gemma 2 models made by transformers, shared by the test suite.

The config exercises every Gemma 2 quirk: heads x head_dim != hidden, GQA, sequence longer than the sliding window,
non-default query_pre_attn_scalar, soft-caps small enough to bend random logits, every linear in_features a multiple
of 128 (INT4-AWQ group 128), hidden a multiple of the head count (transformers >= 5 requires it).
"""
from __future__ import annotations

import json
from pathlib import Path

from trt_gemma.runtime.tokenizer import CHAT_TEMPLATE

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

TINY = dict(
    architectures=["Gemma2ForCausalLM"], model_type="gemma2",
    vocab_size=384, hidden_size=256, intermediate_size=384, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
    max_position_embeddings=256, sliding_window=8, rms_norm_eps=1e-6, rope_theta=10000.0,
    attn_logit_softcapping=5.0, final_logit_softcapping=8.0, hidden_activation="gelu_pytorch_tanh",
    hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True, initializer_range=0.2, torch_dtype="float32",
    pad_token_id=0, eos_token_id=1, bos_token_id=2, attention_dropout=0.0, attention_bias=False,
)


_TEXT = ("The quick brown fox jumps over the lazy dog. Gemma runs on NVIDIA Jetson and RTX GPUs. "
         "TensorRT-LLM builds engines; the server streams tokens and reports memory. ") * 20


def tiny_config(**overrides) -> dict:
    return dict(TINY, **overrides)


def write_tiny_tokenizer(path: Path, vocab_size: int = 384) -> None:
    """A byte-level BPE with Gemma's special tokens (ids 0..5), tokenizer_config.json with Gemma's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT], trainer)
    bos = tok.token_to_id("<bos>")  # Gemma's tokenizer prepends <bos> itself (add_special_tokens=True)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", bos)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "chat_template": CHAT_TEMPLATE,
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}))


# Gemma 2's control tokens at their ids (google-deepmind/gemma gemma/gm/text/_tokenizer.py
# @bfd26f252dfd3b02922667d1fe8590f0be838a8c `_Gemma2SpecialTokens` and `_add_custom_tokens`: pad 0, eos 1, bos 2,
# unk 3, mask 4, <2mass> 5, [@BOS@] 6, <unusedN> = 7 + N for N in 0..98, <start_of_turn> 106,
# <end_of_turn> 107), flagged as Google's tokenizer.json flags them: only pad/eos/bos/unk and the two turn tokens are
# marked special; <mask>, <2mass>, [@BOS@] and <unusedN> are added tokens without the flag (the reason for llama.cpp's
# does_token_look_special, ggml-org/llama.cpp convert_hf_to_gguf.py@a458664fc83b6513baea7adafcb0ef0626b006f8).
GEMMA2_CONTROLS = (["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<2mass>", "[@BOS@]"]
                   + [f"<unused{n}>" for n in range(99)] + ["<start_of_turn>", "<end_of_turn>"])
GEMMA2_MARKED_SPECIAL = {"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"}


def write_gemma2_specials_tokenizer(path: Path) -> None:
    """A small tokenizer with Gemma 2's control tokens (ids 0..107, flags as above) and Gemma's pipeline (transformers
    models/gemma/tokenization_gemma.py: BPE with byte fallback, " " -> "\u2581", the ByteFallback decoder); the rest
    of the vocabulary is "\n" (an added token that is not a control token, as id 108 in Gemma 2), the 256 byte
    tokens and printable ASCII, no merges. For checking that text never yields a control id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    vocab = {t: i for i, t in enumerate(GEMMA2_CONTROLS)}
    vocab["\n"] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["\u2581"] + [chr(c) for c in range(33, 127)]:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    for t in GEMMA2_CONTROLS + ["\n"]:
        token = AddedToken(t, normalized=False, special=t in GEMMA2_MARKED_SPECIAL)
        (tok.add_special_tokens if t in GEMMA2_MARKED_SPECIAL else tok.add_tokens)([token])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                             "chat_template": CHAT_TEMPLATE}))


def make_tiny_hf_model(path: Path, seed: int = 0, dtype: str = "float32", shards: int = 1, **overrides) -> Path:
    """Save a random Gemma2ForCausalLM (and a tokenizer) to `path` with transformers; returns `path`.
    Without the quantize extra (torch, transformers: a core-only install) the calling test is skipped, saying so."""
    import pytest

    torch = pytest.importorskip("torch", reason="tiny test models are made by transformers: pip install '.[dev]'")
    transformers = pytest.importorskip("transformers", reason="tiny test models are made by transformers")
    Gemma2Config, Gemma2ForCausalLM = transformers.Gemma2Config, transformers.Gemma2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = Gemma2Config(**{k: v for k, v in tiny_config(**overrides).items() if k not in ("architectures",)})
    cfg.architectures = ["Gemma2ForCausalLM"]
    model = Gemma2ForCausalLM(cfg).eval()
    with torch.no_grad():  # norms start at zero in HF; randomise them so (1+w) is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    model = model.to(getattr(torch, dtype))
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = None if shards == 1 else max(1, total // shards + 1)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    write_tiny_tokenizer(path, vocab_size=cfg.vocab_size)
    return path
