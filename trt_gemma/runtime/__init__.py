"""Runtime stage: backends that generate from a built artifact, behind one interface (`base.Backend`), chosen by what a
directory holds (`backends`): the numpy reference (`reference`), onnxruntime (`onnxruntime`), TensorRT-LLM (`trtllm`);
the bounded scheduler the API and the server share (`scheduler`), stop strings (`stops`) and Gemma's tokenizer and chat
template (`tokenizer`); batched decoding: the executor seam (`executor`), onnxruntime's executor (`ort_executor`), the
KV pool and binding plan (`pool`), the step loop (`steploop`) and the backend over it (`batched`).
May import: base modules, checkpoint, quant, reference, onnx, telemetry. Never serve, deploy or the top-level stages.
"""
