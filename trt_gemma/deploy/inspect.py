"""Check a repository written by `trt-gemma export-triton` (used by `export-triton --inspect` and `trt-gemma inspect`).

Each config.pbtxt is parsed by Triton's own ModelConfig schema (strict: unknown fields and wrong types fail), the
mandatory parameters of tensorrtllm_backend/docs/model_config.md are located in it, leftover `${...}` placeholders
are listed, the ensemble is walked step by step, and the engine dir must hold an engine (config.json + rank0.engine).
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Callable

from trt_gemma.errors import DependencyError, InputError
from trt_gemma.deploy.triton import DEFAULT_REPO_PATH, EXPORT_MANIFEST, K8S_FILE, MANDATORY, next_steps
from trt_gemma.deploy.models import MODELS
from trt_gemma.safe_io import check_tree, open_in, read_json_object

CONFIG_MAX_BYTES = 1 << 20


def model_config_pb2():
    """Triton's own ModelConfig schema, shipped by tritonclient as generated Python (tritonclient/grpc/
    model_config_pb2.py). Loaded from its file: importing tritonclient.grpc would also need grpcio, which the
    schema does not."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError("tritonclient is not installed: Triton's model-config schema comes from it",
                              fix="pip install tritonclient (it is in trt-gemma's dev extra)")
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    loaded = importlib.util.spec_from_file_location("trt_gemma_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(loaded)
    try:
        loaded.loader.exec_module(module)
    except Exception as e:  # missing file, or protobuf older than the generated code (VersionError)
        raise DependencyError(f"Triton's schema in {path} cannot be loaded: {e}",
                              fix="pip install -U tritonclient protobuf") from e
    return module


_PB2 = None


def _schema():
    """model_config_pb2(), executed once per process (DependencyError when it cannot be loaded)."""
    global _PB2
    if _PB2 is None:
        _PB2 = model_config_pb2()
    return _PB2


def parse_config(text: str):
    """Parse a config.pbtxt strictly (unknown fields and wrong types raise) into Triton's ModelConfig."""
    from google.protobuf import text_format

    return text_format.Parse(text, _schema().ModelConfig())


def _param(name: str):
    return lambda c: c.parameters[name].string_value if name in c.parameters else None


def _tensor_type(kind: str, name: str):
    def get(c):
        pb = type(c).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
        found = [t for t in getattr(c, kind) if t.name == name]
        return pb.values_by_number[found[0].data_type].name if found else None
    return get


def _queue_field(name: str):
    def get(c):
        if not c.HasField("dynamic_batching"):
            return None
        if name == "max_queue_size":
            q = c.dynamic_batching
            return q.default_queue_policy.max_queue_size if q.HasField("default_queue_policy") else None
        return c.dynamic_batching.max_queue_delay_microseconds
    return get


# Where each mandatory template variable lands in a ModelConfig (tensorrt_llm/config.pbtxt and siblings).
MANDATORY_FIELDS: dict[str, Callable] = {
    "triton_max_batch_size": lambda c: c.max_batch_size or None,
    "logits_datatype": _tensor_type("output", "generation_logits"),
    "tokenizer_dir": _param("tokenizer_dir"),
    "preprocessing_instance_count": lambda c: c.instance_group[0].count if c.instance_group else None,
    "postprocessing_instance_count": lambda c: c.instance_group[0].count if c.instance_group else None,
    "bls_instance_count": lambda c: c.instance_group[0].count if c.instance_group else None,
    "max_queue_delay_microseconds": _queue_field("max_queue_delay_microseconds"),
    "max_queue_size": _queue_field("max_queue_size"),
    "triton_backend": lambda c: c.backend or None,
    "decoupled_mode": lambda c: c.model_transaction_policy.decoupled if c.HasField("model_transaction_policy")
    else None,
    "engine_dir": _param("gpt_model_path"),
    "batching_strategy": _param("gpt_model_type"),
    "encoder_input_features_data_type": _tensor_type("input", "encoder_input_features"),
}


def ensemble_problems(configs: dict) -> list[str]:
    """Walk the ensemble: each step's inputs must be ensemble inputs or earlier steps' outputs, with the same data
    type; each step's map keys must be that model's tensors; each ensemble output must be produced."""
    ens = configs["ensemble"]
    available = {t.name: (t.data_type, list(t.dims)) for t in ens.input}
    problems = []
    for step in ens.ensemble_scheduling.step:
        model = configs.get(step.model_name)
        if model is None:
            problems.append(f"step {step.model_name}: no such model in the repository")
            continue
        ins = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        outs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        for key, src in step.input_map.items():
            if key not in ins:
                problems.append(f"step {step.model_name}: {key} is not an input of the model")
            elif src not in available:
                problems.append(f"step {step.model_name}: input {key} <- {src}, which nothing before it produces")
            elif not _compatible(available[src], ins[key]):
                problems.append(f"step {step.model_name}: {key} <- {src} with another data type or shape")
        problems += [f"step {step.model_name}: required input {t.name} is not mapped" for t in model.input
                     if not t.optional and t.name not in step.input_map]
        for key, dst in step.output_map.items():
            if key not in outs:
                problems.append(f"step {step.model_name}: {key} is not an output of the model")
            else:
                available[dst] = outs[key]
    problems += [f"ensemble output {t.name} is produced by no step (or with another type or shape)"
                 for t in ens.output if not _compatible(available.get(t.name), (t.data_type, list(t.dims)))]
    return problems


def _compatible(a, b) -> bool:
    """Same data type; same rank with each dimension equal or variable (-1) on one side."""
    return a is not None and a[0] == b[0] and len(a[1]) == len(b[1]) and all(
        x == y or -1 in (x, y) for x, y in zip(a[1], b[1]))


def _read_config(f: Path) -> str:
    """A config.pbtxt (checked under its model dir, at most CONFIG_MAX_BYTES: ours are a few KB)."""
    with open_in(f, fix="export the repository again") as fh:
        data = fh.read(CONFIG_MAX_BYTES + 1)
    if len(data) > CONFIG_MAX_BYTES:
        raise InputError(f"{f} is larger than {CONFIG_MAX_BYTES >> 10} KiB: not a config export-triton wrote",
                         fix="export the repository again")
    return data.decode("utf-8", errors="replace")


def inspect_repository(path: str | Path) -> dict:
    """Describe an exported repository: each model's config checked against Triton's schema, its mandatory
    parameters, leftover `${...}` placeholders, the ensemble wiring, and what was exported from what."""
    path = Path(path)
    record_file = path / EXPORT_MANIFEST
    if not record_file.is_file():
        raise InputError(f"{path} has no {EXPORT_MANIFEST}: not a repository written by `trt-gemma export-triton`",
                         fix="export one: trt-gemma export-triton BUNDLE OUT")
    check_tree(path, fix="export the repository again")
    record = read_json_object(record_file, fix="export the repository again")
    try:
        _schema()
        schema = "tritonclient model_config_pb2"
    except DependencyError as e:
        schema = None
        schema_reason = e.message
    models, parsed = {}, {}
    for model in MODELS:
        f = path / model / "config.pbtxt"
        text = _read_config(f) if f.is_file() else ""
        row = {"config": f.is_file(), "version_dir": (path / model / "1").is_dir(),
               "placeholders": sorted(set(re.findall(r"\$\{[^}]*\}", text)))}
        if schema and text:
            try:
                parsed[model] = parse_config(text)
                values = {v: MANDATORY_FIELDS[v](parsed[model]) for v in MANDATORY[model]}
                row.update(schema_ok=True, mandatory=values, missing=[v for v, x in values.items() if x is None])
            except Exception as e:  # text_format.ParseError: the message names line, column and field
                row.update(schema_ok=False, error=str(e))
        models[model] = row
    from trt_gemma.runtime.trtllm import is_engine_dir

    graph = ensemble_problems(parsed) if len(parsed) == len(MODELS) else None
    engine = path / "tensorrt_llm" / "1" / "engine"
    ok = all(r["config"] and r["version_dir"] and not r["placeholders"] and r.get("schema_ok", True)
             and not r.get("missing") for r in models.values()) and not graph and is_engine_dir(engine)
    return {"path": str(path), "kind": "triton-repository", "bundle": record.get("bundle"), "tp": record.get("tp"),
            "trtllm_version": record.get("trtllm_version"), "triton_image": record.get("triton_image"),
            "schema": schema or f"not checked: {schema_reason}", "models": models, "ensemble_problems": graph,
            "engine_files": sorted(p.name for p in engine.iterdir()) if engine.is_dir() else [],
            "kubernetes": (path / K8S_FILE).is_file(), "values": record.get("values"), "ok": ok,
            "next": next_steps(path, int(record.get("tp") or 1), (record.get("values") or {}).get("repo_path",
                               DEFAULT_REPO_PATH), (path / K8S_FILE).is_file(),
                               bool((record.get("values") or {}).get("decoupled_mode")), record.get("triton_image"))}
