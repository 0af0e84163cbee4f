"""Per-target build recipes (TOML), shipped as package data `trt_gemma.build_configs`; read by trt_gemma.recipes."""
