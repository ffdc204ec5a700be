"""quantize_rows / dequantize_rows and the type-size helpers."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import quants as gguf_quants

from tide_local import ggml
from tide_local.ggml import GGMLType as T

RNG = np.random.default_rng(7)
X = RNG.standard_normal((48, 512)).astype(np.float32)

# relative RMS error bounds for Gaussian rows (measured: ~0.0054, 0.086, 0.071, 0.036, 0.018)
BOUNDS = {T.Q8_0: 0.008, T.Q4_0: 0.11, T.Q4_K: 0.09, T.Q5_K: 0.045, T.Q6_K: 0.025}


@pytest.mark.parametrize("qtype", list(BOUNDS))
def test_round_trip_error(qtype):
    q = ggml.quantize_rows(X, qtype)
    assert q.dtype == np.uint8
    assert q.shape == (48, ggml.row_size(qtype, 512))
    d = ggml.dequantize_rows(q, qtype, 512)
    assert d.shape == X.shape and d.dtype == np.float32
    err = np.linalg.norm(d - X) / np.linalg.norm(X)
    assert err < BOUNDS[qtype]
    # flat bytes work too
    np.testing.assert_array_equal(ggml.dequantize_rows(q.reshape(-1), qtype, 512), d)


@pytest.mark.parametrize("qtype", list(BOUNDS))
def test_bytes_match_gguf_reference_dequantizer(qtype):
    """gguf-py's numpy dequantizer reads our bytes to exactly what ggml's to_float gives."""
    q = ggml.quantize_rows(X, qtype)
    ref = gguf_quants.dequantize(q, qtype)
    assert ref.shape == X.shape
    np.testing.assert_array_equal(ref.astype(np.float32), ggml.dequantize_rows(q, qtype, 512))
    assert np.linalg.norm(ref - X) / np.linalg.norm(X) < BOUNDS[qtype]


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0])
def test_bytes_match_gguf_reference_quantizer(qtype):
    np.testing.assert_array_equal(ggml.quantize_rows(X, qtype), gguf_quants.quantize(X, qtype))


def test_float_types():
    x = X[:4, :64]
    f32 = ggml.quantize_rows(x, T.F32)
    assert f32.shape == (4, 256)
    np.testing.assert_array_equal(f32.view(np.float32), x)
    f16 = ggml.quantize_rows(x, T.F16)
    np.testing.assert_array_equal(f16.view(np.float16), x.astype(np.float16))
    np.testing.assert_array_equal(ggml.dequantize_rows(f16, T.F16, 64), x.astype(np.float16).astype(np.float32))
    bf16 = ggml.quantize_rows(x, T.BF16)
    back = ggml.dequantize_rows(bf16, T.BF16, 64)
    np.testing.assert_allclose(back, x, rtol=1e-2)
    np.testing.assert_array_equal(back, gguf_quants.dequantize(bf16, T.BF16))
    np.testing.assert_array_equal(ggml.dequantize_rows(f32, T.F32, 64), x)


def test_non_contiguous_and_float64_input():
    x64 = X[:, :256].astype(np.float64)[:, ::1]
    np.testing.assert_array_equal(ggml.quantize_rows(x64, T.Q8_0), ggml.quantize_rows(X[:, :256], T.Q8_0))
    xt = np.asfortranarray(X[:8, :256])
    np.testing.assert_array_equal(ggml.quantize_rows(xt, T.Q4_K), ggml.quantize_rows(X[:8, :256], T.Q4_K))


def test_errors():
    with pytest.raises(ValueError, match="block size"):
        ggml.quantize_rows(X[:, :100], T.Q4_K)
    with pytest.raises(ValueError, match="block size"):
        ggml.quantize_rows(X[:, :48], T.Q8_0)
    with pytest.raises(ValueError, match="2-D"):
        ggml.quantize_rows(X[0], T.Q8_0)
    with pytest.raises(ValueError, match="importance matrix"):
        ggml.quantize_rows(X[:, :256], T.IQ2_XXS)
    with pytest.raises(ValueError, match="rows"):
        ggml.dequantize_rows(np.zeros(35, np.uint8), T.Q8_0, 32)
    with pytest.raises(ValueError, match="type"):
        ggml.row_size(4, 32)  # removed Q4_2
    with pytest.raises(ValueError, match="cannot quantize"):
        ggml.quantize_rows(X[:, :32], T.I32)


def test_imatrix_types_quantize_with_imatrix():
    assert ggml.requires_imatrix(T.IQ2_XXS)
    assert not ggml.requires_imatrix(T.Q4_K)
    imat = np.ones(256, np.float32)
    q = ggml.quantize_rows(X[:2, :256], T.Q4_K, imatrix=imat)
    assert q.shape == (2, ggml.row_size(T.Q4_K, 256))


def test_sizes_match_gguf_table():
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_XS):
        blck, size = GGML_QUANT_SIZES[qtype]
        assert ggml.block_size(qtype) == blck
        assert ggml.type_size(qtype) == size
        assert ggml.row_size(qtype, 4 * blck) == 4 * size
    assert ggml.type_name(T.Q4_K) == "q4_K"
    assert ggml.type_name(T.BF16) == "bf16"
    assert ggml.is_quantized(T.Q6_K) and not ggml.is_quantized(T.F16)
    assert ggml.numpy_dtype(T.F16) == np.float16 and ggml.numpy_dtype(T.Q8_0) is None


def test_quantize_releases_gil_and_is_thread_safe():
    from concurrent.futures import ThreadPoolExecutor

    chunks = np.array_split(X, 4)
    with ThreadPoolExecutor(4) as pool:
        parts = list(pool.map(lambda c: ggml.quantize_rows(c, T.Q4_K), chunks))
    np.testing.assert_array_equal(np.concatenate(parts), ggml.quantize_rows(X, T.Q4_K))
