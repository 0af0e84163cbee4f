"""`trt-gemma generate CHECKPOINT --prompt TEXT`: text from a checkpoint on a CPU runtime (onnxruntime or the numpy
reference)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from trt_gemma.reference.sampling import SamplingParams

if TYPE_CHECKING:
    from trt_gemma.api import Completion

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


def resolve_checkpoint(spec: str | None) -> Path:
    """The checkpoint dir to run: a checkpoint, a bundle, an HF dir or hub id (converted once into the cache), or
    nothing for the embedded default model."""
    from trt_gemma.runtime.backends import reference_checkpoint
    from trt_gemma.checkpoint.hf import resolve_model

    return reference_checkpoint(resolve_model(spec))


def load_cpu_model(spec: str | None, backend: str):
    """A `trt_gemma.Model` on a CPU runtime: an `export-onnx` dir as it is, anything else as the checkpoint the CPU
    runtimes run (a bundle's checkpoint/, an HF dir converted once into the cache; engines are refused)."""
    from trt_gemma.api import load
    from trt_gemma.runtime.backends import detect_kind, reference_checkpoint
    from trt_gemma.checkpoint.hf import resolve_model

    path = resolve_model(spec)
    runnable = path if Path(path).is_dir() and detect_kind(path) == "onnx" else reference_checkpoint(path)
    return load(runnable, backend=backend)


@click.command("generate")
@click.argument("checkpoint", required=False, type=click.Path(path_type=str))
@click.option("--prompt", required=True, help="Prompt text (with --chat: the user message).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in Gemma's chat template (instruction-tuned models).")
@click.option("--max-tokens", type=int, default=_DEFAULTS["max_tokens"], show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=float, default=_DEFAULTS["temperature"], show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=_DEFAULTS["top_k"], show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=_DEFAULTS["top_p"], show_default=True, help="1.0 = off.")
@click.option("--seed", type=int, default=_DEFAULTS["seed"], help="Seed for sampling (reproducible output).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON record at the end instead of streaming text.")
@click.option("--backend", type=click.Choice(["auto", "reference", "onnxruntime"]), default="auto", show_default=True,
              help="CPU runtime; auto: onnxruntime where installed (the checkpoint exported once into the cache), "
                   "else the numpy reference.")
def generate(checkpoint, prompt, chat, max_tokens, temperature, top_k, top_p, seed, as_json, backend):
    """Generate text from CHECKPOINT on the CPU (onnxruntime or the numpy reference runtime).

    CHECKPOINT: a TensorRT-LLM checkpoint, a `trt-gemma build` bundle, an HF Gemma 2 dir or hub id (converted once
    into the cache), an `export-onnx` dir; omitted: the embedded default model."""
    from trt_gemma.console import emit

    # every argument is checked before the model is converted (an HF dir: into the cache) or loaded
    checked_params(prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    with load_cpu_model(checkpoint, backend) as model:
        tok = model.tokenizer
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
        # as the reference loop always did: a context that fills up ends the text ("length"), it is no error
        room = model.info.context_length - len(ids)
        stream = model.stream(list(ids), max_tokens=min(max_tokens, max(room, 1)),
                              temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        with stream:
            for piece in stream:
                if not as_json and piece.text:
                    _stream(piece.text)
        c = stream.completion()
        info = model.info
    emit(record(c, checkpoint=info.path, chat=chat, backend=info.backend), as_json, _summary)


def record(c: "Completion", **extra) -> dict:
    """The --json record: the Completion's fields under the names `trt-gemma generate` has always printed."""
    t = c.timings
    return dict(text=c.text, token_ids=list(c.token_ids), finish_reason=c.finish_reason,
                prompt_tokens=c.usage.prompt_tokens, generated_tokens=len(c.token_ids), ttft_s=t.ttft_s,
                decode_tokens_per_s=t.decode_tokens_per_s, total_s=t.total_s, peak_rss_bytes=c.peak_rss_bytes,
                weight_bytes=c.weights_bytes, effective_bandwidth_bytes_per_s=c.effective_bandwidth_bytes_per_s,
                **extra)


def checked_params(prompt: str, **sampling) -> SamplingParams:
    """SamplingParams validated up front, plus what it does not check: a seed numpy accepts (>= 0) and a prompt
    that is text (a non-UTF-8 argv arrives as lone surrogates, which no tokenizer can encode)."""
    from trt_gemma.errors import InputError

    seed = sampling.get("seed")
    if seed is not None and seed < 0:
        raise InputError(f"--seed {seed}: a seed must be >= 0", fix="use --seed 0 (or any non-negative integer)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"--prompt is not valid UTF-8 text (character {e.start} is not text)",
                         fix="pass the prompt as UTF-8 (check the terminal's or the script's encoding)") from e
    return SamplingParams(**sampling)


def _stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _summary(r: dict) -> None:
    sys.stdout.write("\n")
    sys.stdout.flush()
    click.echo(f"[{r['generated_tokens']} tokens, {r['finish_reason']}] {r['decode_tokens_per_s']:.1f} tok/s, "
               f"time to first token {r['ttft_s'] * 1e3:.0f} ms, total {r['total_s']:.2f} s, "
               f"peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB, "
               f"effective bandwidth {r['effective_bandwidth_bytes_per_s'] / 1e9:.2f} GB/s", err=True)
