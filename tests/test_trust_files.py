"""Issue 20, files: artifacts from elsewhere are read under their root only, and outputs are never written through a
link. Each reproduction of the issue is a test here (each failed before trt_gemma.safe_io), and one test walks a
bundle holding every kind of hostile entry through every command that reads bundles.

The bundle is built from the embedded model (no GPU); its engine/ for export-triton is test_triton_export's FAKE
(metadata only: export reads nothing else from it).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trt_gemma import build as B
from trt_gemma.cli import main
from trt_gemma.errors import InputError, OutputError

import trt_gemma

ROOT = Path(trt_gemma.__file__).resolve().parents[1]  # the code under test, for the subprocesses too


def run_cli(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    cap = capsys.readouterr()
    return e.value.code, cap.err


def digest(root: Path) -> dict:
    """Every entry under `root` (links not followed): a link's target, a file's sha256, a dir's presence."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(top) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b"
    B.build_bundle(None, "rtx-4090", out=out, skip_quality=True, show_progress=False, compile_engine=False)
    return out


@pytest.fixture
def site(tmp_path, bundle, monkeypatch) -> Path:
    """A user's folder: SECRET.txt, a copy of the bundle in site/B, the converter's cache inside the folder."""
    (tmp_path / "SECRET.txt").write_text("api key\n")
    shutil.copytree(bundle, tmp_path / "B", symlinks=True)
    monkeypatch.setenv("TRT_GEMMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --- item 1: writes follow symlinks out of the output ---------------------------------------------------------------

def test_manifest_tmp_link_is_not_written_through(site, capsys):
    """`ln -s VICTIM B/manifest.json.tmp; build --from-bundle B --engine tensorrt --force` wrote VICTIM (exit 0)."""
    pytest.importorskip("tensorrt_rtx", reason="the TensorRT route builds with tensorrt-rtx (pip install '.[dev]')")
    victim = site / "VICTIM.txt"
    victim.write_text("victim\n")
    os.symlink(victim, site / "B" / "manifest.json.tmp")
    code, err = run_cli(["build", "--from-bundle", "B", "--engine", "tensorrt", "--force"], capsys)
    assert code == 2 and "manifest.json.tmp" in err and "outside" in err, err
    assert victim.read_text() == "victim\n"
    # a link that stays inside the bundle is no way out either: the manifest is a new file renamed into place
    os.unlink(site / "B" / "manifest.json.tmp")
    os.symlink("plan.json", site / "B" / "manifest.json.tmp")
    plan = (site / "B" / "plan.json").read_bytes()
    code, err = run_cli(["build", "--from-bundle", "B", "--engine", "tensorrt", "--force"], capsys)
    assert code == 0, err
    assert (site / "B" / "plan.json").read_bytes() == plan
    assert not (site / "B" / "manifest.json").is_symlink()
    assert json.loads((site / "B" / "manifest.json").read_text())["tensorrt"]["engine"]


def test_single_file_output_needs_force_and_never_replaces_a_link(site, capsys):
    """`features --html notes.txt` overwrote an existing file silently and replaced a symlink given as the path."""
    notes, victim = site / "notes.txt", site / "VICTIM.txt"
    notes.write_text("my notes\n")
    victim.write_text("victim\n")
    os.symlink(victim, site / "page.html")
    args = ["features", "--layer", "2", "--text", "hello world"]
    code, err = run_cli([*args, "--html", notes], capsys)
    assert code == OutputError.exit_code and "already exists" in err and "--force" in err, err
    assert notes.read_text() == "my notes\n"
    for force in ([], ["--force"]):
        code, err = run_cli([*args, "--html", site / "page.html", *force], capsys)
        assert code == OutputError.exit_code and "symbolic link" in err, err
        assert (site / "page.html").is_symlink() and victim.read_text() == "victim\n"
    code, err = run_cli([*args, "--html", notes, "--force"], capsys)
    assert code == 0, err
    assert "<html" in notes.read_text().lower() and notes.stat().st_mode & 0o777 == 0o644


# --- item 2: reads follow symlinks and `..` out of the input --------------------------------------------------------

def test_export_triton_copies_no_link_out(site, capsys):
    """`export-triton B OUT` copied (hard-linked) B/engine/secret.txt -> ../../SECRET.txt into the repository."""
    from test_triton_export import fake_engine

    fake_engine(site / "B")
    os.symlink("../../SECRET.txt", site / "B" / "engine" / "secret.txt")
    before = digest(site)
    code, err = run_cli(["export-triton", "B", "OUT"], capsys)
    assert code == 2 and "secret.txt" in err and "outside" in err and "internal error" not in err, err
    assert digest(site) == before, "nothing written, nothing changed"
    # a link inside the bundle is resolved: its content is copied, as a regular file of the repository
    os.unlink(site / "B" / "engine" / "secret.txt")
    os.unlink(site / "B" / "engine" / "tokenizer.json")
    os.symlink("../checkpoint/tokenizer.json", site / "B" / "engine" / "tokenizer.json")
    code, err = run_cli(["export-triton", "B", "OUT"], capsys)
    assert code == 0, err
    copied = site / "OUT" / "tensorrt_llm" / "1" / "engine" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == (site / "B" / "checkpoint" / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def onnx_export(bundle, tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime")
    from trt_gemma.onnx.export import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "x"
    export_onnx(bundle / "checkpoint", out, show_progress=False)
    return out


def _manifest_variants(export: Path, other: Path) -> dict[str, tuple[dict, str]]:
    man = json.loads((export / "trt_gemma_onnx.json").read_text())
    model = man["model"]
    return {"dotdot model_file": ({**man, "model_file": "../other/model.onnx"}, "leaves the directory"),
            "absolute model_file": ({**man, "model_file": str(other / "model.onnx")}, "leaves the directory"),
            "dotdot data_file": ({**man, "data_file": "../other/model.onnx.data"}, "leaves the directory"),
            "no model_file": ({k: v for k, v in man.items() if k != "model_file"}, "'model_file'"),
            "max_seq_len a string": ({**man, "model": {**model, "max_seq_len": "big"}}, "'max_seq_len'"),
            "model a list": ({**man, "model": [1]}, "'model'"),
            "not an object": ([man], "not a JSON object")}


def test_onnx_manifest_names_stay_inside(onnx_export, tmp_path, capsys):
    """An export whose trt_gemma_onnx.json says `"model_file": "../other/model.onnx"` ran the outside graph; a
    malformed manifest was an internal error."""
    other = tmp_path / "other"
    shutil.copytree(onnx_export, other)
    for case, (man, words) in _manifest_variants(onnx_export, other).items():
        export = tmp_path / "x"
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(onnx_export, export)
        (export / "trt_gemma_onnx.json").write_text(json.dumps(man))
        code, err = run_cli(["generate", export, "--prompt", "hi", "--max-tokens", "1"], capsys)
        assert code == 2 and words in err and "trt_gemma_onnx.json" in err, (case, err)
        assert "internal error" not in err and "Traceback" not in err, case


def test_onnx_graph_linked_from_outside_is_refused(onnx_export, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(onnx_export, other)
    export = tmp_path / "x"
    shutil.copytree(onnx_export, export)
    os.unlink(export / "model.onnx")
    os.symlink(other / "model.onnx", export / "model.onnx")
    code, err = run_cli(["generate", export, "--prompt", "hi", "--max-tokens", "1"], capsys)
    assert code == 2 and "model.onnx" in err and "outside" in err, err


def test_onnx_weights_named_outside_are_refused(onnx_export, tmp_path, capsys):
    """The graph's own external-data locations are names read from the artifact too (onnxruntime refuses an escape,
    but as an internal error)."""
    import onnx

    shutil.copytree(onnx_export, tmp_path / "other")
    export = tmp_path / "x"
    shutil.copytree(onnx_export, export)
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../other/model.onnx.data"
    (export / "model.onnx").write_bytes(model.SerializeToString())
    code, err = run_cli(["generate", export, "--prompt", "hi", "--max-tokens", "1"], capsys)
    assert code == 2 and "model.onnx" in err and "leaves the directory" in err, err
    assert "internal error" not in err


def test_hf_index_shard_names_stay_inside(tmp_path):
    from tiny import make_tiny_hf_model

    from trt_gemma.checkpoint.hf import HFModel

    d = make_tiny_hf_model(tmp_path / "m", shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / first).write_bytes((d / first).read_bytes())
    index["weight_map"] = {k: (f"../{v}" if v == first else v) for k, v in index["weight_map"].items()}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="leaves the directory") as e:
        HFModel.open(d)
    assert "model.safetensors.index.json" in e.value.message and "re-download" in e.value.fix


def test_hub_cache_snapshot_links_into_its_blobs(tmp_path):
    """The Hugging Face cache is the one layout whose files link out of their folder by design."""
    from trt_gemma.safe_io import check_tree, read_json

    repo = tmp_path / "models--google--gemma"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text('{"model_type": "gemma2"}')
    snap = repo / "snapshots" / "rev"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/abc", snap / "config.json")
    check_tree(snap)
    assert read_json(snap / "config.json") == {"model_type": "gemma2"}
    (tmp_path / "elsewhere").write_text("secret")
    os.symlink("../../../elsewhere", snap / "escape")
    with pytest.raises(InputError, match="outside"):
        check_tree(snap)


def test_bundle_manifest_fields_and_names_are_checked(site, capsys):
    """A manifest that parses but lacks what readers take from it, or names a file outside the bundle, is a typed
    error naming the field or the name."""
    man = json.loads((site / "B" / "manifest.json").read_text())
    cases = [({k: v for k, v in man.items() if k != "target"}, ["inspect", "B"], "field 'target'"),
             ({**man, "target": {"title": "x"}}, ["build", "--from-bundle", "B"], "target.name"),
             ({**man, "model": {**man["model"], "config": "../SECRET.txt"}}, ["plan", "--model", "B"],
              "leaves the directory")]
    for data, args, words in cases:
        (site / "B" / "manifest.json").write_text(json.dumps(data))
        code, err = run_cli(args, capsys)
        assert code == 2 and words in err and "manifest.json" in err and "internal error" not in err, (args, err)


# --- item 7: --force and the temp sweep reach too far ---------------------------------------------------------------

def test_force_needs_our_schema_not_our_file_name(tiny_model_dir, tmp_path, capsys):
    """`proj/main.py` was lost because `proj/trt_gemma_settings.json` existed."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "main.py").write_text("print('hello')\n")
    (proj / "trt_gemma_settings.json").write_text('{"theme": "dark"}')
    before = digest(tmp_path)
    code, err = run_cli(["convert", tiny_model_dir, proj, "--force"], capsys)
    assert code == OutputError.exit_code and "not written by trt-gemma" in err, err
    # a record of ours by name whose content is not ours (no format of our schema) does not count either
    (proj / "trt_gemma_onnx.json").write_text('{"opset": 21}')
    code, err = run_cli(["convert", tiny_model_dir, proj, "--force"], capsys)
    assert code == OutputError.exit_code, err
    (proj / "trt_gemma_onnx.json").unlink()
    assert digest(tmp_path) == before


def test_force_never_replaces_a_link(tiny_model_dir, tmp_path, capsys):
    ours = tmp_path / "ours"
    B_convert = ["convert", tiny_model_dir]
    assert run_cli([*B_convert, ours], capsys)[0] == 0
    os.symlink(ours, tmp_path / "link")
    before = digest(tmp_path)
    code, err = run_cli([*B_convert, tmp_path / "link", "--force"], capsys)
    assert code == OutputError.exit_code and "symbolic link" in err, err
    assert digest(tmp_path) == before


def _leftover(parent: Path, **changes) -> Path:
    """The temp dir a killed run leaves beside its output (made by fsutil itself), its marker then edited."""
    from trt_gemma.fsutil import TEMP_MARKER, _make_marked_dir

    d = _make_marked_dir(parent, ".bundleK.tmp-")
    (d / "payload").mkdir()
    (d / "payload" / "rank0.safetensors").write_bytes(b"\0" * 64)
    marker = json.loads((d / TEMP_MARKER).read_text())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / TEMP_MARKER).write_text(json.dumps({**marker, "pid": dead.pid, **changes}))
    return d


def test_sweep_keeps_renamed_foreign_and_live_dirs(tmp_path, caplog):
    """A killed run's temp dir that the user renamed (`mv .bundleK.tmp-* salvaged`) and added to was deleted; a live
    run's temp dir in another PID namespace with the same hostname was deleted."""
    from trt_gemma.fsutil import sweep_stale_temp_dirs

    salvaged = tmp_path / "salvaged"
    os.rename(_leftover(tmp_path), salvaged)
    (salvaged / "notes.txt").write_text("kept\n")
    renamed = tmp_path / ".bundleK.tmp-zzzzzzzz"  # renamed to another name of our pattern: still not its own name
    os.rename(_leftover(tmp_path), renamed)
    other_ns = _leftover(tmp_path, pid_namespace=1)
    other_boot = _leftover(tmp_path, boot_id="00000000-0000-0000-0000-000000000000")
    stale = _leftover(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    with caplog.at_level("WARNING", logger="trt_gemma.fsutil"):
        assert sweep_stale_temp_dirs(tmp_path) == [stale]
    assert {p.name for p in tmp_path.iterdir()} == before - {stale.name}
    assert (salvaged / "notes.txt").read_text() == "kept\n" and renamed.is_dir()
    assert other_ns.is_dir() and other_boot.is_dir()
    assert [r.getMessage() for r in caplog.records if str(stale) in r.getMessage()], "each removal is logged"


# --- item 8 and the acceptance walk: hostile entries are typed errors for every command -----------------------------

def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _deep(levels: int) -> str:
    return '{"a": ' * levels + "1" + "}" * levels


def _hostile(b: Path, kind: str) -> str:
    """Put one hostile entry of `kind` into bundle `b`; returns what the error must name."""
    outside = b.parent / "outside"
    if kind == "link out":
        (b / "engine").mkdir()
        os.symlink("../../SECRET.txt", b / "engine" / "secret.txt")
        return "secret.txt"
    if kind == "link loop":
        os.symlink("loop.json", b / "checkpoint" / "loop.json")
        return "loop.json"
    if kind == "dangling link":
        os.symlink("gone.model", b / "checkpoint" / "tokenizer.model")
        return "tokenizer.model"
    if kind == "dotdot link":  # a weight file replaced by a `../..` link to a (valid) copy outside the bundle
        outside.mkdir()
        shutil.copy(b / "checkpoint" / "rank0.safetensors", outside / "rank0.safetensors")
        os.unlink(b / "checkpoint" / "rank0.safetensors")
        os.symlink("../../outside/rank0.safetensors", b / "checkpoint" / "rank0.safetensors")
        return "rank0.safetensors"
    for name in ("manifest.json", "checkpoint/config.json"):  # each command reads one of the two first
        if kind == "huge json":
            _sparse(b / name, 190 << 20)
        elif kind == "nested json":
            (b / name).write_text(_deep(100))  # over the cap (safe_io.JSON_MAX_DEPTH), under Python's recursion limit
        else:  # "recursion json": deeper than Python's recursion limit
            (b / name).write_text("[" * 100_000 + "]" * 100_000)
    return "json"


HOSTILE = ("link out", "link loop", "dangling link", "dotdot link", "huge json", "nested json", "recursion json")
COMMANDS = {
    "inspect": ["inspect", "B"],
    "plan": ["plan", "--model", "B", "--target", "rtx-4090"],
    "generate": ["generate", "B", "--prompt", "hi", "--max-tokens", "1"],
    "build --from-bundle": ["build", "--from-bundle", "B", "--force"],
    "build --from-bundle --engine tensorrt": ["build", "--from-bundle", "B", "--engine", "tensorrt", "--force"],
    "export-onnx": ["export-onnx", "B", "OUT"],
    "export-triton": ["export-triton", "B", "OUT"],
}
# `check` reads BUNDLE/tensorrt/ alone before it asks for the device: it meets the link kinds (the whole bundle is
# checked first), not JSON it never opens on a host without the engine's GPU
LINK_KINDS = ("link out", "link loop", "dangling link", "dotdot link")
WORDS = {"link out": "outside", "link loop": "loop", "dangling link": "dangling", "dotdot link": "outside",
         "huge json": "capped", "nested json": "deeper than", "recursion json": "deeper than"}


@pytest.mark.parametrize("kind", HOSTILE)
def test_every_bundle_command_refuses_hostile_entries(site, kind, capsys):
    """Typed error (exit 2, the entry and the reason named, no traceback), and nothing outside B and OUT changes:
    the whole folder (SECRET.txt, the cache, B itself) hashes the same before and after."""
    named = _hostile(site / "B", kind)
    before = digest(site)
    commands = {**COMMANDS, **({"check": ["check", "B"]} if kind in LINK_KINDS else {})}
    for command, args in commands.items():
        code, err = run_cli(args, capsys)
        assert code == 2, (kind, command, err)
        assert named in err and WORDS[kind] in err and "fix:" in err, (kind, command, err)
        assert "internal error" not in err and "Traceback" not in err, (kind, command, err)
        assert digest(site) == before, (kind, command)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    serve = subprocess.run([sys.executable, "-m", "trt_gemma", "serve", "B", "--port", "0"], cwd=site, env=env,
                           capture_output=True, text=True, timeout=120)
    assert serve.returncode == 2 and named in serve.stderr and "Traceback" not in serve.stderr, (kind, serve.stderr)
    assert digest(site) == before, (kind, "serve")


def test_huge_json_is_refused_before_it_is_read(tmp_path):
    """A 190 MB config.json cost 1.8 GB of RSS before it was refused: the cap is checked on the open file."""
    d = tmp_path / "m"
    d.mkdir()
    _sparse(d / "config.json", 190 << 20)
    # VmHWM: this process's own peak (ru_maxrss would carry pytest's peak across the exec)
    code = ("import sys\nfrom pathlib import Path\nfrom trt_gemma.errors import InputError\n"
            "from trt_gemma.checkpoint.config import ModelConfig\ntry:\n    ModelConfig.from_file(sys.argv[1])\n"
            "except InputError as e:\n    print(e.message)\nprint([l.split()[1] for l in "
            "Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM:')][0])\n")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", code, str(d / "config.json")], env=env, capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert "capped at 16 MiB" in out[0] and "config.json" in out[0], out
    peak_mib = int(out[1]) / 1024
    assert peak_mib < 150, f"peak RSS {peak_mib:.0f} MiB: the file was read (190 MiB) before the cap"


def test_resolve_in_refusals(tmp_path):
    from trt_gemma.safe_io import read_json, resolve_in

    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    (root / "f").write_text("x")
    os.symlink("../f", root / "sub" / "up")  # inside the root: resolved
    assert resolve_in(root, "sub/up") == (root / "f").resolve()
    assert resolve_in(root, "missing") == root / "missing"
    for name in ("../f", "/etc/passwd", "sub/../../r/f", ""):
        with pytest.raises(InputError, match="leaves the directory"):
            resolve_in(root, name)
    os.symlink("nowhere", root / "dead")
    with pytest.raises(InputError, match="dangling"):
        resolve_in(root, "dead/x")
    os.mkfifo(root / "pipe.json")  # would block a plain read forever
    with pytest.raises(InputError, match="not a regular file"):
        read_json(root / "pipe.json")


def test_a_recipe_toml_nested_too_deep_or_too_large_is_a_typed_error(tmp_path):
    """tomllib recurses per inline table: a 100,000-deep recipe was a RecursionError ("internal error"); a huge one was
    read whole. Both are InputErrors naming the file, through `build --from-bundle`'s recipe reader and the runtime's."""
    from trt_gemma.errors import InputError
    from trt_gemma.recipes import load_recipe
    from trt_gemma.runtime.providers import bundle_limits
    from trt_gemma.targets import get_target

    deep = tmp_path / "deep" / "recipe.toml"
    deep.parent.mkdir()
    deep.write_text("max_batch_size = " + "[" * 100_000 + "]" * 100_000 + "\n")
    big = tmp_path / "big" / "recipe.toml"
    big.parent.mkdir()
    big.write_text("# " + "x" * (2 << 20) + "\n")
    for path, why in ((deep, "too deeply"), (big, "capped")):
        with pytest.raises(InputError, match=why) as e:
            load_recipe(get_target("rtx-4090"), path)
        assert str(path) in str(e.value)
        with pytest.raises(InputError, match=why):
            bundle_limits(path.parent)
