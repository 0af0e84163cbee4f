"""`trt-gemma export-triton`: the repository checked by Triton's own config schema, the ensemble graph walked, the
values compared with the bundle's recipe and engine, the refusals, and the round trip export -> inspect.

The bundle is built here from the embedded model (trt_gemma.build, no GPU). Its engine/ is a FAKE: TensorRT-LLM cannot
run on this host, so engine/ holds only what TensorRT-LLM writes beside the engine bytes (config.json =
{version, pretrained_config, build_config}, as NVIDIA/TensorRT-LLM tensorrt_llm/builder.py `Engine.save` writes it) and
a placeholder rank0.engine. Export reads nothing else from it; serving the repository needs a GPU and the Triton
container.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from trt_gemma import build as B
from trt_gemma.errors import ConfigError, DependencyError, InputError, OutputError
from trt_gemma.manifest import read_manifest, write_manifest
from trt_gemma.recipes import load_recipe
from trt_gemma.deploy.triton import EXPORT_MANIFEST, MANDATORY, export_triton  # MANDATORY: checked against the copy
from trt_gemma.deploy.inspect import inspect_repository, model_config_pb2
from trt_gemma.deploy.models import MODELS
from trt_gemma.targets import get_target

pb2 = None


def _schema():
    """Triton's ModelConfig from tritonclient (skips with the reason when tritonclient is not installed)."""
    global pb2
    pytest.importorskip("tritonclient", reason="Triton's config schema ships with tritonclient: pip install '.[dev]'")
    if pb2 is None:
        try:
            pb2 = model_config_pb2()
        except DependencyError as e:  # e.g. a protobuf runtime older than tritonclient's generated code
            pytest.skip(e.message)
    return pb2


def parse(path: Path):
    """Strict text_format parse into Triton's ModelConfig: unknown fields and wrong types raise."""
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), _schema().ModelConfig())


def fake_engine(bundle: Path, version: str = "1.1.0", tp: int = 1) -> Path:
    """FAKE engine dir (see module docstring): TRT-LLM's engine config.json around the bundle's checkpoint config."""
    from trt_gemma.engine.trtllm_flags import build_config_kwargs

    engine = bundle / "engine"
    engine.mkdir(exist_ok=True)
    recipe = B.read_bundle(bundle)[2]
    build_cfg = {k: v for k, v in build_config_kwargs(recipe).items() if k != "plugin_config"}
    pretrained = json.loads((bundle / "checkpoint" / "config.json").read_text())
    pretrained["mapping"].update(world_size=tp, tp_size=tp)
    (engine / "config.json").write_text(json.dumps({"version": version, "pretrained_config": pretrained,
                                                    "build_config": build_cfg}))
    for rank in range(tp):
        (engine / f"rank{rank}.engine").write_bytes(b"FAKE ENGINE: metadata-only test fixture\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (engine / f).write_bytes((bundle / "checkpoint" / f).read_bytes())
    m = read_manifest(bundle)
    m["tools"]["tensorrt_llm"] = version
    m["engine"] = {"status": "compiled", "gpu": "NVIDIA H100", "sm": "9.0", "sm_int": 90, "dir": "engine"}
    write_manifest(bundle, m)
    return engine


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    B.build_bundle(None, "rtx-a6000", out=out, skip_quality=True, show_progress=False, compile_engine=False)
    return out


@pytest.fixture(scope="module")
def repo(bundle, tmp_path_factory):
    fake_engine(bundle)
    out = tmp_path_factory.mktemp("repo") / "triton"
    export_triton(bundle, out, instances=3, k8s=True)
    return out


def test_every_config_parses_with_tritons_schema(repo):
    for model in MODELS:
        cfg = parse(repo / model / "config.pbtxt")
        assert cfg.name == model and (repo / model / "1").is_dir(), model
        text = (repo / model / "config.pbtxt").read_text()
        assert not re.findall(r"\$\{[^}]*\}", text), f"{model}: placeholders left"


def test_the_schema_check_is_strict(tmp_path):
    from google.protobuf import text_format

    with pytest.raises(text_format.ParseError, match="max_batch_sizes"):
        text_format.Parse('name: "x" max_batch_sizes: 4', _schema().ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse('name: "x" max_batch_size: "4"', _schema().ModelConfig())


def _params(cfg) -> dict:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def test_values_equal_the_recipe_and_engine(repo, bundle):
    recipe = B.read_bundle(bundle)[2]
    engine_cfg = json.loads((bundle / "engine" / "config.json").read_text())
    trt = parse(repo / "tensorrt_llm" / "config.pbtxt")
    p = _params(trt)
    assert trt.backend == "tensorrtllm" and trt.max_batch_size == recipe.max_batch_size
    assert trt.dynamic_batching.default_queue_policy.max_queue_size == 16
    assert p["gpt_model_type"] == "inflight_fused_batching"
    assert p["gpt_model_path"] == "/models/tensorrt_llm/1/engine"
    assert float(p["kv_cache_free_gpu_mem_fraction"]) == recipe.kv_cache_free_gpu_memory_fraction
    assert p["exclude_input_in_output"] == "true" and p["gpu_device_ids"] == "0"
    assert not trt.model_transaction_policy.decoupled  # --no-streaming is the default
    assert "max_tokens_in_paged_kv_cache" not in p  # recipe: no cap (0) -> the backend's fraction alone
    # Gemma 2's alternation, from the model's own config (transformers' layer_types + sliding_window)
    from trt_gemma.assets import default_model_dir

    hf = json.loads((default_model_dir() / "config.json").read_text())
    seq = engine_cfg["build_config"]["max_seq_len"]
    want = [min(hf["sliding_window"], seq) if t == "sliding_attention" else seq for t in hf["layer_types"]]
    assert [int(x) for x in p["max_attention_window_size"].split(",")] == want
    assert len(set(want)) == 2, "the fixture must exercise a window shorter than max_seq_len"
    assert p["enable_kv_cache_reuse"] == "false"  # cyclic (sliding) layers: no block reuse asked
    for model in ("preprocessing", "postprocessing"):
        cfg = parse(repo / model / "config.pbtxt")
        assert cfg.instance_group[0].count == 3 and _params(cfg)["tokenizer_dir"] == "/models/tensorrt_llm/1/tokenizer"
    bls = parse(repo / "tensorrt_llm_bls" / "config.pbtxt")
    assert bls.instance_group[0].count == recipe.max_batch_size
    tok = repo / "tensorrt_llm" / "1" / "tokenizer"
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (tok / f).read_bytes() == (bundle / "checkpoint" / f).read_bytes()
    assert (repo / "tensorrt_llm" / "1" / "engine" / "rank0.engine").is_file()


def _type_name(cfg, dtype: int) -> str:
    return type(cfg).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"] \
        .enum_type.values_by_number[dtype].name


# Frozen copy of the "Mandatory parameters" tables, per model, of the page
# triton-inference-server/tensorrtllm_backend/docs/model_config.md@05ceae03c28c855c8520ba8429659b9d01c5f783: the ${...}
# template variables of
# all_models/inflight_batcher_llm/<model>/config.pbtxt that must be filled for the model to load.
UPSTREAM_MANDATORY = {
    "ensemble": ("triton_max_batch_size", "logits_datatype"),
    "preprocessing": ("triton_max_batch_size", "tokenizer_dir", "preprocessing_instance_count",
                      "max_queue_delay_microseconds", "max_queue_size"),
    "postprocessing": ("triton_max_batch_size", "tokenizer_dir", "postprocessing_instance_count"),
    "tensorrt_llm": ("triton_backend", "triton_max_batch_size", "decoupled_mode", "max_queue_delay_microseconds",
                     "max_queue_size", "engine_dir", "batching_strategy", "encoder_input_features_data_type",
                     "logits_datatype"),
    "tensorrt_llm_bls": ("triton_max_batch_size", "decoupled_mode", "bls_instance_count", "logits_datatype"),
}


def test_exporter_table_is_the_upstream_list():
    assert {m: set(v) for m, v in MANDATORY.items()} == {m: set(v) for m, v in UPSTREAM_MANDATORY.items()}


def test_mandatory_parameters_are_set(repo):
    """tensorrtllm_backend/docs/model_config.md's mandatory names, located in each parsed config independently of the exporter."""
    where = {
        "triton_max_batch_size": lambda c: c.max_batch_size,
        "logits_datatype": lambda c: [_type_name(c, t.data_type) for t in c.output if t.name == "generation_logits"],
        "tokenizer_dir": lambda c: _params(c).get("tokenizer_dir"),
        "max_queue_delay_microseconds": lambda c: c.HasField("dynamic_batching"),
        "max_queue_size": lambda c: c.dynamic_batching.HasField("default_queue_policy"),
        "triton_backend": lambda c: c.backend,
        "decoupled_mode": lambda c: c.HasField("model_transaction_policy"),
        "engine_dir": lambda c: _params(c).get("gpt_model_path"),
        "batching_strategy": lambda c: _params(c).get("gpt_model_type"),
        "encoder_input_features_data_type": lambda c: [t for t in c.input if t.name == "encoder_input_features"],
    }
    for model, names in UPSTREAM_MANDATORY.items():
        cfg = parse(repo / model / "config.pbtxt")
        for name in names:
            got = where[name](cfg) if name in where else cfg.instance_group[0].count  # *_instance_count
            assert got, f"{model}: mandatory {name} not set"
        if "logits_datatype" in names:
            assert where["logits_datatype"](cfg) == ["TYPE_FP32"], model


def test_ensemble_graph_is_wired(repo):
    """Walk the ensemble: every step input is an ensemble input or an earlier step's output (same data type), map
    keys are the step model's tensors, required inputs are fed, every ensemble output is produced."""
    cfgs = {m: parse(repo / m / "config.pbtxt") for m in MODELS}
    ens = cfgs["ensemble"]
    have = {t.name: t.data_type for t in ens.input}
    shape = {t.name: list(t.dims) for t in ens.input}
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocessing", "tensorrt_llm", "postprocessing"]
    for step in ens.ensemble_scheduling.step:
        model = cfgs[step.model_name]
        ins = {t.name: t for t in model.input}
        outs = {t.name: t for t in model.output}
        for key, src in step.input_map.items():
            assert key in ins, f"{step.model_name}: {key} is not an input"
            assert src in have, f"{step.model_name}.{key} <- {src}: not produced before this step"
            assert have[src] == ins[key].data_type, f"{step.model_name}.{key} <- {src}: data type differs"
            assert _dims_fit(shape[src], list(ins[key].dims)), f"{step.model_name}.{key} <- {src}: shapes differ"
        for t in model.input:
            assert t.optional or t.name in step.input_map, f"{step.model_name}: required {t.name} unfed"
        for key, dst in step.output_map.items():
            assert key in outs, f"{step.model_name}: {key} is not an output"
            have[dst], shape[dst] = outs[key].data_type, list(outs[key].dims)
    for t in ens.output:
        assert have.get(t.name) == t.data_type, f"ensemble output {t.name} not produced (or other type)"
        assert _dims_fit(shape[t.name], list(t.dims)), f"ensemble output {t.name}: shape differs"


def _dims_fit(a: list, b: list) -> bool:
    """Same rank, and every dimension equal or variable (-1) on one side: what Triton's ensemble check accepts."""
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def test_round_trip_inspect(repo, bundle, capsys):
    x = inspect_repository(repo)
    assert x["ok"] and x["ensemble_problems"] == [] and x["kubernetes"], x
    assert x["bundle"] == str(bundle.resolve()) and x["tp"] == 1 and x["trtllm_version"] == "1.1.0"
    assert all(r["schema_ok"] and not r["missing"] for r in x["models"].values())
    assert x["triton_image"] == "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
    assert any(f"{x['triton_image']} bash -c" in step for step in x["next"])  # the docker command names it
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export-triton", str(repo), "--inspect", "--json"])
    assert e.value.code == 0 and json.loads(capsys.readouterr().out)["ok"] is True
    with pytest.raises(SystemExit) as e:  # `trt-gemma inspect` knows repositories too
        main(["inspect", str(repo), str(bundle)])
    text = capsys.readouterr().out
    assert e.value.code == 0 and "Triton repository from" in text and "ok: yes" in text and f"{bundle}: bundle" in text


def test_inspect_finds_a_broken_repository(repo, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    cfg = broken / "ensemble" / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('value: "_TOKENS_BATCH"\n', 'value: "_TOKENS"\n', 1))
    trt = broken / "tensorrt_llm" / "config.pbtxt"
    trt.write_text(trt.read_text().replace('backend: "tensorrtllm"', 'backend: "${triton_backend}"'))
    x = inspect_repository(broken)
    assert not x["ok"] and x["models"]["tensorrt_llm"]["placeholders"] == ["${triton_backend}"]
    assert any("_TOKENS" in p for p in x["ensemble_problems"]), x["ensemble_problems"]


def test_inspect_needs_the_engine(repo, tmp_path):
    """Configs alone do not make a servable repository: no rank0.engine is not ok; an unreadable record is typed."""
    import shutil

    from trt_gemma.errors import InputError

    broken = tmp_path / "no-engine"
    shutil.copytree(repo, broken)
    (broken / "tensorrt_llm" / "1" / "engine" / "rank0.engine").unlink()
    x = inspect_repository(broken)
    assert not x["ok"] and "rank0.engine" not in x["engine_files"], x["engine_files"]
    (broken / "trt_gemma_triton.json").write_text("{not json")
    with pytest.raises(InputError, match=r"trt_gemma_triton\.json is not valid JSON"):
        inspect_repository(broken)


def test_streaming_and_tp(bundle, tmp_path):
    fake_engine(bundle, tp=2)
    try:
        r = export_triton(bundle, tmp_path / "tp2", streaming=True)
        trt = parse(tmp_path / "tp2" / "tensorrt_llm" / "config.pbtxt")
        assert trt.model_transaction_policy.decoupled and _params(trt)["gpu_device_ids"] == "0,1" and r.tp == 2
        assert parse(tmp_path / "tp2" / "tensorrt_llm_bls" / "config.pbtxt").model_transaction_policy.decoupled
        assert any("TRTLLM_ORCHESTRATOR=1" in s for s in r.to_dict()["next"])
        with pytest.raises(ConfigError, match="built for tp 2") as e:
            export_triton(bundle, tmp_path / "tp1", tp=1)
        assert "--tp 2" in e.value.fix and not (tmp_path / "tp1").exists()
    finally:
        fake_engine(bundle)


def test_refusals(bundle, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(bundle, bare, ignore=shutil.ignore_patterns("engine"))
    with pytest.raises(InputError, match="no compiled engine") as e:
        export_triton(bare, tmp_path / "o1")
    assert "trt-gemma build --from-bundle" in e.value.fix and "trtllm-build" in e.value.fix
    fake_engine(bundle, version="0.21.0")
    try:
        with pytest.raises(ConfigError, match="TensorRT-LLM 0.21.0") as e:
            export_triton(bundle, tmp_path / "o2")
        assert ">=1.0,<1.3" in e.value.fix
        fake_engine(bundle, version="1.2.0")
        export_triton(bundle, tmp_path / "o3")  # the layout is fine; only the image tag is unknown
        with pytest.raises(ConfigError, match="no Triton TRT-LLM release") as e:
            export_triton(bundle, tmp_path / "o4", k8s=True)
        assert "--triton-image" in e.value.fix and not (tmp_path / "o4").exists()
        r = export_triton(bundle, tmp_path / "o5", k8s=True,
                          triton_image="nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3")
        assert "26.04" in (r.out / "kubernetes.yaml").read_text()
    finally:
        fake_engine(bundle)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        export_triton(bundle, tmp_path / "exists")


def test_cli_export_json_and_errors(bundle, tmp_path, capsys):
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["export-triton", str(bundle), str(tmp_path / "r"), "--json", "--instances", "2"])
    out = json.loads(capsys.readouterr().out)
    assert e.value.code == 0 and out["values"]["preprocessing_instance_count"] == 2
    assert (tmp_path / "r" / EXPORT_MANIFEST).is_file()
    with pytest.raises(SystemExit) as e:
        main(["export-triton", str(bundle), str(tmp_path / "r2"), "--tp", "4"])
    assert e.value.code == ConfigError.exit_code and "fix:" in capsys.readouterr().err


def test_queue_default_matches_our_server():
    serve = pytest.importorskip("trt_gemma.serve.app", reason="the serve extra (fastapi) is not installed")
    from trt_gemma.deploy.triton import DEFAULT_MAX_QUEUE_SIZE

    assert DEFAULT_MAX_QUEUE_SIZE == serve.DEFAULT_MAX_QUEUE


def test_unified_memory_recipe_caps_the_kv_pool(tmp_path):
    """A Jetson recipe caps the KV pool in tokens (unified memory): the cap and its fraction reach the backend."""
    b = tmp_path / "jetson"
    B.build_bundle(None, "jetson-orin-nano-8gb", overrides=["quant=bfloat16", "kv_cache_dtype=auto"], out=b,
                   skip_quality=True, show_progress=False, compile_engine=False)
    fake_engine(b, version="1.0.0")
    recipe = load_recipe(get_target("jetson-orin-nano-8gb"), b / "recipe.toml")
    assert recipe.kv_cache_max_tokens > 0
    export_triton(b, tmp_path / "repo")
    p = _params(parse(tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt"))
    assert int(p["max_tokens_in_paged_kv_cache"]) == recipe.kv_cache_max_tokens
    assert float(p["kv_cache_free_gpu_mem_fraction"]) == recipe.kv_cache_free_gpu_memory_fraction


def test_exported_kubernetes_file_validates(repo):
    """The kubernetes.yaml export-triton wrote (not a fresh call): Kubernetes' schemas accept it, and it serves
    this repository (claim mounted at the configs' paths, the engine's tp in GPUs, the pinned image)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    docs = [d for d in yaml.safe_load_all((repo / "kubernetes.yaml").read_text()) if d]
    for d in docs:
        kv.validate(d, "1.30.0", strict=True)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert dep["metadata"]["name"] == "triton-gemma2-pydoc-tiny"
    assert c["image"] == "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3" and c["resources"]["limits"][
        "nvidia.com/gpu"] == 1
    assert "--model-repository=/models" in c["command"] and c["volumeMounts"][0]["mountPath"] == "/models"
