"""Detection from fixture filesystem trees built from real Jetson device-tree strings
(docs/facts/targets.md §2-3, docs/facts/jetson.md §1),
from injected NVML answers, and from this host's real (absent) NVML library."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trt_gemma.detect import GpuInfo, NvmlUnavailable, detect, nvml_gpus, parse_l4t

GB = 1024**3


def jetson_tree(root: Path, model: str, compatible: str, release: str | None, memtotal_kb: int | None) -> Path:
    dt = root / "proc" / "device-tree"
    dt.mkdir(parents=True)
    (dt / "model").write_bytes(model.encode() + b"\0")  # device-tree strings are NUL-terminated
    (dt / "compatible").write_bytes(compatible.encode())
    if release is not None:
        (root / "etc").mkdir()
        (root / "etc" / "nv_tegra_release").write_text(release + "\n")
    if memtotal_kb is not None:
        (root / "proc" / "meminfo").write_text(f"MemTotal:       {memtotal_kb} kB\nMemFree:         123456 kB\n")
    return root


def no_nvml():
    raise NvmlUnavailable("NVML unavailable: NVMLError_LibraryNotFound: NVML Shared Library Not Found")


def nvml_returning(*gpus):
    return lambda: list(gpus)


ORIN_NANO_SUPER = dict(
    model="NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super",
    compatible="nvidia,p3768-0000+p3767-0005-super\0nvidia,p3767-0005\0nvidia,tegra234\0",
    release="# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 "
            "01:49:37 UTC 2025",
    memtotal_kb=7802916)


def test_orin_nano_super_devkit(tmp_path):
    d = detect(jetson_tree(tmp_path, **ORIN_NANO_SUPER), nvml=no_nvml)
    assert (d.kind, d.sm, d.target, d.approximate) == ("jetson", 87, "jetson-orin-nano-super", False)
    assert (d.l4t, d.jetpack) == ("36.4.3", "6.2")
    assert d.name == ORIN_NANO_SUPER["model"]
    assert d.memory_bytes == 7802916 * 1024
    assert d.evidence["compatible"] == ["nvidia,p3768-0000+p3767-0005-super", "nvidia,p3767-0005", "nvidia,tegra234"]
    assert "p3767-0005-super" in d.why


def test_orin_nano_8gb_module_without_super(tmp_path):
    d = detect(jetson_tree(tmp_path, "NVIDIA Jetson Orin Nano Developer Kit",
                           "nvidia,p3768-0000+p3767-0003\0nvidia,p3767-0003\0nvidia,tegra234\0",
                           "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic, EABI: aarch64, DATE: x",
                           7802916), nvml=no_nvml)
    assert (d.target, d.l4t, d.jetpack, d.approximate) == ("jetson-orin-nano-8gb", "36.3.0", "6.0", False)


def test_agx_orin_64gb_jetpack5(tmp_path):
    d = detect(jetson_tree(tmp_path, "Jetson AGX Orin Developer Kit",
                           "nvidia,p3737-0000+p3701-0005\0nvidia,p3701-0005\0nvidia,tegra234\0",
                           "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: x",
                           64324756), nvml=no_nvml)
    assert (d.target, d.sm, d.l4t, d.jetpack) == ("jetson-agx-orin-64gb", 87, "35.4.1", "5.1.2")


def test_thor_devkit_with_partial_nvml(tmp_path):
    # Thor's NVML answers "NVIDIA Thor" but the device tree (p3834 / tegra264) decides.
    tree = jetson_tree(tmp_path, "NVIDIA Jetson AGX Thor Developer Kit",
                       "nvidia,p3834-0008\0nvidia,tegra264\0",
                       "# R38 (release), REVISION: 2.0, GCID: 41844464, BOARD: generic, EABI: aarch64, DATE: x",
                       None)
    d = detect(tree, nvml=nvml_returning(GpuInfo("NVIDIA Thor", 110, 0)))
    assert (d.kind, d.target, d.sm, d.l4t, d.jetpack) == ("jetson", "jetson-thor", 110, "38.2.0", "7.0")
    assert d.memory_bytes is None and d.gpu_count == 1
    assert d.evidence["nvml"][0]["name"] == "NVIDIA Thor"


def test_unknown_orin_module_is_approximate_by_memory(tmp_path):
    d = detect(jetson_tree(tmp_path, "Some Orin carrier", "acme,board\0nvidia,p3767-0099\0nvidia,tegra234\0",
                           None, 16 * 1024 * 1024 * 93 // 100), nvml=no_nvml)
    assert d.kind == "jetson" and d.approximate
    assert d.target == "jetson-orin-nx-16gb" and d.l4t is None
    assert "unknown module" in d.why


def test_xavier_is_reported_not_matched(tmp_path):
    d = detect(jetson_tree(tmp_path, "Jetson Xavier NX", "nvidia,p3668-0001\0nvidia,tegra194\0",
                           "# R32 (release), REVISION: 7.4, GCID: 1, BOARD: t186ref, EABI: aarch64, DATE: x",
                           7_000_000), nvml=no_nvml)
    assert d.kind == "jetson" and d.target is None and d.sm == 72 and d.approximate
    assert "tegra194" in d.why


def test_non_tegra_device_tree_is_not_jetson(tmp_path):
    dt = tmp_path / "proc" / "device-tree"
    dt.mkdir(parents=True)
    (dt / "compatible").write_bytes(b"raspberrypi,4-model-b\0brcm,bcm2711\0")
    d = detect(tmp_path, nvml=no_nvml)
    assert d.kind == "none" and "no NVIDIA GPU" in d.message


@pytest.mark.parametrize("gpu,target,approx", [
    (GpuInfo("NVIDIA H100 80GB HBM3", 90, 85_520_809_984), "h100", False),
    (GpuInfo("NVIDIA A100-SXM4-40GB", 80, 42_505_273_344), "a100-40gb", False),
    (GpuInfo("NVIDIA A100 80GB PCIe", 80, 85_899_345_920), "a100-80gb", False),
    (GpuInfo("NVIDIA A10", 86, 24_146_608_128), "a10", False),  # not A100: word-boundary alias match
    (GpuInfo("Tesla T4", 75, 16_106_127_360), "t4", False),
    (GpuInfo("NVIDIA GeForce RTX 4090", 89, 25_757_220_864), "rtx-4090", False),
    (GpuInfo("NVIDIA RTX 6000 Ada Generation", 89, 51_527_024_640), "rtx-6000-ada", False),
    (GpuInfo("NVIDIA L40S", 89, 48_305_799_168), "rtx-6000-ada", True),  # same SM, closest memory
    (GpuInfo("NVIDIA GeForce RTX 3060", 86, 8 * GB), "rtx-3060-12gb", True),  # the 8 GB variant: memory differs
    (GpuInfo("NVIDIA Future GPU", 130, 200 * GB), "rtx-pro-6000-blackwell", True),  # closest lower SM (12.0)
])
def test_dgpu_matching(gpu, target, approx):
    d = detect(Path("/nonexistent-root"), nvml=nvml_returning(gpu))
    assert (d.kind, d.target, d.approximate) == ("dgpu", target, approx), d.why
    assert d.sm == gpu.sm and d.memory_bytes == gpu.memory_bytes
    if approx:
        assert "(approximate match)" in d.message


def test_multi_gpu_plans_for_gpu0(tmp_path):
    d = detect(tmp_path, nvml=nvml_returning(GpuInfo("NVIDIA H200", 90, 150 * GB), GpuInfo("NVIDIA H200", 90, 150 * GB)))
    assert d.target == "h200" and d.gpu_count == 2 and "GPU 0" in d.why


def test_broken_nvml_binding_does_not_raise(tmp_path):
    def broken():
        raise RuntimeError("driver/library version mismatch")
    d = detect(tmp_path, nvml=broken)
    assert d.kind == "none" and "RuntimeError" in d.why


def test_parse_l4t():
    assert parse_l4t("# R39 (release), REVISION: 1.0, GCID: 1") == "39.1.0"
    assert parse_l4t("garbage") is None and parse_l4t("") is None


def _host_has_nvml() -> bool:
    try:
        nvml_gpus()
        return True
    except NvmlUnavailable:
        return False


@pytest.mark.skipif(_host_has_nvml(), reason="this host has a working NVML library")
def test_real_absent_nvml_library(tmp_path):
    """The real nvidia-ml-py on a host without the driver: nvmlInit raises NVMLError_LibraryNotFound."""
    with pytest.raises(NvmlUnavailable, match="LibraryNotFound|not installed"):
        nvml_gpus()
    d = detect(tmp_path)  # real NVML probe, empty filesystem root
    assert d.kind == "none" and d.target is None
    assert d.message.startswith("no NVIDIA GPU:") and "NVML" in d.message
    assert json.loads(json.dumps(d.to_dict()))["kind"] == "none"


@pytest.mark.skipif(_host_has_nvml(), reason="this host has a working NVML library")
def test_detect_cli_on_gpu_less_host(capsys):
    from trt_gemma.cli import main

    with pytest.raises(SystemExit) as e:
        main(["detect", "--json"])
    out, err = capsys.readouterr()
    assert e.value.code == 0 and "Traceback" not in out + err
    assert json.loads(out)["kind"] in ("none", "jetson")


def test_doctor_flags_a_stale_pynvml_distribution(tmp_path, monkeypatch):
    """A real dist-info on sys.path, found through importlib.metadata as pip would leave it."""
    from trt_gemma.commands.doctor import stale_pynvml

    assert stale_pynvml() is None or "pynvml" in stale_pynvml()["message"]
    info = tmp_path / "pynvml-11.5.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pynvml\nVersion: 11.5.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    s = stale_pynvml()
    assert s["version"] == "11.5.0" and "deprecated" in s["message"] and "pip uninstall -y pynvml" in s["fix"]


def test_unknown_tegra_soc_reports_without_raising(tmp_path, capsys):
    """A Tegra SoC missing from SOC_SM (TX2 = tegra186) has no SM: the message and the CLI rendering still work."""
    from trt_gemma.commands.hardware import _render_detection

    d = detect(jetson_tree(tmp_path, "quill", "nvidia,p3310-1000+p3489-0000\0nvidia,tegra186\0", None, 8_000_000),
               nvml=no_nvml)
    assert (d.kind, d.sm, d.target) == ("jetson", None, None)
    assert d.message == "quill (SM unknown): no matching target: " + d.why and "tegra186" in d.why
    data = json.loads(json.dumps(d.to_dict()))
    assert data["sm"] is None and data["message"] == d.message
    _render_detection(data)
    out = capsys.readouterr().out
    assert "SM unknown" in out and "target: none" in out


def test_doctor_says_how_tensorrt_llm_really_installs():
    """`pip install 'trt-gemma[gpu]'` cannot work (PyPI has a stub sdist): the fix names NVIDIA's index and the same
    pin as pyproject's gpu extra."""
    import re

    from trt_gemma.commands.doctor import report

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    spec = re.search(r'^gpu = \["([^"]+)"\]', pyproject, re.M).group(1)
    r = report()
    if r["extras_ok"]["gpu"]:
        pytest.skip("tensorrt_llm is installed here")
    why = r["can"]["build engines"]["why"]
    assert f"pip install '{spec}' --extra-index-url https://pypi.nvidia.com" in why and "trt-gemma[gpu]" not in why
