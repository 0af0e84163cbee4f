"""trt_gemma: deploy Gemma 2 on NVIDIA hardware (plan, convert, quantize, build, serve)."""
__version__ = "0.1.0"
