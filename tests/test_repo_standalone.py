"""The repository stands on its own: nothing in it points at a team notebook beside the checkout or at a path on the
machine it was written on. A user who clones the project has neither, so such a reference is a dead link in a comment
at best and a test that silently skips (or reads a file it should carry as a fixture) at worst. Facts go in docs/,
recorded data in tests/fixtures/ with its source named."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ("trt_gemma", "tests", "docs", "scripts", "benchmarks", "jetson", "README.md", "Dockerfile.jetson",
           "pyproject.toml", ".ci")
# Built from pieces so that this file does not match itself.
NOTEBOOK = "sha" + "red/"
MACHINE_PATHS = ("/" + "work/", "/" + "root/", "/" + "home/")
FORBIDDEN = re.compile("|".join(re.escape(p) for p in (NOTEBOOK, *MACHINE_PATHS)))


def _text_files():
    for entry in CHECKED:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        for f in files:
            if "__pycache__" in f.parts:
                continue
            data = f.read_bytes()
            if b"\0" in data[:8192]:  # binary (weights, compiled files)
                continue
            yield f, data.decode("utf-8", "replace")


def test_no_notebook_or_machine_paths():
    hits = []
    for f, text in _text_files():
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not hits, "references outside the repository (write the fact into docs/, the data into tests/fixtures/):\n" \
                     + "\n".join(hits)


def test_the_check_sees_what_it_forbids():
    assert FORBIDDEN.search("see ../" + NOTEBOOK + "reference/x.md") and FORBIDDEN.search("/" + "root/.cache")
    assert not FORBIDDEN.search("docs/tensorrt-llm-contract.md §4")
    assert sum(1 for _ in _text_files()) > 50  # it reads the tree, not nothing


def test_cited_docs_exist():
    """Every page of ours (docs/<page>.md, docs/facts/<page>.md) named in code, tests or docs is in the repository.
    Other projects' docs paths (`docs/source/...` in TensorRT-LLM) have more folders and are not matched."""
    cited = re.compile(r"(?<![\w/.-])docs/(?:facts/)?[\w-]+\.md")
    missing = sorted({f"{m.group(0)} (cited in {f.relative_to(ROOT)})" for f, text in _text_files()
                      for m in cited.finditer(text) if not (ROOT / m.group(0)).is_file()})
    assert not missing, missing
