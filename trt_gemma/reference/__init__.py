"""numpy reference runtime: runs a TensorRT-LLM Gemma 2 checkpoint on the CPU in float32 (the oracle for eval and
the backend that serves the small embedded model).
May import: base modules, checkpoint, quant (the weight formats' dequantizers).
"""
from trt_gemma.reference.checkpoint import LINEAR_FORMATS, CheckpointConfig, Linear, LinearFormat
# `generate` (the function) is imported from trt_gemma.reference.generate: exporting it here would shadow that
# submodule's name on the package.
from trt_gemma.reference.generate import GenerationResult, StepEvent, generate_stream
from trt_gemma.reference.model import KVCache, ReferenceModel
from trt_gemma.reference.sampling import Sampler, SamplingParams

__all__ = ["CheckpointConfig", "GenerationResult", "KVCache", "LINEAR_FORMATS", "Linear", "LinearFormat",
           "ReferenceModel", "Sampler", "SamplingParams", "StepEvent", "generate_stream"]
