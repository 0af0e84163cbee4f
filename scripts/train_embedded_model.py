#!/usr/bin/env python
"""Train the embedded default model: a small Gemma 2 (transformers Gemma2ForCausalLM) on Python's own documentation.

Why this corpus: every CPython install carries English reference text under the PSF license, which allows
redistribution — the language reference topics in `pydoc_data/topics.py` and the standard library's docstrings (read
here with `ast`, never by importing modules). So the model, its eval text and its calibration text can ship inside the
package and be rebuilt offline anywhere.

Reproducibility: fixed seeds, sorted file order, a hash-based document split, deterministic batch order, torch CPU
(`--threads`, default 2; the card records the count used: results depend on it). The corpus depends on the Python
version it was read from; the card records it.

    python scripts/train_embedded_model.py                  # writes trt_gemma/assets/gemma2-pydoc-tiny/
    python scripts/train_embedded_model.py --steps 20 --out /tmp/smoke   # quick smoke run
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import re
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

from trt_gemma.runtime.tokenizer import CHAT_TEMPLATE  # Google's gemma-2 template (the project is installed to train)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "trt_gemma" / "assets" / "gemma2-pydoc-tiny"
SEED = 1234
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..5, as in Gemma's order


# Gemma 2 quirks kept on purpose (see tests/test_embedded_model.py): soft-caps as in Gemma 2 (50 / 30), sliding window
# (128) shorter than max positions (512) and than the training sequence (256), GQA 4 q / 2 kv heads, heads x head_dim
# (384) != hidden (256) like Gemma-2-9B, hidden % heads == 0 (transformers >= 5), every linear in_features (256, 384,
# 768) a multiple of 128 so INT4-AWQ group 128 applies. fp32 storage: ~18 MB, under the 25 MB budget.
MODEL_CONFIG = dict(
    vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=96, query_pre_attn_scalar=96,
    max_position_embeddings=512, sliding_window=128, rms_norm_eps=1e-6, rope_theta=10000.0,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True, initializer_range=0.02, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    attention_dropout=0.0, attention_bias=False,
)


@dataclass(frozen=True)
class TrainArgs:
    steps: int = 600
    batch: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_chars: int = 60_000
    calib_chars: int = 60_000


@dataclass
class Corpus:
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    calib: list[str] = field(default_factory=list)
    sources: dict[str, int] = field(default_factory=dict)  # documents per source


# ---------------------------------------------------------------------------------------------------------------- corpus
def normalize(text: str) -> str:
    """Tabs to spaces, no trailing spaces, at most one blank line in a row; indentation kept (code examples need it)."""
    lines = [ln.rstrip() for ln in text.expandtabs(4).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _docstrings(node: ast.AST, prefix: str):
    """(qualified name, cleaned docstring) in source order: module, then classes/functions depth first."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield prefix, doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"{prefix}.{child.name}")


def stdlib_documents() -> list[tuple[str, str]]:
    """One document per stdlib module: its docstrings, each under its qualified name. Tests and site-packages skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a few lib2to3 fixtures are not valid Python 3
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        parts = [f"{name}\n{normalize(doc)}" for name, doc in _docstrings(tree, module)]
        if parts:
            docs.append((f"stdlib:{module}", "\n\n".join(parts)))
    return docs


def topics_documents() -> list[tuple[str, str]]:
    import pydoc_data.topics as topics  # the language reference as plain text (what `help("for")` prints)

    return [(f"topics:{key}", normalize(topics.topics[key])) for key in sorted(topics.topics)]


def split_of(doc_id: str) -> str:
    """Hash split, stable across runs and machines: 90 % train, 5 % eval, 5 % calibration."""
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else ("eval" if bucket < 95 else "calib")


def build_corpus() -> Corpus:
    corpus = Corpus()
    for source, docs in (("pydoc_data/topics.py", topics_documents()), ("stdlib docstrings", stdlib_documents())):
        corpus.sources[source] = len(docs)
        for doc_id, text in docs:
            getattr(corpus, split_of(doc_id)).append(text)
    return corpus


def capped_text(docs: list[str], max_chars: int) -> str:
    """Whole documents, in order, until max_chars; the last document is cut at a line boundary."""
    out, size = [], 0
    for doc in docs:
        room = max_chars - size
        if room <= 200:
            break
        if len(doc) > room:
            doc = doc[:room].rsplit("\n", 1)[0]
        out.append(doc)
        size += len(doc) + 2
    return "\n\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE with Gemma's special tokens at ids 0..5; the post-processor prepends <bos> like Gemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert [tok.token_to_id(s) for s in SPECIALS] == list(range(len(SPECIALS))), "special tokens must be ids 0..5"
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"], "chat_template": CHAT_TEMPLATE,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
    }, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, indent=2) + "\n")
    return tok


def token_stream(tok, docs: list[str]) -> list[int]:
    """<bos> doc <eos> for each document, concatenated (documents packed into fixed-length training rows)."""
    bos, eos = tok.token_to_id("<bos>"), tok.token_to_id("<eos>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids += [bos, *enc.ids, eos]
    return ids


# ------------------------------------------------------------------------------------------------------------ evaluation
def eval_rows(tok, text: str, seq_len: int) -> list[list[int]]:
    """The held-out protocol (the test repeats it): tokens of the text without specials, cut into rows of seq_len-1,
    each row prefixed with <bos>; every token after <bos> is scored."""
    ids = tok.encode(text, add_special_tokens=False).ids
    bos = tok.token_to_id("<bos>")
    return [[bos, *ids[i:i + seq_len - 1]] for i in range(0, len(ids), seq_len - 1)]


def model_perplexity(model, rows: list[list[int]]) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            x = torch.tensor([row])
            logits = model(input_ids=x).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            count += len(row) - 1
    return math.exp(nll / count)


def unigram_perplexity(train_ids: list[int], rows: list[list[int]], vocab_size: int) -> float:
    """Add-one smoothed unigram from the training token counts, scored on exactly the tokens the model is scored on."""
    counts = [1] * vocab_size
    for t in train_ids:
        counts[t] += 1
    total = sum(counts)
    nll = sum(-math.log(counts[t] / total) for row in rows for t in row[1:])
    return math.exp(nll / sum(len(r) - 1 for r in rows))


def greedy(model, tok, prompt: str, new_tokens: int = 48) -> str:
    import torch

    ids = tok.encode(prompt).ids  # with <bos>, as users' prompts get it
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0, eos_token_id=1)
    return tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)


# -------------------------------------------------------------------------------------------------------------- training
def lr_at(step: int, args: TrainArgs) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_model():
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(SEED)
    cfg = Gemma2Config(**MODEL_CONFIG)
    cfg.architectures = ["Gemma2ForCausalLM"]
    # eager: transformers' Gemma 2 refuses SDPA because of the attention soft-cap
    return Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")


def train(model, train_ids: list[int], args: TrainArgs, log) -> list[tuple[int, float]]:
    """AdamW on packed rows; each pass over the rows uses a seeded permutation. Returns (step, mean loss) per 25 steps."""
    import torch

    rows = torch.tensor(train_ids[: len(train_ids) // args.seq_len * args.seq_len]).view(-1, args.seq_len)
    gen = torch.Generator().manual_seed(SEED)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    order, cursor, curve, window = torch.randperm(len(rows), generator=gen), 0, [], []
    model.train()
    t0 = time.time()
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(len(rows), generator=gen), 0
        x = rows[order[cursor:cursor + args.batch]]
        cursor += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        window.append(loss.item())
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            curve.append((step + 1, sum(window) / len(window)))
            log(f"step {step + 1}/{args.steps} loss {curve[-1][1]:.3f} lr {lr_at(step, args):.2e} "
                f"{time.time() - t0:.0f}s")
            window = []
    model.eval()
    return curve


# --------------------------------------------------------------------------------------------------------------- outputs
PSF_NOTE = """\
The texts in eval.txt and calib.txt, and the corpus the weights in this directory were trained on, are taken from
CPython {py}: the language reference topics in Lib/pydoc_data/topics.py and the docstrings of the standard library
(Lib/**/*.py, test packages excluded). That text is part of Python, distributed under the
PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2, which permits redistribution of derivative works provided the PSF
copyright notice and the license are retained:

    Copyright (c) 2001-2024 Python Software Foundation; All Rights Reserved

Full license text: https://docs.python.org/3/license.html (also the LICENSE file of every CPython source tree and
installation, e.g. {license_path}).
Changes made: whitespace normalised (tabs expanded, trailing spaces removed, blank-line runs collapsed), docstrings
prefixed with their qualified names, documents selected by a hash split.
"""


def write_card(out: Path, name: str, facts: dict) -> None:
    f = facts
    curve = f["curve"]
    picks = [curve[0], *curve[len(curve) // 4::len(curve) // 4][:3], curve[-1]] if len(curve) >= 4 else curve
    curve_txt = ", ".join(f"{s}: {l:.3f}" for s, l in dict(picks).items())
    samples = "\n".join(f"  - prompt `{p!r}` -> `{c!r}`" for p, c in f["samples"])
    text = f"""# {name}: a tiny Gemma 2 trained on Python's documentation

The default model of trt_gemma: `trt_gemma.assets.default_model_dir()`. Architecture: transformers `Gemma2ForCausalLM`,
trained from scratch on CPU. It exists so that conversion, quantization quality, generation and serving are exercised on
*trained* weights on any machine, offline. It is not a useful assistant.

## Architecture
{json.dumps(MODEL_CONFIG, indent=None)}

- Parameters: {f["params"]:,} (tied embeddings); stored as float32 safetensors, {f["weights_bytes"]:,} bytes.
- Gemma 2 features exercised: attention soft-cap 50 and final soft-cap 30; sliding window 128 on the even layers
  (max positions 512, training rows of 256 tokens); GQA 4 query / 2 KV heads; heads x head_dim = 384 != hidden 256;
  every linear's in_features (256, 384, 768) is a multiple of 128 (INT4-AWQ group 128 applies).

## Corpus
- Source: CPython {f["python"]} documentation shipped with the interpreter: `pydoc_data/topics.py` (the language
  reference topics) and the standard library's docstrings read with `ast` (files in sorted order, test packages skipped).
- License: PSF License Version 2 (see LICENSE-DATA.txt; https://docs.python.org/3/license.html).
- Documents: {f["sources"]}; split by sha256 of the document id: 90 % train / 5 % eval / 5 % calibration.
- Training tokens: {f["train_tokens"]:,}; eval.txt: {f["eval_chars"]:,} characters, {f["eval_tokens"]:,} scored tokens;
  calib.txt: {f["calib_chars"]:,} characters. Held-out documents never enter training or the tokenizer.

## Tokenizer
Byte-level BPE trained with `tokenizers` on the training split, vocabulary {MODEL_CONFIG["vocab_size"]}; special tokens
<pad>=0, <eos>=1, <bos>=2, <unk>=3, <start_of_turn>=4, <end_of_turn>=5; <bos> prepended automatically; Gemma's chat
template in tokenizer_config.json.

## Training
- Seed {SEED}; torch {f["torch"]} on CPU, {f["threads"]} thread(s); transformers {f["transformers"]}.
- Steps {f["args"].steps}, batch {f["args"].batch} x {f["args"].seq_len} tokens, AdamW (betas 0.9/0.95, weight decay
  {f["args"].weight_decay}), lr {f["args"].lr} with {f["args"].warmup} warmup steps and cosine decay to
  {f["args"].min_lr_ratio} x lr, gradient clip {f["args"].grad_clip}.
- Tokens seen: {f["args"].steps * f["args"].batch * f["args"].seq_len:,} ({f["epochs"]:.2f} epochs).
- Training loss (mean over 25 steps) at step: {curve_txt}.
- Training time: {f["train_seconds"]:.0f} s wall on a shared 2-core CPU host.

## Quality (eval.txt, held out)
- Held-out perplexity: {f["ppl"]:.2f}
- Unigram baseline perplexity: {f["unigram_ppl"]:.2f}
  (add-one smoothed unigram from the training token counts, on the same {f["eval_tokens"]:,} tokens)
- Protocol: eval.txt tokenized without specials, cut into rows of 255 tokens, each prefixed with <bos>; every token after
  <bos> scored.
- Greedy continuations (48 new tokens):
{samples}

## Reproduce
    python scripts/train_embedded_model.py --threads {f["threads"]}
Exact numbers need the same Python version ({f["python"]}): the corpus is read from the running interpreter.
"""
    (out / "MODEL_CARD.md").write_text(text)


PROMPTS = ("Return a list of", "The with statement")


def _make_readable(path: Path) -> None:
    """mkdtemp makes the output dir 0700 (and some writers 0600 files): package data must be world-readable."""
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def main(argv=None) -> None:
    import tokenizers
    import torch
    import transformers

    from trt_gemma.fsutil import atomic_output_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=TrainArgs.steps)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (1 is faster on a busy host)")
    ns = p.parse_args(argv)
    args = TrainArgs(steps=ns.steps)
    torch.set_num_threads(ns.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    corpus = build_corpus()
    eval_text = capped_text(corpus.eval, args.eval_chars)
    calib_text = capped_text(corpus.calib, args.calib_chars)
    log(f"documents {corpus.sources}; train {len(corpus.train)} eval {len(corpus.eval)} calib {len(corpus.calib)}")
    with atomic_output_dir(ns.out, force=True) as tmp:
        tok = train_tokenizer(corpus.train, MODEL_CONFIG["vocab_size"], tmp)
        train_ids = token_stream(tok, corpus.train)
        rows = eval_rows(tok, eval_text, args.seq_len)
        log(f"train tokens {len(train_ids):,}; eval rows {len(rows)}")
        model = make_model()
        t0 = time.time()
        curve = train(model, train_ids, args, log)
        train_seconds = time.time() - t0
        model.generation_config.eos_token_id = [tok.token_to_id("<eos>"), tok.token_to_id("<end_of_turn>")]
        model.save_pretrained(tmp)
        facts = dict(
            threads=ns.threads,
            curve=curve, params=sum(p.numel() for p in model.parameters()),
            weights_bytes=(tmp / "model.safetensors").stat().st_size, python=sys.version.split()[0],
            sources=corpus.sources, train_tokens=len(train_ids), eval_chars=len(eval_text),
            eval_tokens=sum(len(r) - 1 for r in rows), calib_chars=len(calib_text), torch=torch.__version__,
            transformers=transformers.__version__, tokenizers=tokenizers.__version__, args=args,
            epochs=args.steps * args.batch * args.seq_len / len(train_ids), train_seconds=train_seconds,
            ppl=model_perplexity(model, rows), unigram_ppl=unigram_perplexity(train_ids, rows, tok.get_vocab_size()),
            samples=[(pr, greedy(model, tok, pr)) for pr in PROMPTS],
        )
        log(f"held-out ppl {facts['ppl']:.2f} vs unigram {facts['unigram_ppl']:.2f}; samples {facts['samples']}")
        (tmp / "eval.txt").write_text(eval_text)
        (tmp / "calib.txt").write_text(calib_text)
        license_path = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
        (tmp / "LICENSE-DATA.txt").write_text(PSF_NOTE.format(py=facts["python"], license_path=license_path))
        write_card(tmp, ns.out.name, facts)
        _make_readable(tmp)
    log(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
