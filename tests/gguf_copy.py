"""Copies of a GGUF with chosen changes, for tests that need a file that is almost right."""

from __future__ import annotations

import math

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from tide_local import ggml
from tide_local.gguf import GGUFFile, GGUFStreamWriter


def _nbytes(ne, ggml_type) -> int:
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return ne[0] // block * size * math.prod(ne[1:])


def _encode(rows: np.ndarray, ggml_type, ne) -> np.ndarray:
    try:
        return ggml.quantize_rows(rows, int(ggml_type))
    except ValueError:  # a type ggml does not quantize to: its bytes are zeros
        return np.zeros(_nbytes(ne, ggml_type), np.uint8)


def rewrite_gguf(src, dst, *, metadata=None, drop=(), retype=None, extra=()):
    """Copy a GGUF, keys with their own GGUF types and tensor bytes unchanged, except:
    `metadata` {key: value (its type inferred), or (value, GGUF type), or None (the key goes)};
    tensors named in `drop` left out; `retype` {name: ggml type} requantized (zero bytes where
    ggml cannot); `extra` [(name, ne, ggml type)] tensors of zeros added."""
    retype = retype or {}
    with GGUFFile(src) as g:
        md = {k: (v, *g.value_types[k]) for k, v in g.metadata.items() if k != "general.alignment"}
        for k, v in (metadata or {}).items():
            if v is None:
                md.pop(k, None)
            else:
                md[k] = v if isinstance(v, tuple) else (v, None)
        with GGUFStreamWriter(dst, alignment=g.alignment) as w:
            for k, (v, *types) in md.items():
                w.add(k, v, *types)
            keep = [t for n, t in g.tensors.items() if n not in drop]
            for t in keep:
                w.add_tensor(t.name, t.ne, retype.get(t.name, t.ggml_type))
            for name, ne, ggml_type in extra:
                w.add_tensor(name, ne, ggml_type)
            w.begin_data()
            for t in keep:
                data = g.tensor_data(t.name)
                if t.name in retype:
                    data = _encode(ggml.dequantize_rows(data, t.ggml_type, t.ne[0]), retype[t.name], t.ne)
                w.write(t.name, data)
            for name, ne, ggml_type in extra:
                w.write(name, np.zeros(_nbytes(ne, ggml_type), np.uint8))
            w.finish()
    return dst
