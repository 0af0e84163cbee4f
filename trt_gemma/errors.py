"""Typed errors for everything a user can get wrong.

Each error carries the message (what is wrong, naming the file/tensor/field) and the fix (what to run or change).
The CLI prints both and exits with the class's exit code; no traceback reaches the user.
"""
from __future__ import annotations


class TrtGemmaError(Exception):
    """Base class: a problem the user can fix. `fix` says how."""

    exit_code = 2

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message}\n  fix: {self.fix}"

    def to_dict(self) -> dict:
        return {"error": type(self).__name__, "message": self.message, "fix": self.fix}


class InputError(TrtGemmaError):
    """A model dir, checkpoint, file or tensor is missing, corrupt or not what was expected."""


class UnsupportedModelError(InputError):
    """The model's architecture or dimensions are not a Gemma 2 we can handle."""


class ConfigError(TrtGemmaError):
    """A config.json / recipe / TOML field is wrong. Names the field."""


class RecipeError(ConfigError):
    """A build recipe is impossible on its target (precision vs compute capability, limits)."""


class FitError(TrtGemmaError):
    """The model does not fit the target's memory; the message names the largest setting that does."""

    exit_code = 3


class OutputError(TrtGemmaError):
    """The output path exists (without --force), is not writable, or could not be completed."""


class DependencyError(TrtGemmaError):
    """An optional package (an extra) or a GPU is needed for this command and is absent."""

    exit_code = 4


class ResourceError(TrtGemmaError):
    """The host lacks memory or another resource for the job (an override flag exists)."""

    exit_code = 3


class DeviceError(TrtGemmaError):
    """A CUDA or TensorRT call failed on the device. Names the call and the error it returned."""

    exit_code = 5


class EngineMismatchError(InputError):
    """A serialized engine was built for another TensorRT, another GPU, or another graph than the one found here."""


class NeedsDeviceError(DependencyError):
    """A device-only command on a host without the device (`trt-gemma check` without a GPU): what it needs."""

    exit_code = 2


class MismatchError(TrtGemmaError):
    """A check found results that differ from their oracle beyond tolerance (the report names each)."""

    exit_code = 1
