"""Package data: the embedded default model (a tiny trained Gemma 2) and its held-out / calibration texts.

The model is trained by scripts/train_embedded_model.py on CPython's own documentation (PSF license); see the
MODEL_CARD.md and LICENSE-DATA.txt beside the weights. Every command that takes a model defaults to it, so the pipeline
runs offline on trained weights anywhere.
May import: errors only (the base layer).
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from trt_gemma.errors import InputError

DEFAULT_MODEL_NAME = "gemma2-pydoc-tiny"

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "MODEL_CARD.md",
             "eval.txt", "calib.txt")


def default_model_dir() -> Path:
    """The HF-format dir of the embedded model (config.json, model.safetensors, tokenizer files, MODEL_CARD.md).

    importlib.resources gives a real directory for a regular (wheel or editable) install; the package is never zipped.
    """
    path = Path(str(resources.files(__name__).joinpath(DEFAULT_MODEL_NAME)))
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise InputError(f"the embedded model at {path} is missing {', '.join(missing)}",
                         fix="reinstall trt-gemma (pip install --force-reinstall trt-gemma), or rebuild it with "
                             "`python scripts/train_embedded_model.py`, or pass --model explicitly")
    return path


def eval_text_path() -> Path:
    """Held-out text (PSF-licensed Python docs never seen in training) for perplexity / quantization-quality checks."""
    return default_model_dir() / "eval.txt"


def calib_text_path() -> Path:
    """Calibration text (a disjoint held-out split of the same corpus) for AWQ / FP8 calibration."""
    return default_model_dir() / "calib.txt"
