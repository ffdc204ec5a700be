"""Every ggml op the engine uses, computed on the CPU backend against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from ggml_test_ops import OpsContext

from tide_local import ggml
from tide_local.ggml import GGMLType as T

RNG = np.random.default_rng(1234)


@pytest.fixture(scope="module")
def cpu():
    backend = ggml.Backend.cpu(n_threads=2)
    yield backend
    backend.free()


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def run(backend, build, inputs):
    """inputs: name -> (ggml type, numpy array); build(ctx, tensors) -> output tensor(s)."""
    ctx = OpsContext(256)
    ts = {}
    feed = {}
    for name, (dtype, arr) in inputs.items():
        if isinstance(arr, Quantized):
            t = ctx.new_tensor(dtype, ne=arr.ne, name=name, input=True)
            feed[t] = arr.data
        else:
            t = ctx.new_tensor(dtype, shape=arr.shape, name=name, input=True)
            feed[t] = arr
        ts[name] = t
    outs = build(ctx, ts)
    single = not isinstance(outs, (tuple, list))
    outs = [outs] if single else list(outs)
    graph = ctx.build_graph(*outs)
    backend.compute(graph, feed)
    res = [o.get() for o in outs]
    return res[0] if single else res


class Quantized:
    """Weight rows quantized with ggml; ``ne`` in ggml order, ``data`` the raw bytes."""

    def __init__(self, w: np.ndarray, qtype):
        self.qtype = qtype
        k = w.shape[-1]
        rows = w.reshape(-1, k)
        self.data = ggml.quantize_rows(rows, qtype)
        self.deq = ggml.dequantize_rows(self.data, qtype, k).reshape(w.shape)
        self.ne = tuple(reversed(w.shape))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- matmuls


def test_mul_mat_f32(cpu):
    w, x = randn(48, 64), randn(5, 64)  # numpy: W (M, K), X (N, K)
    y = run(cpu, lambda c, t: c.mul_mat(t["w"], t["x"]), {"w": (T.F32, w), "x": (T.F32, x)})
    assert y.shape == (5, 48)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-4, atol=1e-4)


def test_mul_mat_f16_weights(cpu):
    w, x = randn(32, 64), randn(7, 64)
    w16 = w.astype(np.float16)
    y = run(cpu, lambda c, t: c.mul_mat(t["w"], t["x"]), {"w": (T.F16, w16), "x": (T.F32, x)})
    ref = x @ w16.astype(np.float32).T
    assert rel_err(y, ref) < 2e-3  # activations are rounded to f16 for the f16 dot product


def test_mul_mat_batched_broadcast(cpu):
    # a: [K, M, 2 heads], b: [K, N, 4 heads] -> head h of b uses a's head h // 2
    a, b = randn(2, 6, 16), randn(4, 3, 16)
    y = run(cpu, lambda c, t: c.mul_mat(t["a"], t["b"]), {"a": (T.F32, a), "b": (T.F32, b)})
    ref = np.stack([b[h] @ a[h // 2].T for h in range(4)])
    assert y.shape == (4, 3, 6)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype,loose", [(T.Q8_0, 0.02), (T.Q4_K, 0.12)])
def test_mul_mat_quantized(cpu, qtype, loose):
    w, x = randn(64, 256), randn(9, 256)
    q = Quantized(w, qtype)
    y = run(cpu, lambda c, t: c.mul_mat(t["w"], t["x"]), {"w": (qtype, q), "x": (T.F32, x)})
    # ggml quantizes the activations too (to q8_0 / q8_K), hence not bit-exact
    assert rel_err(y, x @ q.deq.T) < 1e-2
    assert rel_err(y, x @ w.T) < loose


def _mul_mat_id_ref(experts, b, ids):
    n_used, n_tok = ids.shape[1], ids.shape[0]
    n_b = b.shape[1]
    out = np.zeros((n_tok, n_used, experts.shape[1]), np.float32)
    for t in range(n_tok):
        for s in range(n_used):
            out[t, s] = experts[ids[t, s]] @ b[t, s % n_b]
    return out


@pytest.mark.parametrize("shared_input", [False, True])
def test_mul_mat_id_f32(cpu, shared_input):
    n_exp, m, k, n_used, n_tok = 6, 24, 32, 2, 5
    experts = randn(n_exp, m, k)  # numpy (E, M, K) == ggml ne [K, M, E]
    b = randn(n_tok, 1 if shared_input else n_used, k)  # ggml ne [K, n_b, T]
    ids = np.stack([RNG.choice(n_exp, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    y = run(
        cpu,
        lambda c, t: c.mul_mat_id(t["e"], t["b"], t["ids"]),
        {"e": (T.F32, experts), "b": (T.F32, b), "ids": (T.I32, ids)},
    )
    assert y.shape == (n_tok, n_used, m)
    np.testing.assert_allclose(y, _mul_mat_id_ref(experts, b, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype,loose", [(T.Q8_0, 0.02), (T.Q4_K, 0.12)])
def test_mul_mat_id_quantized(cpu, qtype, loose):
    n_exp, m, k, n_used, n_tok = 8, 32, 256, 3, 6
    experts = randn(n_exp, m, k)
    q = Quantized(experts, qtype)
    b = randn(n_tok, n_used, k)
    ids = np.stack([RNG.choice(n_exp, n_used, replace=False) for _ in range(n_tok)]).astype(np.int32)
    y = run(
        cpu,
        lambda c, t: c.mul_mat_id(t["e"], t["b"], t["ids"]),
        {"e": (qtype, q), "b": (T.F32, b), "ids": (T.I32, ids)},
    )
    assert rel_err(y, _mul_mat_id_ref(q.deq, b, ids)) < 1e-2
    assert rel_err(y, _mul_mat_id_ref(experts, b, ids)) < loose


# --------------------------------------------------------------------------- norms, rope, softmax


def test_rms_norm_times_weight(cpu):
    x, w = randn(4, 3, 64), randn(64)
    eps = 1e-6
    y = run(cpu, lambda c, t: c.mul(c.rms_norm(t["x"], eps), t["w"]), {"x": (T.F32, x), "w": (T.F32, w)})
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * w
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_rope_neox_partial(cpu):
    head_dim, n_dims, theta = 128, 64, 600000.0
    n_tok, n_head = 5, 3
    x = randn(n_tok, n_head, head_dim)  # ggml ne [head_dim, n_head, n_tokens]
    pos = np.array([0, 1, 7, 100, 4000], np.int32)
    y = run(
        cpu,
        lambda c, t: c.rope(t["x"], t["pos"], n_dims, neox=True, freq_base=theta),
        {"x": (T.F32, x), "pos": (T.I32, pos)},
    )
    half = n_dims // 2
    i = np.arange(half, dtype=np.float64)
    ang = pos[:, None].astype(np.float64) * theta ** (-2.0 * i / n_dims)  # [T, half]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half].astype(np.float64), x[..., half:n_dims].astype(np.float64)
    ref = x.astype(np.float64).copy()
    ref[..., :half] = x1 * cos - x2 * sin
    ref[..., half:n_dims] = x2 * cos + x1 * sin
    np.testing.assert_allclose(y[:4], ref[:4], rtol=1e-4, atol=1e-4)
    # ggml builds the angle in float32 (theta *= theta_scale per pair): ~1e-7 relative
    # angle error, times position 4000
    np.testing.assert_allclose(y[4], ref[4], rtol=0, atol=2e-3)
    np.testing.assert_array_equal(y[..., n_dims:], x[..., n_dims:])


def test_soft_max_ext_mask_scale(cpu):
    n_head, n_q, n_kv = 3, 4, 6
    scores = randn(n_head, n_q, n_kv)  # ggml ne [n_kv, n_q, n_head]
    mask = np.zeros((n_q, n_kv), np.float32)
    mask[np.triu_indices(n_q, 3)] = -np.inf
    mask[1, 0] = -2.5  # additive, not only 0/-inf
    scale = 0.125
    y = run(
        cpu,
        lambda c, t: c.soft_max(t["s"], t["m"], scale=scale),
        {"s": (T.F32, scores), "m": (T.F32, mask)},
    )
    z = scores * scale + mask
    ref = np.exp(z - z.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_soft_max_f16_mask_no_mask(cpu):
    s = randn(2, 5)
    mask = np.zeros((8, 5), np.float16)  # mask may have more rows than a
    mask[:, 4] = -np.inf
    y1, y2 = run(
        cpu,
        lambda c, t: (c.soft_max(t["s"], t["m"]), c.soft_max(t["s"])),
        {"s": (T.F32, s), "m": (T.F16, mask)},
    )
    e = np.exp(s[:, :4] - s[:, :4].max(-1, keepdims=True))
    np.testing.assert_allclose(y1[:, :4], e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert np.all(y1[:, 4] == 0)
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(y2, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


def _attention_ref(q, k, v, mask, scale):
    # q (n_head, n_q, D), k/v (n_head_kv, n_kv, D)
    n_head, n_head_kv = q.shape[0], k.shape[0]
    rep = n_head // n_head_kv
    out = np.empty((q.shape[1], n_head, v.shape[2]), np.float64)
    for h in range(n_head):
        s = q[h].astype(np.float64) @ k[h // rep].T.astype(np.float64) * scale + mask
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, h] = p @ v[h // rep]
    return out  # (n_q, n_head, D) == ggml ne [D, n_head, n_q]


def test_flash_attn_ext_gqa(cpu):
    d, n_q, n_kv, n_head, n_head_kv = 64, 5, 12, 4, 2
    q = randn(n_head, n_q, d)  # ggml ne [D, n_q, n_head]
    k = randn(n_head_kv, n_kv, d).astype(np.float16)
    v = randn(n_head_kv, n_kv, d).astype(np.float16)
    mask = np.zeros((n_q, n_kv), np.float16)
    mask[:, 9:] = -np.inf  # block-causal style: last keys hidden
    mask[0, 2] = -np.inf
    scale = 1.0 / np.sqrt(d)
    y = run(
        cpu,
        lambda c, t: c.flash_attn(t["q"], t["k"], t["v"], t["m"], scale),
        {"q": (T.F32, q), "k": (T.F16, k), "v": (T.F16, v), "m": (T.F16, mask)},
    )
    assert y.shape == (n_q, n_head, d)
    ref = _attention_ref(q, k.astype(np.float32), v.astype(np.float32), mask.astype(np.float32), scale)
    np.testing.assert_allclose(y, ref, atol=5e-3, rtol=5e-3)


def test_explicit_attention_matches_flash(cpu):
    """The unfused path (mul_mat + soft_max + mul_mat) used when flash attention is off."""
    d, n_q, n_kv, n_head, n_head_kv = 32, 3, 8, 4, 2
    q, k, v = randn(n_head, n_q, d), randn(n_head_kv, n_kv, d), randn(n_head_kv, n_kv, d)
    mask = np.zeros((n_q, n_kv), np.float32)
    mask[:, 6:] = -np.inf
    scale = 0.2

    def build(c, t):
        kq = c.mul_mat(t["k"], t["q"])  # [n_kv, n_q, n_head]
        p = c.soft_max(kq, t["m"], scale=scale)
        vt = c.cont(c.transpose(t["v"]))  # [n_kv, D, n_head_kv]
        o = c.mul_mat(vt, p)  # [D, n_q, n_head]
        return c.cont(c.permute(o, 0, 2, 1, 3))  # [D, n_head, n_q]

    y = run(cpu, build, {"q": (T.F32, q), "k": (T.F32, k), "v": (T.F32, v), "m": (T.F32, mask)})
    np.testing.assert_allclose(y, _attention_ref(q, k, v, mask, scale), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- indexing


def test_get_rows_f32_and_quantized(cpu):
    emb = randn(10, 64)  # vocab 10, dim 64
    q = Quantized(emb, T.Q8_0)
    ids = np.array([3, 0, 9, 3], np.int32)
    y1, y2 = run(
        cpu,
        lambda c, t: (c.get_rows(t["e"], t["ids"]), c.get_rows(t["eq"], t["ids"])),
        {"e": (T.F32, emb), "eq": (T.Q8_0, q), "ids": (T.I32, ids)},
    )
    np.testing.assert_array_equal(y1, emb[ids])
    np.testing.assert_allclose(y2, q.deq[ids], rtol=0, atol=1e-6)


def test_set_rows_into_f16_cache(cpu):
    cache = np.zeros((6, 8), np.float16)  # 6 rows of 8
    src = randn(2, 8)
    ids = np.array([4, 1], np.int64)
    y = run(
        cpu,
        lambda c, t: c.set_rows(t["cache"], t["src"], t["ids"]),
        {"cache": (T.F16, cache), "src": (T.F32, src), "ids": (T.I64, ids)},
    )
    ref = cache.copy()
    ref[ids] = src.astype(np.float16)
    np.testing.assert_array_equal(y, ref)


# --------------------------------------------------------------------------- elementwise and shape ops


def test_elementwise(cpu):
    a, b, row = randn(3, 4, 8), randn(3, 4, 8), randn(8)

    def build(c, t):
        return (
            c.add(t["a"], t["b"]),
            c.add(t["a"], t["row"]),  # broadcast
            c.mul(t["a"], t["b"]),
            c.scale(t["a"], 0.5),
            c.silu(t["a"]),
            c.sigmoid(t["a"]),
            c.swiglu(t["a"], t["b"]),
            c.sub(t["a"], t["b"]),
            c.sum_rows(t["a"]),
        )

    outs = run(cpu, build, {"a": (T.F32, a), "b": (T.F32, b), "row": (T.F32, row)})
    sig = 1 / (1 + np.exp(-a))
    refs = [a + b, a + row, a * b, a * 0.5, a * sig, sig, a * sig * b, a - b, a.sum(-1, keepdims=True)]
    for got, ref in zip(outs, refs):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_shape_ops(cpu):
    a = randn(2, 3, 4)  # ggml ne [4, 3, 2]
    b = randn(2, 3, 5)

    def build(c, t):
        x = t["a"]
        perm = c.cont(c.permute(x, 0, 2, 1))  # ne [4, 2, 3] -> numpy (3, 2, 4)
        tr = c.cont(c.transpose(c.reshape(x, 4, 6)))  # numpy (4, 6)
        rs = c.reshape(x, 12, 2)  # numpy (2, 12)
        cat = c.concat(x, t["b"], 0)  # numpy (2, 3, 9)
        v = c.cont(c.view(x, (4, 2), offset=4 * 4))  # rows 1..2 of the first matrix
        return perm, tr, rs, cat, v

    perm, tr, rs, cat, v = run(cpu, build, {"a": (T.F32, a), "b": (T.F32, b)})
    np.testing.assert_array_equal(perm, a.transpose(1, 0, 2))
    np.testing.assert_array_equal(tr, a.reshape(6, 4).T)
    np.testing.assert_array_equal(rs, a.reshape(2, 12))
    np.testing.assert_array_equal(cat, np.concatenate([a, b], -1))
    np.testing.assert_array_equal(v, a[0, 1:3])


def test_cast_cpy_argmax(cpu):
    a = randn(4, 10)

    def build(c, t):
        h = c.cast(t["a"], T.F16)
        dst = c.new_tensor(T.F16, shape=(4, 10))
        return h, c.cpy(t["a"], dst), c.argmax(t["a"])

    h, cp, am = run(cpu, build, {"a": (T.F32, a)})
    np.testing.assert_array_equal(h, a.astype(np.float16))
    np.testing.assert_array_equal(cp, a.astype(np.float16))
    np.testing.assert_array_equal(am, a.argmax(-1))


def test_top_k(cpu):
    a = randn(3, 16)
    idx = run(cpu, lambda c, t: c.top_k(t["a"], 4), {"a": (T.F32, a)})
    assert idx.shape == (3, 4)
    for r in range(3):
        assert set(idx[r].tolist()) == set(np.argsort(-a[r])[:4].tolist())


# --------------------------------------------------------------------------- validation instead of aborts


def test_shape_errors_raise_instead_of_abort():
    c = ggml.Context(64)
    w = c.new_tensor(T.F32, ne=(8, 4))
    x = c.new_tensor(T.F32, ne=(6, 3))
    with pytest.raises(ValueError, match="mul_mat"):
        c.mul_mat(w, x)
    with pytest.raises(ValueError, match="reshape"):
        c.reshape(w, 5, 5)
    e = c.new_tensor(T.F32, ne=(8, 4, 3))
    b = c.new_tensor(T.F32, ne=(8, 2, 5))
    with pytest.raises(ValueError, match="I32"):
        c.mul_mat_id(e, b, c.new_tensor(T.F32, ne=(2, 5)))
    with pytest.raises(ValueError, match="tokens"):
        c.mul_mat_id(e, b, c.new_tensor(T.I32, ne=(2, 4)))
    with pytest.raises(ValueError, match="broadcast"):
        c.add(w, x)
    with pytest.raises(ValueError, match="n_dims"):
        c.rope(c.new_tensor(T.F32, ne=(16, 2, 3)), c.new_tensor(T.I32, ne=(3,)), 32)
    with pytest.raises(ValueError, match="block size"):
        c.new_tensor(T.Q4_K, ne=(100, 2))
    with pytest.raises(ValueError, match="view"):
        c.view(w, (8, 5))
    small = ggml.Context(2)
    small.new_tensor(T.F32, ne=(1,))
    small.new_tensor(T.F32, ne=(1,))
    with pytest.raises(ValueError, match="full"):
        small.new_tensor(T.F32, ne=(1,))


def test_tensor_metadata():
    c = OpsContext(8)
    t = c.new_tensor(T.Q8_0, shape=(3, 64), name="w")
    assert t.ne == (64, 3, 1, 1) and t.shape == (3, 64) and t.ndim == 2
    assert t.type == T.Q8_0 and t.type_name == "q8_0" and t.name == "w"
    assert t.nbytes == 3 * ggml.row_size(T.Q8_0, 64)
    assert t.nb[1] == ggml.row_size(T.Q8_0, 64)
    assert not t.is_allocated and t.op == "NONE"
    t.name = "renamed"
    assert c.get_tensor("renamed").ptr == t.ptr
    assert [x.ptr for x in c.tensors()] == [t.ptr]
    c.free()
    with pytest.raises(RuntimeError):
        t.name
