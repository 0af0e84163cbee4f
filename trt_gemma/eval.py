"""Quantization quality: perplexity, top-1 agreement and mean KL divergence against the unquantized model.

Every checkpoint runs through the numpy reference runtime (trt_gemma/reference), which emulates what the engine
computes for its layout: INT4-AWQ / FP8 dequantized weights, fake-quantized FP8 activations and KV cache, and TRT-LLM's
build-time round-to-nearest for the weight-only W8A16 / W4A16 recipes (reference/quantized.py). The text is tokenized
once with the baseline's tokenizer, cut into windows of at most `context` tokens, each starting with <bos>; every
position but the last of a window predicts the next token.

- perplexity: exp(mean negative log-likelihood of the next token);
- top-1 agreement: fraction of positions where argmax(logits) equals the baseline's;
- mean KL: mean over positions of KL(p_baseline || p_checkpoint), in nats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trt_gemma.errors import ConfigError, InputError
from trt_gemma.fsutil import marked_temp_dir
from trt_gemma.safe_io import read_json_object

DEFAULT_MAX_TOKENS = 1024
MAX_CONTEXT = 512
LOGITS_BUDGET = 1 << 28  # bytes of float32 logits per window: keeps a 256k-vocab window at 256 positions


@dataclass(frozen=True)
class EvalRow:
    name: str
    path: str
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    dtype: str
    perplexity: float
    top1_agreement: float
    mean_kl: float
    weight_bytes: int
    tokens: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EvalReport:
    rows: list[EvalRow]
    baseline: dict
    text_file: str
    tokens: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "text_file": self.text_file, "tokens": self.tokens,
                "rows": [r.to_dict() for r in self.rows], "notes": self.notes}

    def to_markdown(self) -> str:
        lines = [f"Baseline: {self.baseline['name']} ({self.baseline['how']}; perplexity "
                 f"{self.baseline['perplexity']:.4f}); "
                 f"{self.tokens} predicted tokens of {Path(self.text_file).name}.", "",
                 "| checkpoint | quant_algo | KV | dtype | perplexity | Δppl vs baseline | top-1 agree | mean KL "
                 "| weights (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
        base = self.baseline["perplexity"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.quant_algo or '-'} | {r.kv_cache_quant_algo or '-'} | {r.dtype} | "
                         f"{r.perplexity:.4f} | {100 * (r.perplexity / base - 1):+.2f}% | "
                         f"{100 * r.top1_agreement:.2f}% | {r.mean_kl:.5f} | {r.weight_bytes / 2**20:.2f} |")
        return "\n".join(lines + [f"\n{n}" for n in self.notes])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _windows(ids: list[int], bos: int, context: int) -> list[np.ndarray]:
    step = context - 1
    return [np.array([bos] + ids[i:i + step], np.int64) for i in range(0, len(ids), step) if ids[i:i + step]]


def _context(model, max_context: int) -> int:
    c = model.config
    budget = max(16, LOGITS_BUDGET // (4 * c.vocab_size))
    return max(2, min(max_context, c.max_position_embeddings, budget))


def _scores(model, windows: list[np.ndarray]):
    """Per window: log-probabilities [T-1, V] of positions 0..T-2 (they predict tokens 1..T-1)."""
    for w in windows:
        yield w[1:], _log_softmax(model.forward(w)[:-1])


def resolve_baseline(checkpoints: list[Path], baseline: Path | None, work: Path) -> tuple[Path, str]:
    """Explicit baseline; else, among several checkpoints, the first unquantized one; else the unquantized source
    model named in a checkpoint's provenance, converted to float32 into `work`. A single checkpoint is never its own
    baseline (every figure would be trivially perfect)."""
    from trt_gemma.reference import CheckpointConfig

    if baseline is not None:
        return Path(baseline), "given"
    configs = {Path(ck): CheckpointConfig.from_file(Path(ck) / "config.json") for ck in checkpoints}
    unquantized = [ck for ck, cfg in configs.items() if _label(cfg.quant_algo, cfg.kv_cache_quant_algo) is None]
    if unquantized and len(checkpoints) > 1:
        return unquantized[0], "first unquantized checkpoint"
    for ck in checkpoints:
        prov = Path(ck) / "trt_gemma_provenance.json"
        src = read_json_object(prov).get("source_path") if prov.is_file() else None
        if src and Path(src).is_dir() and not (Path(src) / "hf_quant_config.json").exists():
            from trt_gemma.checkpoint.convert import convert_checkpoint

            out = convert_checkpoint(Path(src), work / "baseline", dtype="float32", show_progress=False)
            return out, f"{src} converted to float32"
    if unquantized:
        raise ConfigError(f"{unquantized[0]} is the only checkpoint and its provenance names no source model: it "
                          "would be compared with itself", fix="pass --baseline with the unquantized float32 model "
                          "(`trt-gemma convert MODEL OUT --dtype float32`), or more checkpoints")
    raise ConfigError("no unquantized baseline: every checkpoint is quantized and none names its source model",
                      fix="pass --baseline with an unquantized checkpoint (`trt-gemma convert MODEL OUT`)")


def _label(quant_algo: str | None, kv_cache_quant_algo: str | None) -> str | None:
    """'W4A16_AWQ', 'FP8 + FP8 KV', ... or None when unquantized."""
    parts = [a for a in (quant_algo, kv_cache_quant_algo and f"{kv_cache_quant_algo} KV") if a]
    return " + ".join(parts) or None


def check_baseline(baseline: Path, allow_quantized: bool = False) -> None:
    """Before anything is converted into the cache: the baseline must bring a tokenizer (the text is tokenized with
    it) and be unquantized (a quantized baseline makes every row a comparison with an approximation)."""
    from trt_gemma.runtime.backends import detect_kind
    from trt_gemma.checkpoint.codecs import read_quant_spec
    from trt_gemma.reference import CheckpointConfig
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    baseline = Path(baseline)
    kind = detect_kind(baseline)
    where = baseline / "checkpoint" if kind == "bundle" else baseline
    if kind == "hf":
        spec = read_quant_spec(where, read_json_object(where / "config.json"))
        quant = spec and _label(spec.quant_algo, spec.kv_cache_quant_algo)
    elif kind == "trtllm_engine":
        quant = None  # reference_checkpoint refuses engines with its own fix
    else:
        cfg = CheckpointConfig.from_file(where / "config.json")
        quant = _label(cfg.quant_algo, cfg.kv_cache_quant_algo)
    if quant and not allow_quantized:
        raise ConfigError(f"--baseline {baseline} is quantized ({quant}): the table would measure the distance "
                          "between two approximations", fix="pass the unquantized model as --baseline (`trt-gemma "
                          "convert MODEL OUT --dtype float32`), or add --allow-quantized-baseline to compare anyway")
    if kind != "trtllm_engine" and not (where / "tokenizer.json").is_file():
        raise InputError(f"--baseline {baseline}: {where / 'tokenizer.json'} not found (the text is tokenized with "
                         "the baseline's tokenizer)", fix=f"copy the model's tokenizer files (tokenizer.json, "
                         f"tokenizer_config.json) into {where}, or pass a baseline that has them")
    if kind != "trtllm_engine":
        GemmaTokenizer.from_dir(where)  # a tokenizer.json that does not load: named, before any conversion


def evaluate(checkpoints: list[Path], baseline: Path | None = None, text_file: Path | None = None,
             max_tokens: int = DEFAULT_MAX_TOKENS, max_context: int = MAX_CONTEXT,
             show_progress: bool = False, allow_quantized_baseline: bool = False) -> EvalReport:
    """Score each checkpoint against the baseline on `text_file` (default: the shipped held-out eval text).
    Cheap checks (options, text, the baseline's tokenizer and quantization) come before any conversion."""
    from trt_gemma.runtime.backends import reference_checkpoint
    from trt_gemma.console import progress
    from trt_gemma.reference import ReferenceModel
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    if not checkpoints:
        raise ConfigError("no checkpoint to evaluate", fix="pass one or more checkpoint dirs")
    if max_tokens < 2:
        raise ConfigError(f"--max-tokens {max_tokens}: need at least 2", fix="use e.g. --max-tokens 1024")
    text_path = Path(text_file) if text_file else _default_text()
    text = _read_text(text_path)
    if baseline is not None:
        check_baseline(baseline, allow_quantized_baseline)
    # like `generate`: a bundle runs its checkpoint/, an HF dir is converted once into the cache
    paths = [reference_checkpoint(c) for c in checkpoints]
    names = {p: Path(c).name for p, c in zip(paths, checkpoints)}
    given_base = None if baseline is None else reference_checkpoint(baseline)
    if given_base is not None:
        names.setdefault(given_base, Path(baseline).name)
    with marked_temp_dir(prefix="trt-gemma-eval-") as tmp:
        base_path, how = resolve_baseline(paths, given_base, Path(tmp))
        base = ReferenceModel.load(base_path)
        tok = GemmaTokenizer.from_dir(base_path)
        ids = tok.encode(text, add_bos=False)[:max_tokens]
        if len(ids) < 2:
            raise InputError(f"{text_path} gives {len(ids)} tokens", fix="use a longer --text file")
        windows = _windows(ids, tok.bos_id, _context(base, max_context))
        with progress(disable=not show_progress) as bar:
            task = bar.add_task("baseline", total=len(windows) * (len(paths) + 1))
            ref = []
            for targets, lp in _scores(base, windows):
                ref.append((targets, lp))
                bar.advance(task)
            base_nll = -np.concatenate([lp[np.arange(len(t)), t] for t, lp in ref])
            vocab = base.config.vocab_size
            del base  # only its log-probs are needed now; each checkpoint's model is as big
            rows = []
            for ck in paths:
                bar.update(task, description=names[ck])
                rows.append(_score(ck, names[ck], ref, windows, vocab, bar, task))
        n = sum(len(t) for t, _ in ref)
        return EvalReport(rows, {"name": names.get(base_path, base_path.name), "path": str(base_path), "how": how,
                                 "perplexity": float(math.exp(base_nll.mean()))}, str(text_path), n)


def _score(path: Path, name: str, ref, windows, vocab: int, bar, task) -> EvalRow:
    from trt_gemma.reference import ReferenceModel

    m = ReferenceModel.load(path)
    if m.config.vocab_size != vocab:
        raise InputError(f"{path}: vocab_size {m.config.vocab_size} differs from the baseline's {vocab}",
                         fix="compare checkpoints of the same model")
    nll, agree, kl = [], [], []
    for (targets, lp_base), w in zip(ref, windows):
        lp = _log_softmax(m.forward(w)[:-1])
        nll.append(-lp[np.arange(len(targets)), targets])
        agree.append(lp.argmax(-1) == lp_base.argmax(-1))
        kl.append((np.exp(lp_base) * (lp_base - lp)).sum(-1))
        bar.advance(task)
    c = m.config
    return EvalRow(name, str(path), c.quant_algo, c.kv_cache_quant_algo, c.dtype,
                   float(math.exp(np.concatenate(nll).mean())), float(np.concatenate(agree).mean()),
                   float(np.concatenate(kl).mean()), m.weight_bytes, int(sum(len(t) for t, _ in ref)))


def _default_text() -> Path:
    from trt_gemma.assets import eval_text_path

    return Path(eval_text_path())


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise InputError(f"text file {path} does not exist", fix="pass --text with a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text", fix="pass a UTF-8 text file") from e
