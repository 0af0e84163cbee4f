"""ONNX stage: a TensorRT-LLM checkpoint -> a standard-operator ONNX graph (Q/DQ weights, KV cache I/O) that onnxruntime
and the TensorRT / TensorRT-RTX parsers take. `export` (the graph and its manifest), `graph` (a small builder that
streams initializers to one external-data file), `weights` (one exporter per quant_algo), `pool` (the batched
KV-pool layout: per-row positions, new K/V rows and ArgMax / TopK out), `sites` (Gemma Scope site activations as
extra outputs).
May import: base modules, checkpoint, quant, reference (the numpy oracle the export is checked against).
"""
