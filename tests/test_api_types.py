"""The public surface passes a strict type checker: mypy --strict on trt_gemma/__init__.py, the API modules and an
app written against it (docs/api.md's example); an app that misuses a type must be rejected (the check can fail)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy", reason="mypy is in the dev extra (pip install 'trt-gemma[dev]')")

REPO = Path(__file__).resolve().parent.parent
PUBLIC = ["trt_gemma/__init__.py", "trt_gemma/api.py", "trt_gemma/runtime/scheduler.py", "trt_gemma/stages.py"]

APP = '''
import asyncio
import trt_gemma
from trt_gemma.stages import plan


def main() -> None:
    p: trt_gemma.Plan = plan(None, target="jetson-orin-nano-8gb")
    print(p.verdict, p.fits)
    with trt_gemma.load(None, max_concurrency=2) as model:
        for piece in model.stream("Gemma runs on", max_tokens=8, stop=["\\n"]):
            text: str = piece.text
            ids: tuple[int, ...] = piece.token_ids
            print(text, ids)
        c: trt_gemma.Completion = model.chat([{"role": "user", "content": "Hi"}], temperature=0.7, seed=1)
        tps: float = c.timings.decode_tokens_per_s
        info: trt_gemma.ModelInfo = model.info
        print(c.usage.total_tokens, tps, info.precision, info.memory.weights_bytes, model.telemetry()["memory_bytes"])
        print(asyncio.run(model.agenerate([2, 3, 4], max_tokens=4)).finish_reason)
'''
MISUSE = '''
import trt_gemma

with trt_gemma.load() as model:
    n: int = model.generate("x").text
'''


def _mypy(tmp_path: Path, *files: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--cache-dir", str(tmp_path / ".mypy_cache"), *files],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


def test_public_api_is_strictly_typed(tmp_path):
    """One mypy run (it takes tens of seconds on a busy 2-core host): the only error is the misuse's."""
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "misuse.py").write_text(MISUSE)
    r = _mypy(tmp_path, *PUBLIC, str(tmp_path / "app.py"), str(tmp_path / "misuse.py"))
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "misuse.py:5:" in errors[0] and \
        'Incompatible types in assignment (expression has type "str", variable has type "int")' in errors[0], r.stdout
