"""The cache of converted models (runtime/cache.py): one entry per content key, LRU eviction under a size cap, and
`trt-gemma cache ls|prune`. Entries are real conversions/exports of the embedded model where the key matters; the
eviction tests use plain directories of known sizes, since eviction only reads sizes and use times."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trt_gemma.errors import ConfigError
from trt_gemma.runtime import cache as C
from trt_gemma.runtime.backends import converted_cache_dir, ensure_converted


def _copy_fresh(src: Path, dst: Path) -> Path:
    """A copy with new mtimes (what a wheel install does to the package data), same bytes."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture
def embedded():
    from trt_gemma.assets import default_model_dir

    return Path(default_model_dir())


def test_embedded_model_has_one_key_whatever_the_install(embedded, tmp_path):
    """The same model bytes in another place (a wheel's site-packages vs the source tree) map to the same entry;
    one changed byte maps to another."""
    cache = tmp_path / "cache" / "checkpoints"
    installed = _copy_fresh(embedded, tmp_path / "site-packages" / embedded.name)
    assert [f.stat().st_mtime_ns for f in installed.iterdir()] != [(embedded / f.name).stat().st_mtime_ns
                                                                    for f in installed.iterdir()]
    assert converted_cache_dir(installed, cache) == converted_cache_dir(embedded, cache)
    cfg = json.loads((installed / "config.json").read_text())
    (installed / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": cfg["rms_norm_eps"] * 2}))
    assert converted_cache_dir(installed, cache) != converted_cache_dir(embedded, cache)


def test_conversion_is_reused_across_copies(embedded, tmp_path, monkeypatch):
    monkeypatch.setenv(C.MAX_ENV, "2G")
    cache = tmp_path / "cache" / "checkpoints"
    first = ensure_converted(embedded, cache)
    stamp = (first / "rank0.safetensors").stat().st_mtime_ns
    again = ensure_converted(_copy_fresh(embedded, tmp_path / "copy" / embedded.name), cache)
    assert again == first and (again / "rank0.safetensors").stat().st_mtime_ns == stamp  # not converted again
    assert [e.name for e in C.entries(tmp_path / "cache")] == [first.name]


def test_file_hashes_are_remembered_until_the_file_changes(tmp_path):
    import hashlib

    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    assert C.file_sha256(f, tmp_path) == hashlib.sha256(b"a" * 1000).hexdigest()
    memo = json.loads((tmp_path / C.HASHES).read_text())
    assert memo[str(f.resolve())][2] == hashlib.sha256(b"a" * 1000).hexdigest()
    f.write_bytes(b"b" * 1001)
    assert C.file_sha256(f, tmp_path) == hashlib.sha256(b"b" * 1001).hexdigest()


def _entry(root: Path, ns: str, name: str, size: int, age_s: float) -> Path:
    p = root / ns / name
    p.mkdir(parents=True)
    (p / "blob").write_bytes(b"\0" * size)
    t = 1_700_000_000 - age_s
    os.utime(p, (t, t))
    return p


def test_lru_eviction_keeps_the_newest_the_admitted_and_the_locked(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    oldest = _entry(root, "onnx", "a-1", 400, 300)
    locked = _entry(root, "checkpoints", "b-2", 400, 200)
    middle = _entry(root, "onnx", "c-3", 400, 100)
    admitted = _entry(root, "checkpoints", "d-4", 400, 400)  # oldest mtime, but just used
    monkeypatch.setenv(C.MAX_ENV, "1000")
    with C.entry_lock(locked) as mine:
        assert mine
        C.admit(admitted)
    left = {e.name for e in C.entries(root)}
    assert left == {"b-2", "d-4"}, left  # a-1 then c-3 went (LRU); b-2 was being written, d-4 was admitted
    assert not oldest.exists() and not middle.exists()
    assert [e.name for e in C.entries(root)] == ["b-2", "d-4"]  # admit touched d-4: now the most recent


def test_site_exports_are_entries_and_evicted(tmp_path, monkeypatch):
    """runtime/sites.py caches its exports under onnx-sites/: they are listed and count toward the cap like the rest."""
    root = tmp_path / "cache"
    sites = _entry(root, "onnx-sites", "s-1", 400, 300)
    kept = _entry(root, "onnx", "o-2", 400, 100)
    assert [e.namespace for e in C.entries(root)] == ["onnx-sites", "onnx"]
    monkeypatch.setenv(C.MAX_ENV, "500")
    C.admit(kept)
    assert not sites.exists() and [e.name for e in C.entries(root)] == ["o-2"]


def test_cache_cli_ls_and_prune(tmp_path):
    root = tmp_path / "cache"
    _entry(root, "onnx", "old-1", 3000, 200)
    _entry(root, "checkpoints", "new-2", 2000, 100)
    env = {**os.environ, "TRT_GEMMA_CACHE": str(root), C.MAX_ENV: "1G"}

    def run(*args):
        p = subprocess.run([sys.executable, "-m", "trt_gemma", "cache", *args], capture_output=True, text=True,
                           env=env, timeout=60)
        return p.returncode, p.stdout, p.stderr

    code, out, _ = run("ls", "--json")
    d = json.loads(out)
    assert code == 0 and d["total_bytes"] == 5000 and d["max_bytes"] == 10**9
    assert [(e["namespace"], e["name"], e["bytes"]) for e in d["entries"]] == [("onnx", "old-1", 3000),
                                                                              ("checkpoints", "new-2", 2000)]
    code, out, _ = run("prune", "--max", "2500", "--json")
    d = json.loads(out)
    assert code == 0 and [e["name"] for e in d["removed"]] == ["old-1"] and d["total_bytes"] == 2000
    code, out, _ = run("prune", "--all")
    assert code == 0 and "removed checkpoints/new-2" in out and not C.entries(root)
    code, _, err = run("prune", "--max", "lots")
    assert code != 0 and "--max='lots' is not a size" in err and "fix:" in err


@pytest.mark.parametrize("text,want", [("2G", 2 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29),
                                       ("0", 0), ("123", 123)])
def test_sizes(text, want):
    assert C.parse_size(text) == want


def test_bad_cap_names_the_variable(monkeypatch):
    monkeypatch.setenv(C.MAX_ENV, "two gigs")
    with pytest.raises(ConfigError, match="TRT_GEMMA_CACHE_MAX"):
        C.max_bytes()


def test_a_rebuilt_checkpoint_finds_its_onnx_entry(embedded, tmp_path):
    """`build --force` of the same bundle writes the same weights with a new provenance (time, paths): the ONNX
    export cached for the first one is the second one's too; other weights get another entry."""
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from trt_gemma.checkpoint.convert import convert_checkpoint
    from trt_gemma.runtime.backends import onnx_cache_dir

    cache = tmp_path / "cache" / "checkpoints"
    first = convert_checkpoint(embedded, tmp_path / "a" / "checkpoint", dtype="float32", show_progress=False)
    again = _copy_fresh(Path(first), tmp_path / "b" / "checkpoint")
    prov = json.loads((again / "trt_gemma_provenance.json").read_text())
    (again / "trt_gemma_provenance.json").write_text(json.dumps({**prov, "created_utc": "later", "rebuilt": True}))
    assert onnx_cache_dir(again, cache) == onnx_cache_dir(Path(first), cache)
    other = convert_checkpoint(embedded, tmp_path / "c" / "checkpoint", dtype="bfloat16", show_progress=False)
    assert onnx_cache_dir(Path(other), cache) != onnx_cache_dir(Path(first), cache)
