"""Serve stage: the OpenAI-compatible HTTP app (`app`), its wire format and validation (`protocol`), per-request bounds
(`limits`), connection-level defences (`conn`), Prometheus metrics (`metrics`) and the ShieldGemma guard (`guard`).
May import: everything below it (runtime, telemetry, checkpoint, ...), and the top-level `api` and `safety`.
"""
