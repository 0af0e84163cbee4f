"""Quantization stage: NVIDIA ModelOpt INT4-AWQ / FP8 calibration (`modelopt`), how it runs on this host
(`calibration`: threads, progress) and the weight formats as small classes (`formats`: bytes per weight, numpy
quantize/dequantize) that the planner, the reference runtime and the ONNX exporter share.
May import: base modules and checkpoint.
"""
