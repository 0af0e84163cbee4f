"""Engine stage: TensorRT / TensorRT-RTX engines from our ONNX graph (`build`), their optimization profiles
(`profiles`), which builder a target uses and what it refuses (`rules`), the TensorRT route's memory plan and
roofline (`plan`), and the recipe -> TensorRT-LLM BuildConfig / trtllm-build flag table (`trtllm_flags`).
May import: base modules, checkpoint, quant, reference, onnx, recipes.
"""
