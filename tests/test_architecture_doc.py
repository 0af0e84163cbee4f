"""docs/architecture.md stays true: every path it names exists, and it names every unit of the layer table and every
module of the package."""
from __future__ import annotations

import re
from pathlib import Path

from test_import_graph import LAYERS, PKG

REPO = PKG.parent
DOC = REPO / "docs" / "architecture.md"


def named_paths(text: str) -> list[str]:
    """Backticked repository paths (with a slash, or a .py / .md / .toml file); placeholders (<name>), dotted module
    names and URL routes (/v1/...) are not paths."""
    tokens = re.findall(r"`([^`\s]+)`", text)
    return [t for t in tokens if "<" not in t and not t.startswith("/")
            and ("/" in t or re.search(r"\.(py|md|toml)$", t))]


def test_every_path_in_architecture_md_exists():
    paths = named_paths(DOC.read_text())
    assert len(paths) > 50, "the reader found too few paths to check"
    missing = [p for p in paths if not (REPO / p).exists() and not (PKG / p).exists()]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_path_reader_can_fail():
    assert named_paths("`trt_gemma/nope.py`, `build_configs/<target>.toml`, `trt_gemma.stages`, `/v1/models`") == [
        "trt_gemma/nope.py"]


def test_architecture_md_maps_every_module():
    text = DOC.read_text()
    modules = sorted(str(p.relative_to(REPO)) for p in PKG.rglob("*.py")
                     if p.name != "__init__.py" and "assets" not in p.parts and "build_configs" not in p.parts)
    unmapped = [m for m in modules if f"`{m}`" not in text]
    assert not unmapped, f"docs/architecture.md has no line for: {unmapped}"
    units = [u.removeprefix("trt_gemma.") for u in LAYERS if u not in ("trt_gemma", "trt_gemma.__main__")]
    layer_section = text.split("## Layers", 1)[1].split("## ", 1)[0]
    assert not [u for u in units if u not in layer_section], "a unit of LAYERS is missing from the Layers table"
