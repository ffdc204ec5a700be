"""Type sizes and (de)quantization of rows with ggml's own kernels.

Type ids are ggml's ``enum ggml_type`` values, the same numbers as
``gguf.GGMLQuantizationType`` (re-exported here as :data:`GGMLType`); plain ints
are accepted everywhere.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as GGMLType

from tide_local.ggml import _lib

__all__ = [
    "GGMLType",
    "block_size",
    "dequantize_rows",
    "is_quantized",
    "numpy_dtype",
    "quantize_rows",
    "requires_imatrix",
    "row_size",
    "type_name",
    "type_size",
]

_NUMPY_DTYPES = {
    int(GGMLType.F32): np.dtype(np.float32),
    int(GGMLType.F16): np.dtype(np.float16),
    int(GGMLType.F64): np.dtype(np.float64),
    int(GGMLType.I8): np.dtype(np.int8),
    int(GGMLType.I16): np.dtype(np.int16),
    int(GGMLType.I32): np.dtype(np.int32),
    int(GGMLType.I64): np.dtype(np.int64),
    int(GGMLType.BF16): np.dtype(np.uint16),  # raw bf16 bits
}

_TYPE_COUNT = 43  # GGML_TYPE_COUNT of the pinned ggml
_to_float_cache: dict[int, object] = {}


def _check_type(ggml_type) -> int:
    t = int(ggml_type)
    if not 0 <= t < _TYPE_COUNT or _lib.load().ggml_blck_size(t) == 0:
        raise ValueError(f"unknown or removed ggml type id {t}")
    return t


def numpy_dtype(ggml_type) -> np.dtype | None:
    """numpy dtype holding one element of a non-quantized type (bf16 → uint16 bits); None for block types."""
    return _NUMPY_DTYPES.get(int(ggml_type))


def type_name(ggml_type) -> str:
    """ggml's name of the type, e.g. ``"q4_K"``."""
    return _lib.load().ggml_type_name(_check_type(ggml_type)).decode()


def block_size(ggml_type) -> int:
    """Elements per block (1 for f32/f16/..., 32 for q8_0, 256 for k-quants)."""
    return int(_lib.load().ggml_blck_size(_check_type(ggml_type)))


def type_size(ggml_type) -> int:
    """Bytes per block."""
    return int(_lib.load().ggml_type_size(_check_type(ggml_type)))


def row_size(ggml_type, n: int) -> int:
    """Bytes of a row of ``n`` elements (``n`` must be a multiple of the block size)."""
    t = _check_type(ggml_type)
    L = _lib.load()
    n = int(n)
    if n < 0 or n % L.ggml_blck_size(t):
        raise ValueError(f"row length {n} is not a multiple of {type_name(t)}'s block size {L.ggml_blck_size(t)}")
    return int(L.ggml_row_size(t, n))


def is_quantized(ggml_type) -> bool:
    return bool(_lib.load().ggml_is_quantized(_check_type(ggml_type)))


def requires_imatrix(ggml_type) -> bool:
    """True for types (IQ2_XXS, IQ1_S, ...) that ggml cannot quantize without an importance matrix."""
    return bool(_lib.load().ggml_quantize_requires_imatrix(_check_type(ggml_type)))


def quantize_rows(src: np.ndarray, ggml_type, *, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 rows with ``ggml_quantize_chunk``.

    ``src``: float32 ``[nrows, n_per_row]`` (made C-contiguous float32 if it is not).
    Returns uint8 ``[nrows, row_size(ggml_type, n_per_row)]``: the exact bytes ggml
    stores for that tensor. Works for F32/F16/BF16 as well. ``imatrix`` (float32
    ``[n_per_row]``) is passed through for importance-weighted quantization.
    The GIL is released during the C call, so threads can quantize in parallel.
    """
    t = _check_type(ggml_type)
    L = _lib.load()
    src = np.asarray(src)
    if src.ndim != 2:
        raise ValueError(f"quantize_rows expects a 2-D [nrows, n_per_row] array, got shape {src.shape}")
    src = np.ascontiguousarray(src, dtype=np.float32)
    nrows, n_per_row = src.shape
    blck = L.ggml_blck_size(t)
    if n_per_row % blck:
        raise ValueError(
            f"row length {n_per_row} is not a multiple of {type_name(t)}'s block size {blck}"
        )
    if t not in _QUANTIZABLE:
        raise ValueError(f"ggml cannot quantize to {type_name(t)}")
    imatrix_ptr = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix must have shape ({n_per_row},), got {imatrix.shape}")
        imatrix_ptr = imatrix.ctypes.data
    elif L.ggml_quantize_requires_imatrix(t):
        raise ValueError(f"{type_name(t)} needs an importance matrix (imatrix=...)")
    rs = L.ggml_row_size(t, n_per_row)
    out = np.empty((nrows, rs), dtype=np.uint8)
    if nrows == 0 or n_per_row == 0:
        return out
    if t == GGMLType.F32:
        out[...] = src.view(np.uint8).reshape(nrows, rs)
        return out
    written = L.ggml_quantize_chunk(t, src.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, imatrix_ptr)
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes, expected {out.nbytes}")
    return out


def _to_float_fn(t: int):
    fn = _to_float_cache.get(t)
    if fn is None:
        traits = _lib.load().ggml_get_type_traits(t).contents
        if not traits.to_float:
            return None
        fn = _lib.ggml_to_float_t(traits.to_float)
        _to_float_cache[t] = fn
    return fn


def dequantize_rows(data: np.ndarray, ggml_type, n_per_row: int) -> np.ndarray:
    """Dequantize ggml rows to float32 ``[nrows, n_per_row]`` with the type's ``to_float``.

    ``data``: uint8 bytes, either ``[nrows, row_size]`` or flat (any shape whose byte
    count is a multiple of the row size).
    """
    t = _check_type(ggml_type)
    n_per_row = int(n_per_row)
    rs = row_size(t, n_per_row)
    data = np.ascontiguousarray(data)
    if data.dtype != np.uint8:
        data = data.view(np.uint8)
    nbytes = data.nbytes
    if rs == 0 or nbytes % rs:
        raise ValueError(f"{nbytes} bytes is not a whole number of {type_name(t)} rows of {n_per_row} ({rs} bytes each)")
    nrows = nbytes // rs
    if t == GGMLType.F32:
        return data.reshape(-1).view(np.float32).reshape(nrows, n_per_row).copy()
    out = np.empty((nrows, n_per_row), dtype=np.float32)
    fn = _to_float_fn(t)
    if fn is None:
        dt = numpy_dtype(t)
        if dt is None or t == GGMLType.BF16:
            raise ValueError(f"ggml has no dequantization for {type_name(t)}")
        out[...] = data.reshape(-1).view(dt).reshape(nrows, n_per_row)
        return out
    if out.size:
        fn(data.ctypes.data, out.ctypes.data, out.size)
    return out


# Types ggml_quantize_chunk handles (see ggml.c); everything else aborts inside ggml.
_QUANTIZABLE = {
    int(x)
    for x in (
        GGMLType.F32, GGMLType.F16, GGMLType.BF16,
        GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
        GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
        GGMLType.TQ1_0, GGMLType.TQ2_0,
        GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_S,
        GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.IQ4_NL, GGMLType.IQ4_XS,
        GGMLType.MXFP4, GGMLType.NVFP4,
    )
} | {41, 42}  # Q1_0, Q2_0
