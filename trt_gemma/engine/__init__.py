"""Engine stage: TensorRT / TensorRT-RTX engines from our ONNX graph (`build`), their optimization profiles
(`profiles`), which builder a target uses and what it refuses (`rules`), the TensorRT route's memory plan and
roofline (`plan`), and the recipe -> TensorRT-LLM BuildConfig / trtllm-build flag table (`trtllm_flags`).
May import: base modules, targets, detect, checkpoint, quant, reference, onnx. A recipe comes in as an object:
the recipe, the plan and the bundle (trt_gemma.build, which runs the bundle's TensorRT route) sit above this package.
"""
