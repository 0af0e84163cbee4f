"""Every `trt-gemma` command in the README runs: the cheap ones here, through the real entry point, with the exit code
and figures their comments promise; the heavy ones (model builds, calibration, serving) are named with the test file
that runs the same command path. A README command that is neither fails this test."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Subcommands run here: no model weights are touched (plan reads config.json or a preset).
CHEAP = {"plan", "targets", "detect", "doctor"}
# Subcommands whose README lines need weights, calibration, a bundle or a server: the tests that run that path.
COVERED = {
    "build": "tests/test_build.py", "inspect": "tests/test_build.py", "convert": "tests/test_convert.py",
    "quantize": "tests/test_quantize.py", "eval": "tests/test_eval.py", "generate": "tests/test_generate_cli.py",
    "serve": "tests/test_serve.py", "telemetry": "tests/test_telemetry.py",
}


def readme_commands() -> list[tuple[str, str]]:
    """(command, trailing comment) of every `trt-gemma ...` line in the README's bash blocks."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.splitlines():
            code, _, comment = line.partition("  #")
            for part in re.split(r"&&|;", code):
                part = part.strip()
                if part.startswith("trt-gemma "):
                    out.append((part.rstrip("&").strip(), comment.strip()))
    return out


def _sub(cmd: str) -> str:
    return shlex.split(cmd)[1]


def _invokes(text: str, sub: str) -> bool:
    """A test file runs `trt-gemma SUB` (CLI argv) or the stage function behind it."""
    return f'"{sub}"' in text or f"'{sub}'" in text or f"{sub.replace('-', '_')}_" in text


def test_every_readme_command_is_run_or_covered():
    subs = {_sub(c) for c, _ in readme_commands()}
    assert subs >= {"plan", "build", "serve"}, subs  # the parser found the tour
    others = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_readme.py"}
    for sub in sorted(subs - CHEAP):
        where = [COVERED[sub]] if sub in COVERED else [f"tests/{n}" for n, t in others.items() if _invokes(t, sub)]
        assert where, f"README runs `trt-gemma {sub}` but no test does: add one (or map it in COVERED)"
        assert all(_invokes((ROOT / w).read_text(), sub) for w in where), (sub, where)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


# A hub id needs the HF cache (or the network): tests/test_plan.py::test_hub_id_from_the_local_cache runs that path.
@pytest.mark.parametrize("cmd,comment", [c for c in readme_commands() if _sub(c[0]) in CHEAP and "google/" not in c[0]])
def test_cheap_readme_command(cmd, comment, capsys):
    argv = shlex.split(cmd)[1:]
    code, out, err = _run(argv, capsys)
    m = re.search(r"exit (\d+)", comment)
    assert code == (int(m.group(1)) if m else 0), f"{cmd}: exit {code}\n{err}"
    assert out.strip() and "Traceback" not in out + err
    if "--json" in argv:
        json.loads(out)  # stdout is the document, even when the plan does not fit
    for figure in re.findall(r"\d+\.\d+ of \d+\.\d+ GiB|\d+(?:\.\d+)? tok/s|--set \S+", comment):
        for part in re.findall(r"\d+\.\d+|\d+ tok/s|--set \S+", figure):  # each figure quoted is printed
            assert part in out + err, (cmd, part)


def test_quality_table_rows_are_the_eval_commands_checkpoints():
    """The README's quality table is what its own commands print: one row per checkpoint the eval line scores, each
    made by a convert/quantize line above it, against the --baseline it names, over the tokens it says."""
    cmds = [c for c, _ in readme_commands()]
    ev = shlex.split(next(c for c in cmds if _sub(c) == "eval" and "--baseline" in c))
    scored = [a.rstrip("/") for a in ev[2:ev.index("--baseline")]]
    made = {shlex.split(c)[2].rstrip("/") for c in cmds if _sub(c) in ("convert", "quantize")
            and len(shlex.split(c)) > 2}
    baseline = ev[ev.index("--baseline") + 1].rstrip("/")
    assert set(scored) | {baseline} <= made, (scored, made)
    section = README.split("**Quantize and measure**", 1)[1].split("```bash", 1)[0]
    rows = [r.split("|")[1].strip().strip("`") for r in section.splitlines() if r.startswith("| ") and "---" not in r]
    assert rows[1:] == scored, (rows, scored)  # rows[0] is the header
    assert f"{ev[ev.index('--max-tokens') + 1]} tokens" in section and "bfloat16" in section


# Options of the README's commands that take no value (every other --option consumes the next word).
_FLAGS = {"--force", "--json", "--chat", "--k8s", "--print-k8s", "--watch", "--streaming"}
# subcommand -> (positionals, options) -> the paths it reads / writes
_READS = {
    "generate": lambda p, o: p[:1], "serve": lambda p, o: p[:1], "export-triton": lambda p, o: p[:1],
    "export-onnx": lambda p, o: p[:1] if len(p) == 2 else [],  # [CKPT] OUT
    "eval": lambda p, o: p + ([o["--baseline"]] if "--baseline" in o else []), "inspect": lambda p, o: p,
    "build": lambda p, o: [o["--from-bundle"]] if "--from-bundle" in o else [],
}
_WRITES = {
    "convert": lambda p, o: p[-1:], "quantize": lambda p, o: p[-1:], "export-onnx": lambda p, o: p[-1:],
    "export-triton": lambda p, o: p[1:2], "build": lambda p, o: [o["--out"]] if "--out" in o else [],
}


def _args(cmd: str) -> tuple[list[str], dict[str, str]]:
    """(positionals, {option: value}) of one README command, without `trt-gemma SUB`."""
    words, pos, opts = shlex.split(cmd)[2:], [], {}
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--") and w not in _FLAGS:
            opts[w], i = (words[i + 1] if i + 1 < len(words) else ""), i + 2
            continue
        if not w.startswith("--"):
            pos.append(w)
        i += 1
    return pos, opts


def test_readme_commands_read_what_earlier_commands_wrote():
    """A directory a README command reads was written by a command above it (an example that reads `q-awq/` after
    the commands were renamed to write `int4_awq/` cannot run). Placeholders (BUNDLE), globs and hub ids aside."""
    made: set[str] = set()
    for cmd, _ in readme_commands():
        sub, (pos, opts) = _sub(cmd), _args(cmd)
        for path in _READS.get(sub, lambda p, o: [])(pos, opts):
            if path.isupper() or "*" in path or path.startswith("google/"):
                continue
            path = path.rstrip("/")  # a dir a command wrote, or one inside it (a bundle's tensorrt/)
            assert any(path == m or path.startswith(m + "/") for m in made), \
                f"`{cmd}` reads {path}, which no README command above it writes"
        made |= {path.rstrip("/") for path in _WRITES.get(sub, lambda p, o: [])(pos, opts)}
