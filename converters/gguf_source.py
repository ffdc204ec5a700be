"""A LLaDA2 GGUF (ours, or llama.cpp's converter's) as the source of `tide convert`.

Converting a GGUF re-lays it out (page-aligned expert slices, the tide.* keys) and, when
asked, changes its weight types. Tensors whose type stays are copied byte for byte. From
F32/F16/BF16 any type can be made; a tensor already quantized to another type is only
re-quantized with --allow-requantize (llama-quantize's rule: quantization error compounds).
The tokenizer and chat template are copied as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from tide_local.architecture import tensor_specs
from tide_local.errors import UsageError
from tide_local.modelfile import ModelFile

UNQUANTIZED = frozenset({T.F32, T.F16, T.BF16})


def is_gguf(path: str | os.PathLike) -> bool:
    """A file that starts like a GGUF (a folder is a Hugging Face checkpoint)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


class GGUFSource:
    """The tensors and metadata of a validated LLaDA2 GGUF, read row by row."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = ModelFile(path)  # validated: types, shapes and byte ranges
        self.config = self.file.config
        self.specs = tensor_specs(self.config)
        self.name = self.file.gguf.get("general.name") or self.path.stem
        self.total_bytes = sum(self.file.tensor(s.name).nbytes for s in self.specs)

    def source_type(self, name: str) -> T:
        return T(self.file.tensor(name).ggml_type)

    def n_rows(self, name: str) -> int:
        """Rows of a tensor, expert stacks flattened (ne[1] * ne[2])."""
        ne = self.file.tensor(name).ne
        return int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        info = self.file.tensor(name)
        row = info.nbytes // self.n_rows(name)
        return self.file.gguf.tensor_data(name)[start * row: stop * row]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        from tide_local.ggml import dequantize_rows

        info = self.file.tensor(name)
        return dequantize_rows(self.raw_rows(name, start, stop), info.ggml_type, info.ne[0])

    def check_types(self, plans, allow_requantize: bool) -> None:
        """Refuse a quantized → other quantized change unless allowed (before anything is written)."""
        if allow_requantize:
            return
        for plan in plans:
            source = self.source_type(plan.spec.name)
            if source != plan.ggml_type and source not in UNQUANTIZED:
                raise UsageError(
                    f"{self.path.name}: {plan.spec.name} is {source.name}; making it {plan.ggml_type.name} would "
                    "quantize already-quantized weights again (quality drops twice). Convert from the F32/F16/BF16 "
                    "weights, keep the type (--type of the file), or pass --allow-requantize")

    def tokenizer_metadata(self) -> dict[str, tuple]:
        """Every tokenizer.* key with its GGUF value types: key → (value, vtype, item_type)."""
        g = self.file.gguf
        return {key: (value, *g.value_types[key]) for key, value in g.metadata.items() if key.startswith("tokenizer.")}

    def close(self) -> None:
        self.file.close()
