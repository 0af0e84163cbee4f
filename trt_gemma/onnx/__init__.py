"""ONNX stage: a TensorRT-LLM checkpoint -> a standard-operator ONNX graph (Q/DQ weights, KV cache I/O) that onnxruntime
and the TensorRT / TensorRT-RTX parsers take. `export` (the graph and its manifest), `graph` (a small builder that
streams initializers to one external-data file), `weights` (one exporter per quant_algo).
May import: base modules, checkpoint, quant, reference (the numpy oracle the export is checked against).
"""
