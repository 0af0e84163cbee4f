"""Runtime stage: backends that generate from a built artifact, behind one interface (`base.Backend`), chosen by what a
directory holds (`backends`): the numpy reference (`reference`), onnxruntime (`onnxruntime`, its CPU / CUDA / TensorRT
execution providers in `providers`), TensorRT-LLM (`trtllm`); batched decoding: the executor seam (`executor`),
onnxruntime's executor (`ort_executor`), the TensorRT / TensorRT-RTX one (`tensorrt`, with its GPU-free decisions in
`engine_plan` and cuda-python memory and streams in `cuda_memory`), the KV pool and binding plan (`pool`), the step
loop (`steploop`) and the backend over it (`batched`); the bounded scheduler the API and the server share
(`scheduler`), stop strings (`stops`) and Gemma's tokenizer and chat template (`tokenizer`).
May import: base modules, checkpoint, quant, reference, onnx, engine (an engine's record and profiles), telemetry.
Never serve, deploy or the top-level stages.
"""
