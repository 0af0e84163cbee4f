"""What a TensorRT / TensorRT-RTX engine is, and whether this host can run it, from what its build recorded.

An engine cannot be opened without a GPU (TensorRT-RTX's `deserialize_cuda_engine` fails with CUDA error 35 on a
GPU-less host; TensorRT proper is not even imported there), so `inspect` reads only the records engine/build.py
writes: the bundle manifest's "tensorrt" entry and BUNDLE/tensorrt/manifest.json beside the engine. A field an older
build did not record is listed as not recorded rather than guessed; fields added later (per-tensor I/O records, ...)
are passed through untouched. The engine file is found at BUNDLE/tensorrt/model.engine, never at the path recorded
on the build host, so a copied bundle inspects the same.
"""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

from trt_gemma.engine.rules import BUILDERS, ENGINE_DIR, ENGINE_FILE, builder_version
from trt_gemma.errors import InputError
from trt_gemma.safe_io import read_json

ENGINE_MANIFEST = "manifest.json"
ENGINE_KIND = "tensorrt-engine"
# What inspect shows, each recorded by build_engine; a manifest without one says so.
RECORDED = {"builder": "builder", "builder_version": "builder version", "sm": "SM", "precisions": "precisions",
            "activation_dtype": "activation dtype", "profiles": "profiles", "engine_bytes": "engine size"}
# Builders whose engines run only with the version that built them (TensorRT developer guide, "Version
# Compatibility": engines are compatible only with the TensorRT version that built them unless built
# version-compatible, which build_engine does not ask for). TensorRT-RTX states no rule we rely on: unknown.
SAME_VERSION_ONLY = {"tensorrt": True, "tensorrt_rtx": None}


def is_engine_dir(path: Path) -> bool:
    """BUNDLE/tensorrt/ as build_engine writes it: manifest.json of kind tensorrt-engine (+ model.engine)."""
    return _engine_record(Path(path)) is not None


def _engine_record(engine_dir: Path) -> dict | None:
    try:
        data = read_json(engine_dir / ENGINE_MANIFEST)  # capped; a link out, loop or dangling link is not a record
    except InputError:
        return None
    return data if isinstance(data, dict) and data.get("kind") == ENGINE_KIND else None


def engine_facts(engine_dir: Path, bundle_entry: dict | None = None) -> dict | None:
    """The recorded facts of the engine in `engine_dir` (a bundle's tensorrt/): its own manifest, else the bundle
    manifest's "tensorrt" entry; None when neither records an engine."""
    engine_dir = Path(engine_dir)
    record = _engine_record(engine_dir) or ((bundle_entry or {}).get("engine") or None)
    if record is None:
        return None
    f = engine_dir / ENGINE_FILE
    present = f.is_file()
    facts = {"engine_file": str(f), "present": present, "file_bytes": f.stat().st_size if present else None,
             "target": record.get("target"), "not_recorded": [label for key, label in RECORDED.items()
                                                              if record.get(key) in (None, [], {})],
             "record": record}
    facts.update({key: record.get(key) for key in RECORDED})
    return facts


def runnable_checks(facts: dict, host: dict) -> list[dict]:
    """Can THIS host run the engine? Its builder's runtime, at the version that built it, and a GPU of its SM;
    the engine file as recorded. Each check: name, ok (True / False / None = unknown), detail."""
    b = BUILDERS.get(facts.get("builder") or "")
    checks = []
    size = facts.get("engine_bytes")
    checks.append({"name": "engine file", "ok": facts["present"] and (size is None or facts["file_bytes"] == size),
                   "detail": (f"{facts['engine_file']}: {facts['file_bytes']:,} bytes" + (
                       f" (recorded {size:,})" if size not in (None, facts["file_bytes"]) else ""))
                   if facts["present"] else f"{facts['engine_file']} is missing"})
    if b is None:
        checks.append({"name": "runtime", "ok": None,
                       "detail": "builder not recorded: which runtime runs it is unknown"})
    else:
        checks.append(_runtime_check(b, facts.get("builder_version")))
    if host.get("sm") is None:
        checks.append({"name": "gpu", "ok": False,
                       "detail": "no NVIDIA GPU on this host, and TensorRT engines run only on one"})
    else:
        want = facts.get("sm")
        have = f"{host['sm'] // 10}.{host['sm'] % 10}"
        checks.append({"name": "gpu SM", "ok": None if want is None else want == have,
                       "detail": f"engine for SM {want or 'unknown'}, this GPU is SM {have}; an engine runs only on "
                                 "the SM it was built for"})
    return checks


def _runtime_check(b, built: str | None) -> dict:
    name = f"runtime {b.name}"
    if importlib.util.find_spec(b.name) is None:
        return {"name": name, "ok": False, "detail": f"{b.name} is not installed ({b.install})"}
    here = builder_version(b)
    if built is None or here is None or here == built:
        return {"name": name, "ok": True, "detail": f"{b.name} {here or '?'} (built with {built or 'unrecorded'})"}
    return {"name": name, "ok": SAME_VERSION_ONLY.get(b.name), "detail": f"built with {b.name} {built}, this host "
            f"has {here}" + ("; engines run only with the version that built them" if SAME_VERSION_ONLY.get(b.name)
                             else "; whether this runtime loads it is not known before a GPU tries")}


def describe(path: Path, bundle_entry: dict | None, host: dict) -> dict | None:
    """The `tensorrt` part of `inspect` for a bundle (path = the bundle) or its engine dir (path = BUNDLE/tensorrt):
    the recorded facts, the checks and the verdict; for a bundle whose route left the engine unbuilt, the reason."""
    engine_dir = path if is_engine_dir(path) else Path(path) / ENGINE_DIR
    facts = engine_facts(engine_dir, bundle_entry)
    if facts is None:
        if not bundle_entry:
            return None
        return {"built": False, "builder": bundle_entry.get("builder"), "reason": bundle_entry.get("reason"),
                "onnx": bundle_entry.get("onnx")}
    checks = runnable_checks(facts, host)
    blocking = [c["detail"] for c in checks if c["ok"] is False]
    return {"built": True, **facts, "checks": checks, "can_run_here": not blocking,
            "why_not": blocking[0] if blocking else None}


def profile_lines(profiles: dict) -> list[str]:
    """One line per profile: each distinct (min, opt, max) shape once, with the inputs that share it counted."""
    lines = []
    for prof, shapes in (profiles or {}).items():
        groups: dict[str, list[str]] = {}
        for name, (lo, opt, hi) in shapes.items():
            groups.setdefault(f"{list(lo)}..{list(hi)} (opt {list(opt)})", []).append(name)
        parts = [f"{names[0]}{f' +{len(names) - 1}' if len(names) > 1 else ''} {rng}" for rng, names in groups.items()]
        lines.append(f"{prof}: " + "; ".join(parts))
    return lines


def device_check_command(facts: dict, engine_dir: Path) -> str | None:
    """The recorded engine-side polygraphy command, with the build host's engine dir replaced by where the engine is
    now (a copied bundle's paths differ from the ones the build printed)."""
    record = facts["record"]
    cmds = record.get("check_commands") or []
    if len(cmds) < 2 or not record.get("engine_path"):
        return None
    old = str(Path(record["engine_path"]).parent)
    words = shlex.split(cmds[-1])
    n_env = next(i for i, w in enumerate(words) if "=" not in w)  # leading VAR=value words (POLYGRAPHY_USE_...)
    moved = [str(Path(engine_dir) / w[len(old) + 1:]) if w.startswith(old + "/") else w for w in words[n_env:]]
    return " ".join(words[:n_env] + [shlex.join(moved)])
