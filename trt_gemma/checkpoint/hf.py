"""Read a Hugging Face Gemma 2 model dir: resolve it (local dir or hub id), validate it, read tensors lazily.

Everything that can be wrong with the input is checked in `HFModel.open`, before the converter writes a byte:
config.json (both dialects, via ModelConfig), the architecture, the weight files (model.safetensors, or shards listed by
model.safetensors.index.json), every safetensors header (truncation), and every expected tensor's presence, shape and
dtype; extra tensors are refused by name. Tensors are then read on demand, whole or in row blocks, through
trt_gemma.checkpoint.st_io (plain file reads of the documented safetensors layout: bf16 works without torch, nothing is mapped
or loaded up front).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from trt_gemma.checkpoint.config import ModelConfig
from trt_gemma.checkpoint.dtypes import ST_TO_NAME, to_f32
from trt_gemma.errors import InputError
from trt_gemma.safe_io import check_tree, read_json, read_json_object, resolve_in
from trt_gemma.checkpoint.st_io import FLOAT_DTYPES, TensorExpect, TensorInfo, read_header, read_tensor  # noqa: F401

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files a tokenizer needs (the converter copies these into the checkpoint when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# What a hub download fetches: config, weights, tokenizer; not the .gguf / pytorch_model.bin copies some repos carry.
HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, *TOKENIZER_FILES]
_MAX_NAMES = 6  # names listed in one error message before "... and N more"


# ---------------------------------------------------------------------------------------------------------------
# resolving MODEL arguments


def resolve_model(spec: str | None, config_only: bool = False) -> Path:
    """MODEL argument -> local HF model dir.

    None or "default" -> the embedded default model (unless a local dir named "default" exists); an existing local
    dir -> itself; something path-like that does not exist -> InputError; anything else is a hub id fetched with
    huggingface_hub.snapshot_download, which honours the HF cache and HF_HUB_OFFLINE. `config_only`: a hub snapshot
    needs only config.json (planning), so nothing else is downloaded.
    """
    if spec is None or (spec == "default" and not Path(spec).is_dir()):
        try:
            from trt_gemma.assets import default_model_dir
        except ImportError as e:
            raise InputError("the embedded default model is not part of this installation",
                             fix="pass a Hugging Face model dir or hub id (e.g. google/gemma-2-2b-it)") from e
        return Path(default_model_dir())
    p = Path(spec).expanduser()
    if p.exists():
        if not p.is_dir():
            raise InputError(f"{p} is a file, not a model directory",
                             fix="pass the directory that holds config.json and the *.safetensors files")
        return p
    if _looks_like_path(spec):
        raise InputError(f"model directory {spec} does not exist",
                         fix="check the path, or pass a Hugging Face hub id such as google/gemma-2-2b-it")
    return _download(spec, ["config.json"] if config_only else HUB_PATTERNS)


def _looks_like_path(spec: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with path syntax is meant as a local path
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def _download(repo_id: str, patterns: list[str] = HUB_PATTERNS) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError)

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except GatedRepoError as e:
        raise InputError(f"hub model {repo_id} is gated and this host is not authorised",
                         fix=f"accept the license on https://huggingface.co/{repo_id}, then `hf auth login` "
                             "(or set HF_TOKEN)") from e
    except RepositoryNotFoundError as e:
        raise InputError(f"{repo_id} is not a local directory, and no hub model has that id (or it is private)",
                         fix="check the path or the id (e.g. google/gemma-2-2b-it), "
                             "or log in with `hf auth login`") from e
    except LocalEntryNotFoundError as e:
        raise InputError(f"hub model {repo_id} is not in the local Hugging Face cache and the hub cannot be reached "
                         "(offline mode or no network)",
                         fix=f"download it once online (`hf download {repo_id}`), unset HF_HUB_OFFLINE, "
                             "or pass a local model directory") from e
    except HFValidationError as e:
        raise InputError(f"{repo_id!r} is neither an existing directory nor a valid hub id",
                         fix="pass a local model directory or an id like google/gemma-2-2b-it") from e
    except (HfHubHTTPError, OSError) as e:
        raise InputError(f"downloading {repo_id} failed: {e}",
                         fix="check the network / HF_ENDPOINT, or pass a local model directory") from e


# ---------------------------------------------------------------------------------------------------------------
# the validated model


@dataclass
class HFModel:
    """A validated HF model dir. `tensors` maps each tensor name to (file, header entry); data is read on demand."""

    path: Path
    config: ModelConfig
    raw_config: dict
    tensors: dict[str, tuple[Path, TensorInfo]]
    weight_files: list[Path]
    index_file: Path | None = None
    tokenizer_files: list[Path] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, expected: Mapping[str, TensorExpect] | None = None) -> "HFModel":
        """Validate `path` completely and return the model. `expected` defaults to the float Gemma 2 tensor set
        derived from the converter's mapping table (trt_gemma.checkpoint.tensor_map.source_expectations)."""
        path = Path(path)
        if not path.is_dir():
            raise InputError(f"model directory {path} does not exist", fix="pass a Hugging Face model directory")
        check_tree(path, fix="copy the model's own files into the directory (links may not leave it)")
        cfg_file = path / "config.json"
        config = ModelConfig.from_file(cfg_file)
        raw = read_json_object(cfg_file)
        weight_files, index_file, weight_map = _weight_files(path)
        tensors = _read_headers(path, weight_files, weight_map)
        model = cls(path, config, raw, tensors, weight_files, index_file,
                    [path / n for n in TOKENIZER_FILES if (path / n).is_file()])
        if expected is None:
            from trt_gemma.checkpoint.tensor_map import source_expectations  # the one mapping table (no import of hf)

            expected = source_expectations(model)
        model.check_tensors(expected)
        return model

    # -- validation -------------------------------------------------------------------------------------------
    def check_tensors(self, expected: Mapping[str, TensorExpect]) -> None:
        """Every expected tensor present with its shape and an accepted dtype; nothing else present."""
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            raise InputError(f"{self.path}: {len(missing)} expected tensor(s) missing: {_names(missing)}",
                             fix="the weights are incomplete or not a Gemma 2 checkpoint; re-download the model")
        extra = [n for n in self.tensors if n not in expected]
        if extra:
            raise InputError(f"{self.path}: {len(extra)} unexpected tensor(s) not used by the Gemma 2 mapping: "
                             f"{_names(extra)}",
                             fix="the files do not match config.json (e.g. more layers, untied lm_head, adapter "
                                 "weights); use the model's original files")
        for name, exp in expected.items():
            file, info = self.tensors[name]
            if info.shape != tuple(exp.shape):
                raise InputError(f"{file}: tensor {name} has shape {list(info.shape)}, config.json implies "
                                 f"{list(exp.shape)}", fix="config.json and the weights disagree; re-download both")
            if info.dtype not in exp.dtypes:
                raise InputError(f"{file}: tensor {name} has dtype {info.dtype}, expected one of "
                                 f"{', '.join(exp.dtypes)}", fix="convert from the original float checkpoint")

    # -- lazy reads -------------------------------------------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        return self.tensors[name][1]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` (or a block of its leading rows) in its storage dtype (bf16 as uint16)."""
        file, info = self.tensors[name]
        return read_tensor(file, info, rows)

    def read_f32(self, name: str, rows: slice | None = None) -> np.ndarray:
        return to_f32(self.read(name, rows), self.info(name).dtype)

    @property
    def source_dtype(self) -> str:
        """Model dtype name ("bfloat16"...) the weights are stored in (that of the embedding table)."""
        st = self.info("model.embed_tokens.weight").dtype
        return ST_TO_NAME.get(st, "float32")

    def input_files(self) -> list[Path]:
        """Every file the conversion reads (hashed into the provenance record)."""
        files = [self.path / "config.json"] + ([self.index_file] if self.index_file else []) + self.weight_files
        return files + self.tokenizer_files


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" ... and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def _weight_files(path: Path) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """The safetensors files to read: those named by the index if there is one, else model.safetensors."""
    present = sorted(p.name for p in path.glob("*.safetensors"))
    index = path / INDEX_FILE
    if not index.is_file():
        if SINGLE_FILE not in present:
            bins = sorted(p.name for p in path.glob("*.bin"))
            raise InputError(f"{path}: no {SINGLE_FILE} and no {INDEX_FILE}"
                             + (f" (found {', '.join(bins[:3])}: PyTorch pickles are not read)" if bins else ""),
                             fix="use a safetensors checkpoint (transformers: save_pretrained(safe_serialization=True))")
        stray = [n for n in present if n != SINGLE_FILE]
        if stray:
            raise InputError(f"{path}: shard file(s) {', '.join(stray)} present but {INDEX_FILE} is missing",
                             fix=f"restore {INDEX_FILE} or remove the stray files")
        return [path / SINGLE_FILE], None, None
    try:
        weight_map = read_json(index, fix=f"re-download {INDEX_FILE}")["weight_map"]
    except (InputError, KeyError, TypeError):  # InputError: not JSON, too large or too deep (safe_io caps)
        weight_map = None
    # checked explicitly, not with `assert` (user input; asserts vanish under python -O)
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index} is not a valid safetensors index (needs a weight_map of tensor -> file)",
                         fix=f"re-download {INDEX_FILE}")
    named = sorted(set(weight_map.values()))
    absent = [n for n in named if not resolve_in(path, n, f"re-download {INDEX_FILE}", source=index).is_file()]
    if absent:
        raise InputError(f"{index} names shard file(s) that do not exist: {', '.join(absent)}",
                         fix="the download is incomplete; re-download the missing shard(s)")
    unlisted = [n for n in present if n not in named]
    if unlisted:
        raise InputError(f"{path}: {', '.join(unlisted)} not listed in {INDEX_FILE}",
                         fix="remove the stray file(s) or restore the matching index")
    return [path / n for n in named], index, weight_map


def _read_headers(path: Path, files: list[Path], weight_map: dict[str, str] | None) -> dict[str, tuple[Path, TensorInfo]]:
    tensors: dict[str, tuple[Path, TensorInfo]] = {}
    for file in files:
        infos, _meta = read_header(file)  # raises InputError on truncation / corruption, naming the file
        for name, info in infos.items():
            if name in tensors:
                raise InputError(f"tensor {name} is stored twice ({tensors[name][0].name} and {file.name})",
                                 fix="re-download the model; the shards are inconsistent")
            if weight_map is not None and weight_map.get(name) != file.name:
                where = weight_map.get(name)
                raise InputError(f"{file}: tensor {name} is " + (f"listed under {where} in {INDEX_FILE}" if where
                                                                 else f"not listed in {INDEX_FILE}"),
                                 fix="the index and shards disagree; re-download them together")
            tensors[name] = (file, info)
    if weight_map is not None:
        lost = [n for n, f in weight_map.items() if n not in tensors]
        if lost:
            raise InputError(f"{len(lost)} tensor(s) listed in {INDEX_FILE} are missing from their shard: "
                             f"{_names([f'{n} ({weight_map[n]})' for n in lost])}",
                             fix="the shard is incomplete or from another revision; re-download it")
    return tensors
