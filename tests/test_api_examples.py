"""examples/ run as a user runs them (a subprocess, stdin fed) on the embedded model; their answers are checked
against the numpy reference generating alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run_example(name: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def reference():
    """(tokenizer, greedy text of prompt ids) from the reference runtime on the embedded model's checkpoint."""
    from trt_gemma.runtime.backends import reference_checkpoint
    from trt_gemma.checkpoint.hf import resolve_model
    from trt_gemma.reference import ReferenceModel, SamplingParams
    from trt_gemma.reference.generate import generate
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    ckpt = reference_checkpoint(resolve_model(None))
    model, tok = ReferenceModel.load(ckpt), GemmaTokenizer.from_dir(ckpt)

    def run(ids: list[int], max_tokens: int):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=tok.stop_token_ids)
        return generate(model, ids, params, tokenizer=tok)
    return tok, run


def test_edge_assistant_streams_each_turn_with_speed_and_memory(reference):
    tok, run = reference
    r = run_example("edge_assistant.py", "--max-tokens", "16", stdin="What is a list?\n\nAnd a tuple?\n")
    assert r.returncode == 0, r.stderr
    first = run(tok.encode_chat([{"role": "user", "content": "What is a list?"}]), 16).text
    assert r.stdout.startswith(first + "\n["), (r.stdout, first)
    reports = [line for line in r.stdout.splitlines() if line.startswith("[") and "tok/s" in line]
    assert len(reports) == 2, r.stdout  # one per non-empty line
    assert all("memory: weights" in line and "host_rss" in line for line in reports), reports
    assert "plan: fits" in r.stderr


def test_edge_assistant_refuses_a_model_that_does_not_fit():
    r = run_example("edge_assistant.py", "gemma-2-27b", "--target", "jetson-orin-nano-4gb", stdin="hello\n")
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "Sorry, gemma-2-27b does not fit jetson-orin-nano-4gb" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_batch_captions_in_order_with_two_at_once(reference):
    tok, run = reference
    scenes = ["a dog runs on the beach", "a train crosses a bridge", "a kettle boils", "snow falls on a car",
              "a child flies a kite"]
    r = run_example("batch_captions.py", "--concurrency", "2", "--max-tokens", "20", stdin="\n".join(scenes) + "\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["scene"] for row in rows] == scenes
    for row in rows:
        alone = run(tok.encode(f"The picture shows {row['scene']}, and"), 20)
        full = alone.text
        want = full[:full.index(".")] if "." in full else full  # the stop string ends the caption
        assert row["caption"] == " ".join(want.split()), (row, full)
        assert row["finish_reason"] == ("stop" if "." in full else alone.finish_reason)
    assert "5 captions" in r.stderr and "2 at once" in r.stderr
