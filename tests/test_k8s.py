"""Kubernetes manifests of export-triton --k8s and serve --print-k8s, validated against the Kubernetes OpenAPI
schemas by kubernetes-validate (its strict schemas reject unknown fields), plus the settings the issue asks for:
GPU requests = tp, readiness on the health endpoint, Prometheus annotations on the metrics port, the model from a
volume, the image pinned to the engine's TensorRT-LLM."""
from __future__ import annotations

import pytest

from trt_gemma.errors import ConfigError
from trt_gemma.deploy.k8s import (GPU, TRITON_TRTLLM_RELEASES, dump_yaml, print_serve_manifests, serve_manifests,
                           triton_image_for, triton_manifests)

K8S_VERSIONS = ("1.30.0", "1.34.0")  # a few minor releases apart: the manifests use only stable fields


def validate(docs: list[dict]) -> None:
    kv = pytest.importorskip("kubernetes_validate",
                             reason="the Kubernetes schemas ship with kubernetes-validate: pip install '.[dev]'")
    for version in K8S_VERSIONS:
        for doc in docs:
            kv.validate(doc, version, strict=True)


def _by_kind(docs: list[dict]) -> dict:
    return {d["kind"]: d for d in docs}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_triton_manifests_validate(tp):
    image = triton_image_for("1.1.0")
    docs = triton_manifests("triton-gemma", image, tp, "/models", repo_bytes=5 * 2**30)
    validate(docs)
    k = _by_kind(docs)
    pod = k["Deployment"]["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert c["image"] == "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
    assert c["resources"]["limits"][GPU] == tp == c["resources"]["requests"][GPU]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8002"
    assert {p["containerPort"] for p in c["ports"]} == {8000, 8001, 8002}
    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/models"}
    claim = pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == k["PersistentVolumeClaim"]["metadata"]["name"]
    assert k["PersistentVolumeClaim"]["spec"]["resources"]["requests"]["storage"] == "7Gi"  # 5 GiB x 1.25, rounded up
    assert any(e["name"] == "TRTLLM_ORCHESTRATOR" for e in c["env"]) == (tp > 1)
    assert (c["command"][:4] == ["mpirun", "--allow-run-as-root", "-n", "1"]) == (tp > 1)
    assert f"--cuda-memory-pool-byte-size={tp - 1}:0" in c["command"] or tp == 1
    assert k["Service"]["spec"]["selector"] == k["Deployment"]["spec"]["selector"]["matchLabels"]
    init = pod["spec"]["initContainers"][0]
    assert "cp -rn /app/all_models/inflight_batcher_llm" in init["command"][-1]
    # the Python models' code lands in emptyDirs mounted over the read-only repository's <model>/1 directories
    over = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    staged = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert set(staged) == set(over) - {"model-repository", "dshm"} and len(staged) == 3
    for vol, path in staged.items():
        assert path.replace("/staging", "/models") == over[vol] and over[vol].endswith("/1")
    assert c["volumeMounts"][0]["readOnly"] and pod["spec"]["volumes"][0]["persistentVolumeClaim"]["readOnly"]


def test_serve_manifests_validate():
    docs = serve_manifests("bundles/b/engine", args=["--max-queue", "16"], api_key=True)
    validate(docs)
    pod = _by_kind(docs)["Deployment"]["spec"]["template"]
    assert pod["spec"]["runtimeClassName"] == "nvidia"
    c = pod["spec"]["containers"][0]
    assert c["command"][:3] == ["trt-gemma", "serve", "/models/engine"] and c["resources"]["limits"][GPU] == 1
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "8000"
    assert c["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "trt-gemma-api-key"


def test_validator_is_strict():
    """The check can fail: a misspelt field and a wrong type are rejected."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    docs = triton_manifests("t", triton_image_for("1.0.0"), 1, "/models", repo_bytes=1)
    bad = _by_kind(docs)["Deployment"]
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSIONS[0], strict=True)
    svc = _by_kind(docs)["Service"]
    svc["spec"]["ports"][0]["port"] = "eight thousand"
    with pytest.raises(kv.ValidationError):
        kv.validate(svc, K8S_VERSIONS[0], strict=True)


def test_image_table_and_unknown_versions():
    assert triton_image_for("1.0.0").endswith(":25.09-trtllm-python-py3")
    assert triton_image_for("1.1.0rc5").endswith(":25.12-trtllm-python-py3")
    assert set(TRITON_TRTLLM_RELEASES) == {(1, 0), (1, 1)}
    for v in ("1.2.0", "0.21.0", ""):
        with pytest.raises(ConfigError, match="no Triton TRT-LLM release") as e:
            triton_image_for(v)
        assert "--triton-image" in e.value.fix


def test_yaml_round_trip_and_cli(capsys):
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    docs = triton_manifests("t", triton_image_for("1.0.0"), 2, "/models", repo_bytes=1)
    text = dump_yaml(docs)
    assert "&id" not in text and list(yaml.safe_load_all(text)) == docs
    printed = print_serve_manifests(None, 8000, ["--max-queue", "16", "--model-name", "gemma"], api_key=False)
    loaded = [d for d in yaml.safe_load_all(printed) if d]
    validate(loaded)
    assert _by_kind(loaded)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"][2] == "--host"
    pytest.importorskip("fastapi", reason="trt-gemma serve needs the serve extra")
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--print-k8s", "--port", "9000"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and _by_kind([d for d in yaml.safe_load_all(out) if d])["Service"]["spec"]["ports"][0][
        "port"] == 9000


def test_serve_image_is_the_tag_dockerfile_jetson_builds():
    """The default image of `serve --print-k8s` is one that Dockerfile.jetson's header tells the user to build."""
    import re
    from pathlib import Path

    from trt_gemma.deploy.k8s import SERVE_IMAGE

    header = (Path(__file__).resolve().parents[1] / "Dockerfile.jetson").read_text()
    tags = re.findall(r"docker build .*?-t (\S+)", header)
    assert SERVE_IMAGE in tags, (SERVE_IMAGE, tags)


# ---- serve --print-k8s keeps what the server runs with --------------------------------------------------------------

def _printed(capsys, args: list[str]) -> tuple[str, list[dict]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    pytest.importorskip("fastapi", reason="trt-gemma serve needs the serve extra")
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--print-k8s", *args])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    docs = [d for d in yaml.safe_load_all(out) if d]
    validate(docs)
    return out, docs


def _non_default(p, tmp_path):
    """A value for option `p` that differs from its default, from its type alone (so a new option is covered)."""
    import click

    if p.is_flag:  # a plain flag: on; --x/--no-x (default None: decided at run time): off
        return not p.secondary_opts
    t = p.type
    if isinstance(t, click.Choice):
        return next(c for c in t.choices if c != p.default)
    if isinstance(t, click.Path):
        f = tmp_path / f"{p.name}.toml"
        f.write_text("[thresholds]\n")
        return str(f)
    if isinstance(t, (click.IntRange,)) or t is click.INT:
        return (p.default or 0) + 3
    if isinstance(t, (click.FloatRange,)) or t is click.FLOAT:
        return (p.default or 0) + 1.5
    return f"x-{p.name.replace('_', '-')}"


def test_print_k8s_carries_every_serve_option(capsys, tmp_path):
    """Every `serve` option except NOT_CARRIED, given a non-default value, comes back with that value when the
    Deployment's command is parsed by `serve` itself; paths come back under the models volume."""
    import click

    from trt_gemma.commands.serve import IN_VOLUME, NOT_CARRIED, serve

    given: dict = {}
    argv: list[str] = []
    for p in serve.params:
        if not isinstance(p, click.Option) or p.name in NOT_CARRIED:
            continue
        v = given[p.name] = _non_default(p, tmp_path)
        if p.is_flag:
            argv.append(p.opts[0] if v else p.secondary_opts[0])
        else:
            argv += [p.opts[0], str(v)]
    out, docs = _printed(capsys, argv)
    cmd = _by_kind(docs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["trt-gemma", "serve"]
    parsed = serve.make_context("serve", cmd[2:]).params
    for name, v in given.items():
        want = f"/models/{tmp_path.joinpath(v).name}" if name in IN_VOLUME and tmp_path.joinpath(v).exists() else v
        assert parsed[name] == want, (name, parsed[name], want)
    assert parsed["host"] == "0.0.0.0" and parsed["insecure_no_auth"] is True  # no key given
    assert "--insecure-no-auth" in out.split("---")[0], "the header must say why the server runs without a key"
    assert set(NOT_CARRIED) <= {p.name for p in serve.params}, "NOT_CARRIED names an option serve no longer has"


def test_print_k8s_puts_the_key_in_a_secret_by_reference(capsys, tmp_path, monkeypatch):
    key = "s3cret-key-value-123"
    (tmp_path / "key").write_text(key + "\n")
    for how in (["--api-key-file", str(tmp_path / "key")], ["--api-key", key]):
        out, docs = _printed(capsys, [*how, "--guard", "default", "--metrics-auth"])
        assert key not in out, "the key's value leaked into the manifest"
        k = _by_kind(docs)
        c = k["Deployment"]["spec"]["template"]["spec"]["containers"][0]
        ref = c["env"][0]["valueFrom"]["secretKeyRef"]
        assert c["env"][0]["name"] == "TRT_GEMMA_API_KEY" and ref == {"name": "trt-gemma-api-key", "key": "api-key"}
        assert k["Secret"]["metadata"]["name"] == ref["name"] and "data" not in k["Secret"]  # a placeholder
        assert "kubectl create secret generic trt-gemma-api-key --from-file=api-key=" in out
        assert "--insecure-no-auth" not in c["command"]
        assert {"--guard", "default", "--metrics-auth"} <= set(c["command"])
    monkeypatch.setenv("TRT_GEMMA_API_KEY", key)
    out, docs = _printed(capsys, [])
    assert key not in out and "Secret" in _by_kind(docs)


def test_serve_refuses_a_network_host_without_a_key(capsys, monkeypatch):
    pytest.importorskip("fastapi", reason="trt-gemma serve needs the serve extra")
    from trt_gemma.cli import main
    from trt_gemma.commands.serve import require_auth
    from trt_gemma.errors import ConfigError

    monkeypatch.delenv("TRT_GEMMA_API_KEY", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["serve", "--host", "0.0.0.0", "--port", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--insecure-no-auth" in err, err
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ConfigError, match="no API key"):
            require_auth(host, None, False)
        require_auth(host, "k", False)
        require_auth(host, None, True)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        require_auth(host, None, False)


def test_triton_manifest_says_it_has_no_auth():
    from trt_gemma.deploy.k8s import TRITON_AUTH_NOTE

    assert "no authentication" in TRITON_AUTH_NOTE and TRITON_AUTH_NOTE.startswith("#")
