"""Kubernetes manifests: Triton + TensorRT-LLM for a fleet (`export-triton --k8s`), our own server for one GPU or
one Jetson (`trt-gemma serve --print-k8s`). Plain Deployment + Service (+ the PersistentVolumeClaim holding the
model), validated in the tests against the Kubernetes OpenAPI schemas (kubernetes-validate, strict).

Triton image: `nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3`, pinned to the release whose TensorRT-LLM built
the engine (an engine only loads in the TensorRT-LLM version that built it). The table comes from the release branches
of triton-inference-server/tensorrtllm_backend, whose Dockerfile pins the TensorRT-LLM each Triton release ships:
  commit aec51d9 "Update default branches post-25.09": TENSORRTLLM_VER=1.0.0 (submodule NVIDIA/TensorRT-LLM v1.0.0)
  commit 49aba4a "Update default branch post-25.12":   TENSORRTLLM_VER=1.1.0
  (dockerfile/Dockerfile.triton.trt_llm_backend; the README's container list: catalog.ngc.nvidia.com tritonserver tags)
TensorRT-LLM 1.2 appears there only after those releases (commit 9e828d3, 1.2.0rc8), with no release named: pass
--triton-image for it, checked against NVIDIA's release notes (docs.nvidia.com/deeplearning/triton-inference-server).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from trt_gemma.errors import ConfigError

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:{tag}-trtllm-python-py3"
TRITON_TRTLLM_RELEASES = {(1, 0): "25.09", (1, 1): "25.12"}  # (TensorRT-LLM major, minor) -> Triton release
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002  # tritonserver defaults (launch_triton_server.py)
SERVE_IMAGE = "trt-gemma:jp6"  # the JetPack 6 (Orin) tag Dockerfile.jetson's header builds
SHM_SIZE = "2Gi"  # the Python backend moves tensors through /dev/shm; the backend README runs --shm-size=2g
MODEL_MOUNT = "/models"
GPU = "nvidia.com/gpu"  # extended resource advertised by the NVIDIA device plugin (k8s-device-plugin)
# The Python models' code ships in the Triton TRT-LLM container (tensorrtllm_backend README: `cp -r
# /app/all_models/inflight_batcher_llm/* ...`); -n keeps our config.pbtxt files.
PY_MODELS = ("preprocessing", "postprocessing", "tensorrt_llm_bls")


def triton_image_for(trtllm_version: str) -> str:
    m = re.match(r"^(\d+)\.(\d+)", trtllm_version or "")
    tag = TRITON_TRTLLM_RELEASES.get((int(m.group(1)), int(m.group(2)))) if m else None
    if tag is None:
        known = ", ".join(f"{a}.{b} -> {t}" for (a, b), t in TRITON_TRTLLM_RELEASES.items())
        raise ConfigError(f"no Triton TRT-LLM release is known to ship TensorRT-LLM {trtllm_version} ({known})",
                          fix="pass --triton-image nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 for a release "
                              f"whose notes list TensorRT-LLM {trtllm_version}, or recompile with TensorRT-LLM 1.0/1.1")
    return TRITON_IMAGE.format(tag=tag)


def copy_model_py_script(repo_path: str) -> str:
    return (f"for m in {' '.join(PY_MODELS)}; do cp -rn /app/all_models/inflight_batcher_llm/$m/1/. "
            f"{repo_path}/$m/1/; done")


def triton_command(tp: int, repo_path: str) -> list[str]:
    """tritonserver as NVIDIA's launch_triton_server.py starts it (NVIDIA/TensorRT-LLM triton_backend/scripts), in the
    foreground (that script Popen()s and returns, which would end a container). tp = 1: its --no-mpi single-instance
    form. tp > 1: its --multi-model form, orchestrator mode: `mpirun -n 1` around one tritonserver, env
    TRTLLM_ORCHESTRATOR=1 (the backend spawns one worker per GPU of gpu_device_ids), and the memory-pool flags the
    script adds for that mode."""
    cmd = ["mpirun", "--allow-run-as-root", "-n", "1"] if tp > 1 else []
    cmd += ["tritonserver", f"--model-repository={repo_path}", f"--http-port={HTTP_PORT}",
           f"--grpc-port={GRPC_PORT}", f"--metrics-port={METRICS_PORT}", "--disable-auto-complete-config",
           "--backend-config=python,shm-region-prefix-name=prefix0_"]
    if tp > 1:
        cmd += ["--pinned-memory-pool-byte-size=0", "--enable-peer-access=false"]
        cmd += [f"--cuda-memory-pool-byte-size={j}:0" for j in range(tp)]
    return cmd


def _labels(name: str, component: str) -> dict:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": "trt-gemma"}


def _storage(nbytes: int) -> str:
    """Claim size: the files plus 25 %, in whole GiB (at least 1)."""
    return f"{max(1, math.ceil(nbytes * 1.25 / 2**30))}Gi"


def _pvc(name: str, labels: dict, nbytes: int) -> dict:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "labels": labels},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": _storage(nbytes)}}}}


def _service(name: str, labels: dict, ports: list[tuple[str, int]]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
            "spec": {"type": "ClusterIP", "selector": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]},
                     "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in ports]}}


def _deployment(name: str, labels: dict, pod_spec: dict, metrics_port: int) -> dict:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": 1, "strategy": {"type": "Recreate"},  # the GPUs and an RWO volume: no overlap
                     "selector": {"matchLabels": {"app.kubernetes.io/name": labels["app.kubernetes.io/name"]}},
                     "template": {"metadata": {"labels": labels, "annotations": {
                         "prometheus.io/scrape": "true", "prometheus.io/port": str(metrics_port),
                         "prometheus.io/path": "/metrics"}}, "spec": pod_spec}}}


def _probe(path: str, port: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures}


def triton_manifests(name: str, image: str, tp: int, repo_path: str, repo_bytes: int) -> list[dict]:
    """PVC (the model repository), Deployment (Triton with `tp` GPUs), Service (HTTP, gRPC, metrics)."""
    labels = _labels(name, "triton")
    claim = f"{name}-model-repository"
    # The repository is mounted read-only; each Python model's 1/ is an emptyDir mounted over it, filled by the
    # init container from the image (so the claim can be shared read-only by several pods).
    code = [(f"code-{m.replace('_', '-')}", m) for m in PY_MODELS]
    mounts = ([{"name": "model-repository", "mountPath": repo_path, "readOnly": True},
               {"name": "dshm", "mountPath": "/dev/shm"}]
              + [{"name": v, "mountPath": f"{repo_path}/{m}/1"} for v, m in code])
    env = [{"name": "TRTLLM_ORCHESTRATOR", "value": "1"},
           {"name": "TRTLLM_ORCHESTRATOR_SPAWN_PROCESSES", "value": "1"}] if tp > 1 else []
    container = {
        "name": "triton", "image": image, "command": triton_command(tp, repo_path), "env": env,
        "ports": [{"name": "http", "containerPort": HTTP_PORT}, {"name": "grpc", "containerPort": GRPC_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        "resources": {"requests": {GPU: tp}, "limits": {GPU: tp}},
        # engines take minutes to load: the startup probe holds liveness off for up to 30 min
        "startupProbe": _probe("/v2/health/ready", "http", 10, 180),
        "readinessProbe": _probe("/v2/health/ready", "http", 10, 3),
        "livenessProbe": _probe("/v2/health/live", "http", 20, 3),
        "volumeMounts": mounts,
    }
    init = {"name": "backend-python-models", "image": image,
            "command": ["bash", "-c", copy_model_py_script("/staging")],
            "volumeMounts": [{"name": v, "mountPath": f"/staging/{m}/1"} for v, m in code]}
    pod = {"initContainers": [init], "containers": [container],
           "volumes": [{"name": "model-repository", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
                       {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}}]
           + [{"name": v, "emptyDir": {}} for v, _ in code]}
    return [_pvc(claim, labels, repo_bytes), _deployment(name, labels, pod, METRICS_PORT),
            _service(name, labels, [("http", HTTP_PORT), ("grpc", GRPC_PORT), ("metrics", METRICS_PORT)])]


API_KEY_SECRET_KEY = "api-key"  # the key inside the Secret


def api_key_secret(name: str) -> str:
    return f"{name}-api-key"


def serve_manifests(model: str | None, name: str = "trt-gemma", port: int = 8000, image: str = SERVE_IMAGE,
                    args: list[str] | None = None, api_key: bool = False, model_bytes: int = 0) -> list[dict]:
    """Our OpenAI server on one GPU (a Jetson or a workstation node): NVIDIA device plugin GPU, the `nvidia`
    RuntimeClass (Jetson's driver stack comes in through the NVIDIA container runtime, as `--runtime nvidia` does
    for Dockerfile.jetson), /health for readiness (503 while loading), /metrics on the same port.
    The pod listens on 0.0.0.0: with `api_key` the key comes from a Secret (`secretKeyRef`; a placeholder Secret
    without data is part of the output, filled with `kubectl create secret`), without it the server must be told
    `--insecure-no-auth` or it refuses to start."""
    labels = _labels(name, "server")
    claim = f"{name}-models"
    cmd = ["trt-gemma", "serve"] + ([f"{MODEL_MOUNT}/{Path(model.rstrip('/')).name}"] if model else [])
    cmd += ["--host", "0.0.0.0", "--port", str(port)] + list(args or [])
    if not api_key and "--insecure-no-auth" not in cmd:
        cmd.append("--insecure-no-auth")
    ref = {"secretKeyRef": {"name": api_key_secret(name), "key": API_KEY_SECRET_KEY}}
    env = [{"name": "TRT_GEMMA_API_KEY", "valueFrom": ref}] if api_key else []
    container = {"name": "server", "image": image, "command": cmd, "env": env,
                 "ports": [{"name": "http", "containerPort": port}],
                 "resources": {"requests": {GPU: 1}, "limits": {GPU: 1}},
                 "startupProbe": _probe("/health", "http", 10, 90),
                 "readinessProbe": _probe("/health", "http", 10, 3),
                 "livenessProbe": _probe("/health", "http", 20, 3),
                 "volumeMounts": [{"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True}]}
    pod = {"runtimeClassName": "nvidia", "containers": [container],
           "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": claim}}]}
    # The placeholder has no `data`: `kubectl apply` leaves the key that `kubectl create secret` put there alone
    secret = [{"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": api_key_secret(name), "labels": labels}}] if api_key else []
    return [*secret, _pvc(claim, labels, model_bytes), _deployment(name, labels, pod, port),
            _service(name, labels, [("http", port)])]


def dump_yaml(docs: list[dict]) -> str:
    """Multi-document YAML (PyYAML when installed; otherwise JSON documents, which are YAML too)."""
    try:
        import yaml
    except ImportError:
        return "".join("---\n" + json.dumps(d, indent=2) + "\n" for d in docs)
    class _Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data):  # shared label dicts written out in full, not as &anchors
            return True

    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, explicit_start=True)


def print_serve_manifests(model: str | None, port: int, args: list[str], api_key: bool,
                          files: list[str] = (), name: str = "trt-gemma") -> str:
    """The text `trt-gemma serve --print-k8s` prints: the server with the flags `args` the user passed
    (commands/serve.py derives them from its own options), the key by reference, and comments saying what to do."""
    from trt_gemma.manifest import dir_bytes

    size = dir_bytes(Path(model)) if model and Path(model).is_dir() else 0
    lines = ["# trt-gemma serve on Kubernetes: copy the model into the PVC, then kubectl apply -f this file."]
    if files:
        lines.append(f"# Also copy into the PVC (the flags below read them from {MODEL_MOUNT}): {', '.join(files)}")
    if api_key:
        lines += [f"# API key: the server reads it from the Secret {api_key_secret(name)} (key {API_KEY_SECRET_KEY}); "
                  "the Secret below is a placeholder without data.",
                  "# Fill it before the first apply (the key never appears in this file):",
                  f"#   kubectl create secret generic {api_key_secret(name)} "
                  f"--from-file={API_KEY_SECRET_KEY}=PATH_TO_KEY_FILE"]
    else:
        lines += ["# No API key was given: the server runs with --insecure-no-auth and answers anyone who can reach",
                  "# the Service. Print this again with --api-key-file KEYFILE to require a key (kept in a Secret)."]
    docs = serve_manifests(model, name=name, port=port, args=args, api_key=api_key, model_bytes=size)
    return "\n".join(lines) + "\n" + dump_yaml(docs)


TRITON_AUTH_NOTE = ("# Triton's HTTP and gRPC endpoints have no authentication: the Service is ClusterIP (reachable\n"
                    "# inside the cluster only). Expose it through an ingress or proxy that checks credentials.\n")
