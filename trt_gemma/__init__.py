"""trt_gemma: deploy Gemma 2 on NVIDIA hardware (plan, convert, quantize, build, serve) and embed it in Python apps.

    import trt_gemma

    with trt_gemma.load() as model:                      # None: the embedded model; or a bundle, engine, HF dir
        for piece in model.stream("Gemma runs on", max_tokens=32):
            print(piece.text, end="", flush=True)
        print(model.telemetry()["memory_bytes"])

    plan = trt_gemma.stages.plan("gemma-2-2b", target="jetson-orin-nano-8gb")   # build side: plan, convert, ...

Names are imported on first use (PEP 562 module __getattr__), so `import trt_gemma` stays light and works in a
core-only install. docs/api.md documents each one, the errors it raises and how it maps onto the HTTP server.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "trt_gemma.api", "Model": "trt_gemma.api", "Stream": "trt_gemma.api", "AsyncStream": "trt_gemma.api",
    "Piece": "trt_gemma.api", "Completion": "trt_gemma.api", "Usage": "trt_gemma.api", "Timings": "trt_gemma.api",
    "ModelInfo": "trt_gemma.api", "MemoryFootprint": "trt_gemma.runtime.base",
    "TrtGemmaError": "trt_gemma.errors", "InputError": "trt_gemma.errors", "ConfigError": "trt_gemma.errors",
    "FitError": "trt_gemma.errors", "OutputError": "trt_gemma.errors", "DependencyError": "trt_gemma.errors",
    "ResourceError": "trt_gemma.errors",
    # build side: trt_gemma.stages.plan / convert / quantize / build / evaluate and their typed results
    "stages": "trt_gemma", "Plan": "trt_gemma.stages", "Bundle": "trt_gemma.stages", "EvalReport": "trt_gemma.stages",
}

__all__ = [
    "__version__", "load", "Model", "Stream", "AsyncStream", "Piece", "Completion", "Usage", "Timings", "ModelInfo",
    "MemoryFootprint", "TrtGemmaError", "InputError", "ConfigError", "FitError", "OutputError", "DependencyError",
    "ResourceError", "stages", "Plan", "Bundle", "EvalReport",
]

if TYPE_CHECKING:  # what a type checker sees; at run time __getattr__ below imports each name on first use
    from trt_gemma import stages as stages
    from trt_gemma.api import AsyncStream as AsyncStream
    from trt_gemma.api import Completion as Completion
    from trt_gemma.api import Model as Model
    from trt_gemma.api import ModelInfo as ModelInfo
    from trt_gemma.api import Piece as Piece
    from trt_gemma.api import Stream as Stream
    from trt_gemma.api import Timings as Timings
    from trt_gemma.api import Usage as Usage
    from trt_gemma.api import load as load
    from trt_gemma.runtime.base import MemoryFootprint as MemoryFootprint
    from trt_gemma.errors import ConfigError as ConfigError
    from trt_gemma.errors import DependencyError as DependencyError
    from trt_gemma.errors import FitError as FitError
    from trt_gemma.errors import InputError as InputError
    from trt_gemma.errors import OutputError as OutputError
    from trt_gemma.errors import ResourceError as ResourceError
    from trt_gemma.errors import TrtGemmaError as TrtGemmaError
    from trt_gemma.stages import Bundle as Bundle
    from trt_gemma.stages import EvalReport as EvalReport
    from trt_gemma.stages import Plan as Plan


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'trt_gemma' has no attribute {name!r}")
    value = importlib.import_module(f"trt_gemma.{name}") if module == "trt_gemma" else \
        getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
