"""Activations of one sequence through onnxruntime: an export with site outputs (onnx/sites.py) in its own session.

Generation never sees these graphs: `OrtSites` runs a separate export of the checkpoint whose only extra outputs are
the (tap, layer) pairs asked for, cached beside the backend's ONNX cache under a key that includes them. It has the
reference runtime's `activations(ids, layer, taps)` and `config`, so trt_gemma.scope reads either one the same way.
One full sequence from position 0 (an empty past), float32 activations, quantized MatMuls at accuracy level 0
(float32 activations inside onnxruntime's MatMulNBits, as the reference computes them).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from trt_gemma.errors import DependencyError, InputError
from trt_gemma.onnx.sites import output_name

ACCURACY_LEVEL = 0


class OrtSites:
    """A site export in an onnxruntime session."""

    backend = "onnxruntime"

    def __init__(self, onnx_dir: Path):
        import onnxruntime as ort

        from trt_gemma.onnx.export import MODEL_FILE, read_manifest
        from trt_gemma.reference.checkpoint import CheckpointConfig
        from trt_gemma.runtime.onnxruntime import session_options

        self.path = Path(onnx_dir)
        man = read_manifest(self.path)
        self.config = CheckpointConfig.from_file(self.path / "checkpoint_config.json")
        self.outputs = {n for n in man["outputs"] if n.startswith("site.")}
        self.session = ort.InferenceSession(str(self.path / MODEL_FILE), session_options(ACCURACY_LEVEL),
                                            providers=["CPUExecutionProvider"])
        self._past = [n for n in man["inputs"] if n.startswith("past_key_values.")]
        c = self.config
        self._empty = np.zeros((1, c.num_key_value_heads, 0, c.head_size), np.float32)

    @classmethod
    def for_checkpoint(cls, ckpt: Path, site_outputs, cache_dir: Path | None = None) -> "OrtSites":
        """The checkpoint's export with exactly these (tap, layer) outputs, exported into the cache on first use."""
        from trt_gemma.runtime.backends import onnxruntime_available

        if not onnxruntime_available():
            raise DependencyError("reading activations through onnxruntime needs the onnx and onnxruntime packages",
                                  fix="pip install 'trt-gemma[onnx]', or use --backend reference")
        return cls(_ensure_export(Path(ckpt), tuple(site_outputs), cache_dir))

    def activations(self, ids, layer: int, taps) -> dict[str, np.ndarray]:
        """{tap: [T, width] float32} of block `layer` for one full sequence of token ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        c = self.config
        if ids.size == 0 or ids.min() < 0 or ids.max() >= c.vocab_size:
            raise InputError(f"token ids must be non-empty and in 0..{c.vocab_size - 1}",
                             fix="use the model's own tokenizer")
        names = [output_name(t, layer) for t in taps]
        missing = [n for n in names if n not in self.outputs]
        if missing:
            raise InputError(f"{self.path} was exported without {', '.join(missing)}",
                             fix="load it with OrtSites.for_checkpoint(ckpt, [(tap, layer), ...]) for these sites")
        feeds = {"input_ids": ids, **{n: self._empty for n in self._past}}
        values = self.session.run(names, feeds)
        return {t: v[0] for t, v in zip(taps, values)}


def _ensure_export(ckpt: Path, site_outputs: tuple, cache_dir: Path | None) -> Path:
    """`onnx-sites/<checkpoint>-<hash>` beside the backend's ONNX cache; the key covers the site list and the
    checkpoint's contents (runtime/cache.py), and the entry counts toward the cache's size cap."""
    from trt_gemma import __version__
    from trt_gemma.runtime.backends import export_cache_dir, export_into, onnx_cache_opset

    seed = f"{__version__}:sites:{sorted(site_outputs)}:{onnx_cache_opset()}"
    return export_into(export_cache_dir("onnx-sites", ckpt, seed, cache_dir), ckpt, site_outputs=site_outputs)
