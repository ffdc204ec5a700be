"""Reading a LLaDA2.0 Hugging Face checkpoint directory, validated and in bounded memory.

Safetensors headers are parsed here (not by a library) so that every tensor's byte range
is checked against its shard before conversion starts: a truncated download is found in
a second, not after an hour. Tensor data is read with plain file reads in row chunks,
never mapped whole, so memory stays bounded whatever the checkpoint size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tide_local.errors import CheckpointError, UnsupportedModelError
from tide_local.architecture import HF_ARCHITECTURES, HF_MODEL_TYPES, HF_NAMES, LLaDA2Config, hf_shape, tensor_specs
from tide_local.units import human_bytes

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_MAX_HEADER = 100 << 20

_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}
_MIN_SOURCE_BYTES_PER_VALUE = min(_DTYPES.values())


@dataclass(frozen=True)
class SourceTensor:
    name: str
    path: Path
    dtype: str  # safetensors dtype: BF16, F16 or F32
    shape: tuple[int, ...]
    offset: int  # absolute offset of the data in the shard

    @property
    def row_bytes(self) -> int:
        return _DTYPES[self.dtype] * (self.shape[-1] if self.shape else 1)

    @property
    def n_rows(self) -> int:
        return math.prod(self.shape[:-1]) if len(self.shape) > 1 else 1


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({err.msg}, line {err.lineno})") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read {what}: {err.strerror}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return value


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """Parse and bounds-check one shard's header."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: truncated or corrupt safetensors header")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    data_start = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for {name}") from None
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (*shape, begin, end)) or not 0 <= begin <= end:
            raise CheckpointError(f"{path}: corrupt header entry for {name}")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has dtype {dtype}; expected BF16, F16 or F32")
        # Python ints: a hostile shape cannot wrap around to match its byte range
        if any(n < 0 for n in shape) or end - begin != _DTYPES[dtype] * math.prod(shape):
            raise CheckpointError(f"{path}: tensor {name} has inconsistent size in the header")
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} needs {data_start + end:,} bytes, the file has {size:,}"
            )
        tensors[name] = SourceTensor(name, path, dtype, shape, data_start + begin)
    return tensors


class HFCheckpoint:
    """A validated LLaDA2.0 checkpoint directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory (expected a Hugging Face checkpoint folder or a GGUF file)")
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.dir}: no config.json (is this a Hugging Face checkpoint folder?)")
        self.hf_config = _read_json(config_path, "config.json")
        self._check_model_type(config_path)
        try:
            self.config = LLaDA2Config.from_hf(self.hf_config)
        except KeyError as err:
            raise CheckpointError(f"{config_path}: missing field {err.args[0]}") from None
        except (TypeError, ValueError, ArithmeticError) as err:
            raise CheckpointError(f"{config_path}: bad value: {err}") from None
        problems = self.config.check(HF_NAMES)
        if problems:
            raise CheckpointError(f"{config_path}: {problems[0]}")
        # The shards' sizes bound what config.json may claim, before anything is read or built
        # per layer or per expert.
        shards, weight_map, index_path = self._shards()
        on_disk = sum((self.dir / shard).stat().st_size for shard in shards)
        need = _MIN_SOURCE_BYTES_PER_VALUE * sum(self.config.n_values())
        if need > on_disk:
            cfg = self.config
            raise CheckpointError(
                f"{config_path}: these hyperparameters ({cfg.n_layers:,} layers, {cfg.n_experts:,} experts, "
                f"hidden size {cfg.hidden_size:,}, vocabulary {cfg.vocab_size:,}) need at least {human_bytes(need)} "
                f"of weights but the checkpoint's safetensors files hold only {human_bytes(on_disk)} (a truncated "
                "download, or a config.json that does not match the weights)"
            )
        self.tensors = self._index_tensors(shards, weight_map, index_path)
        self.specs = tensor_specs(self.config)
        self._check_tensors()
        self.tokenizer_path = self.dir / "tokenizer.json"
        if not self.tokenizer_path.is_file():
            raise CheckpointError(f"{self.dir}: no tokenizer.json (copy it from the model's repository)")
        tok_cfg = self.dir / "tokenizer_config.json"
        self.tokenizer_config = _read_json(tok_cfg, "tokenizer_config.json") if tok_cfg.is_file() else {}

    def _check_model_type(self, config_path: Path) -> None:
        model_type = self.hf_config.get("model_type")
        archs = self.hf_config.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"{config_path}: bad value: architectures is {archs!r:.60}, expected a list of names")
        if model_type not in HF_MODEL_TYPES and not set(archs) & set(HF_ARCHITECTURES):
            found = model_type or (archs[0] if archs else "nothing")
            raise UnsupportedModelError(
                f"{config_path}: model_type is '{found}'; this converter reads LLaDA2.0 "
                f"({HF_MODEL_TYPES[0]}) checkpoints only"
            )
        capacity = self.hf_config.get("expert_capacity") or 0
        if not isinstance(capacity, (int, float)) or isinstance(capacity, bool):
            raise CheckpointError(f"{config_path}: bad value: expert_capacity is {capacity!r:.60}, expected a number")
        if capacity > 0:
            raise UnsupportedModelError(
                f"{config_path}: expert_capacity > 0 means LLaDA2.2 block routing, which is not supported"
            )

    def _shards(self) -> tuple[list[str], dict | None, Path]:
        """The shard file names (checked to exist), the index's weight map (None: one file)."""
        index_path = self.dir / INDEX_FILE
        if index_path.is_file():
            weight_map = _read_json(index_path, INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no weight_map")
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: weight_map values must be shard file names")
            shards = sorted(set(weight_map.values()))
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map, shards = None, [SINGLE_FILE]
        else:
            raise CheckpointError(f"{self.dir}: no {INDEX_FILE} and no {SINGLE_FILE}")
        for shard in shards:
            if Path(shard).name != shard:
                raise CheckpointError(f"{index_path}: shard name '{shard}' is not a plain file name")
            if not (self.dir / shard).is_file():
                raise CheckpointError(f"{self.dir / shard}: shard listed in {INDEX_FILE} is missing")
        return shards, weight_map, index_path

    def _index_tensors(self, shards: list[str], weight_map: dict | None, index_path: Path) -> dict[str, SourceTensor]:
        tensors: dict[str, SourceTensor] = {}
        for shard in shards:
            header = read_safetensors_header(self.dir / shard)
            for name in header.keys() & tensors.keys():
                raise CheckpointError(f"{self.dir}: tensor {name} is in two shards, {tensors[name].path.name} and "
                                      f"{shard} (the checkpoint is corrupt or mixes two downloads)")
            tensors.update(header)
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name not in tensors or tensors[name].path.name != shard:
                    raise CheckpointError(f"{self.dir / shard}: tensor {name} listed in the index is not in it")
        return tensors

    def _check_tensors(self) -> None:
        for spec in self.specs:
            expected = hf_shape(spec)
            for name in spec.hf_names:
                source = self.tensors.get(name)
                if source is None:
                    raise CheckpointError(f"{self.dir}: tensor {name} is missing")
                if source.shape != expected:
                    raise CheckpointError(
                        f"{source.path}: tensor {name} has shape {list(source.shape)}, expected {list(expected)}"
                    )

    @property
    def total_bytes(self) -> int:
        return sum(t.row_bytes * t.n_rows for t in self.tensors.values())

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32 [stop-start, row] (1-D tensors: one row)."""
        src = self.tensors[name]
        count = (stop - start) * src.row_bytes
        with open(src.path, "rb") as f:
            f.seek(src.offset + start * src.row_bytes)
            raw = f.read(count)
        if len(raw) != count:
            raise CheckpointError(f"{src.path}: truncated while reading {name}")
        return _to_float32(raw, src.dtype).reshape(stop - start, -1)

    def read_raw_rows(self, name: str, start: int, stop: int) -> bytes:
        src = self.tensors[name]
        with open(src.path, "rb") as f:
            f.seek(src.offset + start * src.row_bytes)
            return f.read((stop - start) * src.row_bytes)


def _to_float32(raw: bytes, dtype: str) -> np.ndarray:
    if dtype == "F32":
        return np.frombuffer(raw, dtype="<f4").copy()
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32)
    # bf16 is the top half of a float32
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
