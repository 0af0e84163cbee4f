"""A small terminal assistant for an edge device (a Jetson, a kiosk, an RTX workstation).

    python examples/edge_assistant.py [MODEL] [--target auto] [--max-tokens 128]

MODEL is a `trt-gemma build` bundle (its engine on a GPU host with TensorRT-LLM, else its checkpoint), an engine or
checkpoint dir, an HF Gemma 2 dir or hub id; omitted: the embedded model. Before loading anything it asks the
planner whether the model fits this device (`--target auto`: the detected one) and refuses, politely, when it does
not. Then every line typed on stdin is a user turn: the answer streams as it is generated, and after each turn it
prints tokens/s and the memory snapshot (the same figures the server's /v1/telemetry reports). Ctrl-C stops the
answer being generated; Ctrl-D (end of input) quits.
"""
from __future__ import annotations

import argparse
import sys

import trt_gemma
from trt_gemma.stages import plan

EXIT_DOES_NOT_FIT = 3  # as `trt-gemma plan`


def check_fit(model: str | None, target: str) -> bool:
    """True when the planner says MODEL fits TARGET, or cannot tell (an engine dir has no source config)."""
    try:
        p = plan(model, target)
    except trt_gemma.InputError as e:
        print(f"(not planned: {e.message}; starting anyway)", file=sys.stderr)
        return True
    if p.fits:
        print(f"plan: {p.verdict} on {p.target} - {p.reason}", file=sys.stderr)
        return True
    print(f"Sorry, {p.model} does not fit {p.target}: {p.reason}.", file=sys.stderr)
    if p.suggestion:
        print(f"It would fit with: {p.suggestion['command']}", file=sys.stderr)
    else:
        print("Try a smaller model or a larger device (`trt-gemma targets`).", file=sys.stderr)
    return False


def fit_history(model: trt_gemma.Model, history: list[dict[str, str]], max_tokens: int) -> list[dict[str, str]]:
    """Drop the oldest exchanges until the conversation and the answer fit the context."""
    ctx = model.info.context_length
    while len(history) > 1 and len(model.tokenizer.encode_chat(history)) + max_tokens > ctx:
        history = history[2:]
    return history


def memory_line(model: trt_gemma.Model) -> str:
    mem = model.telemetry()["memory_bytes"]
    parts = [f"{kind} {v / 2**20:.0f} MiB" for kind, v in mem.items() if isinstance(v, (int, float))]
    return "memory: " + ", ".join(parts)


def answer(model: trt_gemma.Model, history: list[dict[str, str]], max_tokens: int, temperature: float) -> str:
    room = model.info.context_length - len(model.tokenizer.encode_chat(history))
    with model.stream(history, max_tokens=max(1, min(max_tokens, room)), temperature=temperature) as stream:
        try:
            for piece in stream:
                print(piece.text, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer, keep the session
            stream.cancel()
        done = stream.completion()
    t = done.timings
    print(f"\n[{done.usage.completion_tokens} tokens, {done.finish_reason}; {t.decode_tokens_per_s:.1f} tok/s, "
          f"first token {t.ttft_s * 1e3:.0f} ms] {memory_line(model)}", flush=True)
    return done.text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--target", default="auto", help="device to plan for (`trt-gemma targets`); auto = this one")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    args = ap.parse_args(argv)
    if not check_fit(args.model, args.target):
        return EXIT_DOES_NOT_FIT
    try:
        model = trt_gemma.load(args.model)
    except trt_gemma.TrtGemmaError as e:
        print(f"cannot load the model: {e}", file=sys.stderr)
        return e.exit_code
    with model:
        i = model.info
        print(f"{i.name} on {i.backend} ({i.precision}, context {i.context_length}). Type a message; Ctrl-D quits.",
              file=sys.stderr)
        history: list[dict[str, str]] = []
        for line in sys.stdin:
            if not line.strip():
                continue
            history = fit_history(model, history + [{"role": "user", "content": line.strip()}], args.max_tokens)
            try:
                reply = answer(model, history, args.max_tokens, args.temperature)
            except trt_gemma.InputError as e:  # e.g. one message longer than the context
                print(f"(skipped: {e.message})", file=sys.stderr)
                history = history[:-1]
                continue
            history.append({"role": "assistant", "content": reply})
    return 0


if __name__ == "__main__":
    sys.exit(main())
