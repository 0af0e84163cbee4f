"""`trt-gemma generate` on a tiny model converted by `trt_gemma.checkpoint.convert`, run as a user runs it (subprocess)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")  # the tiny model is made by transformers


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    from trt_gemma.checkpoint.convert import convert_checkpoint

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
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

    assert rec["prompt_tokens"] == len(GemmaTokenizer.from_dir(ckpt).encode("The quick brown fox"))  # <bos> + text
    assert rec["finish_reason"] in ("stop", "length") and len(rec["token_ids"]) == rec["generated_tokens"] <= 6
    assert rec["chat"] is False


def test_chat_prompt_and_text_stream(ckpt):
    from trt_gemma.runtime.tokenizer import GemmaTokenizer

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
    greedy = json.loads(_run(ckpt, "--prompt", "hello", "--max-tokens", "4", "--json").stdout)
    assert text.stdout == greedy["text"] + "\n", "streamed text differs from the --json record's text"


@pytest.mark.parametrize("args", [("/nonexistent/ckpt", "--prompt", "x"), ("{ck}", "--prompt", "x", "--top-p", "0")])
def test_bad_input_is_a_message_not_a_traceback(ckpt, args):
    p = _run(*(a.format(ck=ckpt) for a in args))
    assert p.returncode != 0
    assert "error:" in p.stderr and "fix:" in p.stderr and "Traceback" not in p.stderr


def test_default_is_the_embedded_model_converted_once(tmp_path, monkeypatch):
    """No CHECKPOINT: the embedded default model, converted into $TRT_GEMMA_CACHE on first use and reused after."""
    monkeypatch.setenv("TRT_GEMMA_CACHE", str(tmp_path / "cache"))
    p = _run("--prompt", "Return the number of", "--max-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr
    entries = _cache_entries(tmp_path / "cache" / "checkpoints")
    assert len(entries) == 1 and entries[0].name.startswith("gemma2-pydoc-tiny-")
    first = json.loads(p.stdout)
    again = json.loads(_run("--prompt", "Return the number of", "--max-tokens", "4", "--json").stdout)
    assert again["token_ids"] == first["token_ids"] and len(_cache_entries(tmp_path / "cache" / "checkpoints")) == 1


def _cache_entries(d):
    """The cache's entries, not its `.locks/` (one writer per entry: runtime.cache.entry_lock)."""
    return [p for p in d.iterdir() if not p.name.startswith(".")]


def test_bundle_dir_runs_its_checkpoint_and_engine_dirs_are_refused(ckpt, tmp_path):
    import shutil

    from trt_gemma.runtime.backends import reference_checkpoint

    bundle = tmp_path / "bundle"
    shutil.copytree(ckpt, bundle / "checkpoint")
    (bundle / "manifest.json").write_text("{}")
    assert reference_checkpoint(bundle) == bundle / "checkpoint"
    direct = json.loads(_run(ckpt, "--prompt", "fox", "--max-tokens", "5", "--json").stdout)
    via_bundle = json.loads(_run(bundle, "--prompt", "fox", "--max-tokens", "5", "--json").stdout)
    assert via_bundle["token_ids"] == direct["token_ids"]

    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1", "build_config": {}, "pretrained_config": {}}))
    (engine / "rank0.engine").write_bytes(b"\0")
    p = _run(engine, "--prompt", "fox")
    assert p.returncode != 0 and "TensorRT engine" in p.stderr and "Traceback" not in p.stderr
