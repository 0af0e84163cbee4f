"""Checkpoint stage: Hugging Face Gemma 2 dirs (local or hub) -> TensorRT-LLM checkpoints, streaming.

Owns the HF reader (`hf`), the model config in both config.json dialects (`config`), the one tensor-name table
(`tensor_map`), safetensors streaming I/O (`st_io`), the float formats numpy lacks (`dtypes`), the linear codecs that
turn ModelOpt's unified-HF INT4-AWQ / FP8 exports into TensorRT-LLM layouts (`codecs`), the checkpoint's quantization
block (`quant_block`) and the converter (`convert`).
May import: the base modules (errors, console, fsutil, assets) and targets. Nothing above it.
"""
