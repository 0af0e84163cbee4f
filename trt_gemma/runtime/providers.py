"""onnxruntime execution providers for `--device cpu | cuda | tensorrt`, and their options.

- cuda: the CUDA EP (onnxruntime-gpu). Tensors that stay on the GPU between steps (the KV pool) are OrtValues on
  the device (`OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", 0)`) bound with IO binding, so only ids
  and the last logits row cross to the host (onnxruntime docs, "Python API", IOBinding / OrtValue).
- tensorrt: the TensorRT EP, with the CUDA EP behind it for any node TensorRT does not take. Its optimization profiles
  are the ones `build --engine tensorrt` uses (engine/profiles.py: prefill and decode from the recipe's limits),
  passed as `trt_profile_{min,opt,max}_shapes` ("name:d0xd1,..." with an input repeated once per profile;
  microsoft/onnxruntime PR #15546, docs/execution-providers/TensorRT-ExecutionProvider.md), and its engine and timing
  caches are kept beside the graph (`trt_engine_cache_path`, `trt_timing_cache_path`), so a bundle's second start
  loads the engine instead of building it.
onnxruntime-gpu: `pip install onnxruntime-gpu` on x86-64; on a Jetson the wheel of the Jetson AI Lab index for the
installed JetPack (docs/jetson.md names it), built with the TensorRT EP.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trt_gemma.errors import ConfigError, DependencyError, InputError, OutputError

DEVICES = ("cpu", "cuda", "tensorrt")
EP_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
ORT_GPU_INSTALL = ("pip uninstall -y onnxruntime && pip install onnxruntime-gpu (x86-64); on a Jetson, the "
                   "onnxruntime-gpu wheel for your JetPack from the Jetson AI Lab index (docs/jetson.md)")
TRT_EP_CACHE = "ort_tensorrt_cache"  # beside the graph: BUNDLE/onnx/ort_tensorrt_cache/ for a bundle's graph


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # cpu | cuda | tensorrt
    providers: tuple  # onnxruntime's `providers=` argument: (name, options) pairs, best first
    ort_device: str  # where step tensors live for IO binding ("cpu" or "cuda")


def shape_option(profiles: dict, which: int) -> str:
    """trt_profile_*_shapes from {profile: {input: (min, opt, max)}}: `which` picks min (0), opt (1) or max (2); an
    input appears once per profile, in profile order."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shapes[which])}"
                    for prof in profiles.values() for name, shapes in prof.items())


def tensorrt_options(profiles: dict, cache_dir: Path, device_id: int = 0) -> dict:
    cache = str(cache_dir)
    return {"device_id": str(device_id), "trt_engine_cache_enable": "True", "trt_engine_cache_path": cache,
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": cache,
            "trt_profile_min_shapes": shape_option(profiles, 0), "trt_profile_opt_shapes": shape_option(profiles, 1),
            "trt_profile_max_shapes": shape_option(profiles, 2)}


def choose(device: str, graph: Path | None = None, limits=None, available: list[str] | None = None,
           device_id: int = 0) -> DeviceChoice:
    """The providers for `device`; `graph` (the .onnx file) and `limits` (engine.profiles.Limits) size the TensorRT
    EP's profiles. A device whose EP this onnxruntime lacks is a DependencyError with the install line."""
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {', '.join(DEVICES)}", fix="use --device cpu")
    if available is None:
        import onnxruntime

        available = list(onnxruntime.get_available_providers())
    if EP_NAMES[device] not in available:
        raise DependencyError(f"--device {device} needs onnxruntime's {EP_NAMES[device]}, and this onnxruntime has "
                              f"{', '.join(available)}", fix=ORT_GPU_INSTALL)
    cpu = ("CPUExecutionProvider", {})
    if device == "cpu":
        return DeviceChoice("cpu", (cpu,), "cpu")
    cuda = ("CUDAExecutionProvider", {"device_id": str(device_id)})
    if device == "cuda":
        return DeviceChoice("cuda", (cuda, cpu), "cuda")
    if graph is None or limits is None:
        raise ConfigError("--device tensorrt needs the graph and the recipe's limits to size its profiles",
                          fix="serve a bundle or an export dir")
    from trt_gemma.engine.profiles import graph_inputs, profiles

    cache = Path(graph).parent / TRT_EP_CACHE
    try:
        cache.mkdir(exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the TensorRT EP's engine cache {cache}: {e.strerror}",
                          fix="make the bundle (or export dir) writable for the server's user") from None
    opts = tensorrt_options(profiles(graph_inputs(graph), limits), cache, device_id)
    return DeviceChoice("tensorrt", (("TensorrtExecutionProvider", opts), cuda, cpu), "cuda")


def for_export(device: str, export_dir: Path, slots: int = 1, limits=None) -> DeviceChoice:
    """`choose` for a `trt-gemma export-onnx` dir: the graph file from its manifest; `limits` (a bundle's recipe,
    `bundle_limits`) or else its max_seq_len and the server's slots (a whole prompt may be one prefill step)."""
    from trt_gemma.engine.profiles import Limits
    from trt_gemma.onnx.export import read_manifest

    man = read_manifest(Path(export_dir))
    seq = int(man["model"]["max_seq_len"])
    return choose(device, Path(export_dir) / man["model_file"], limits or Limits(max(1, slots), seq, seq))


def bundle_limits(bundle: Path):
    """The profile limits in a bundle's resolved recipe.toml: what `build --engine tensorrt` built its engine's
    profiles from. Read as plain TOML (the file is flat and resolved; the recipe layer sits above the runtime)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6)
        import tomli as tomllib

    from trt_gemma.engine.profiles import Limits
    from trt_gemma.safe_io import read_toml

    path = Path(bundle) / "recipe.toml"
    try:
        r = read_toml(path, bundle, fix="rebuild the bundle with `trt-gemma build`")
        return Limits(int(r["max_batch_size"]), int(r["max_input_len"]), int(r["max_seq_len"]),
                      r.get("max_num_tokens"))
    except (OSError, tomllib.TOMLDecodeError, KeyError) as e:
        raise InputError(f"{path} does not give the bundle's limits ({type(e).__name__}: {e})",
                         fix="rebuild the bundle with `trt-gemma build`") from None
