"""`trt-gemma generate` on a tiny model converted by `trt_gemma.convert`, run as a user runs it (subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")  # the tiny model is made by transformers


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    from trt_gemma.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("cli") / "ck"
    convert_checkpoint(tiny_model_dir, out, dtype="bfloat16", show_progress=False)
    return out


def _run(*args):
    return subprocess.run([sys.executable, "-m", "trt_gemma", "generate", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_json_record(ckpt):
    p = _run(ckpt, "--prompt", "The quick brown fox", "--max-tokens", "6", "--json")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    for key in ("text", "token_ids", "finish_reason", "prompt_tokens", "generated_tokens", "ttft_s",
                "decode_tokens_per_s", "total_s", "peak_rss_bytes", "weight_bytes", "effective_bandwidth_bytes_per_s"):
        assert key in rec, f"--json record lacks {key}"
    from trt_gemma.tokenizer import GemmaTokenizer

    assert rec["prompt_tokens"] == len(GemmaTokenizer.from_dir(ckpt).encode("The quick brown fox"))  # <bos> + text
    assert rec["finish_reason"] in ("stop", "length") and len(rec["token_ids"]) == rec["generated_tokens"] <= 6
    assert rec["chat"] is False


def test_chat_prompt_and_text_stream(ckpt):
    from trt_gemma.tokenizer import GemmaTokenizer

    tok = GemmaTokenizer.from_dir(ckpt)
    p = _run(ckpt, "--prompt", "hello", "--chat", "--max-tokens", "4", "--json", "--temperature", "0.7",
             "--seed", "1")
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["prompt_tokens"] == len(tok.encode_chat([{"role": "user", "content": "hello"}])) and rec["chat"]
    again = json.loads(_run(ckpt, "--prompt", "hello", "--chat", "--max-tokens", "4", "--json", "--temperature",
                            "0.7", "--seed", "1").stdout)
    assert again["token_ids"] == rec["token_ids"], "same seed, different tokens"
    text = _run(ckpt, "--prompt", "hello", "--max-tokens", "4")
    assert text.returncode == 0, text.stderr
    assert "tok/s" in text.stderr and "time to first token" in text.stderr and "peak RSS" in text.stderr
    assert "tok/s" not in text.stdout


@pytest.mark.parametrize("args", [("/nonexistent/ckpt", "--prompt", "x"), ("{ck}", "--prompt", "x", "--top-p", "0")])
def test_bad_input_is_a_message_not_a_traceback(ckpt, args):
    p = _run(*(a.format(ck=ckpt) for a in args))
    assert p.returncode != 0
    assert "error:" in p.stderr and "fix:" in p.stderr and "Traceback" not in p.stderr
