"""Deploy stage: a bundle as a Triton Inference Server repository for the TensorRT-LLM backend (`triton`), its five
models as data (`models`), the repository's strict check (`inspect`) and Kubernetes manifests (`k8s`).
May import: everything below it, and the top-level `build`, `manifest` and `recipes`.
"""
