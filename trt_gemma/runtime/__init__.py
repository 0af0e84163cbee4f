"""Runtime stage: backends that generate from a built artifact, behind one interface (`base.Backend`), chosen by what a
directory holds (`backends`): the numpy reference (`reference`), onnxruntime (`onnxruntime`, its CPU / CUDA / TensorRT
execution providers in `providers`), TensorRT-LLM (`trtllm`); the executor seam a batched step loop drives
(`executor`) and its TensorRT / TensorRT-RTX implementation (`tensorrt`, with its GPU-free decisions in `engine_plan`
and cuda-python memory and streams in `cuda_memory`); the bounded scheduler the API and the server share
(`scheduler`), stop strings (`stops`) and Gemma's tokenizer and chat template (`tokenizer`).
May import: base modules, checkpoint, quant, reference, onnx, engine (an engine's record and profiles), telemetry.
Never serve, deploy or the top-level stages.
"""
