"""The ggml surface only the tests use, kept next to them instead of in the engine's classes.

The production :class:`~tide_local.ggml.Context` and :class:`~tide_local.ggml.Backend`
carry what the engine calls. The tests also check ggml's semantics for ops and
backend calls the engine does not need (fused swiglu, flash attention, set_rows,
async transfers, ...); those thin wrappers live here, built the same way as the
production ones (shape checks that raise ``ValueError`` instead of a ggml abort).
"""

from __future__ import annotations

import numpy as np

from tide_local import ggml
from tide_local.ggml import _lib
from tide_local.ggml.buffers import _wrap_host

_I32 = int(ggml.GGMLType.I32)
_F32 = int(ggml.GGMLType.F32)
_F16 = int(ggml.GGMLType.F16)
Tensor = ggml.Tensor


class OpsContext(ggml.Context):
    """A context with the ops and lookups only the tests use."""

    def get_tensor(self, name: str) -> Tensor | None:
        """The tensor named ``name`` in this context, if any."""
        self._check_alive()
        ptr = self._lib.ggml_get_tensor(self.ptr, name.encode())
        return Tensor(ptr, self) if ptr else None

    def tensors(self) -> list[Tensor]:
        """Every tensor of the context, in creation order."""
        self._check_alive()
        L, out = self._lib, []
        ptr = L.ggml_get_first_tensor(self.ptr)
        while ptr:
            out.append(Tensor(ptr, self))
            ptr = L.ggml_get_next_tensor(self.ptr, ptr)
        return out

    def sub(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self._lib.ggml_sub, a, b, "sub")

    def scale(self, a: Tensor, s: float, bias: float = 0.0) -> Tensor:
        """a * s (+ bias)."""
        if bias:
            return self._unary(self._lib.ggml_scale_bias, a, float(s), float(bias))
        return self._unary(self._lib.ggml_scale, a, float(s))

    def sigmoid(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_sigmoid, a)

    def swiglu(self, gate: Tensor, up: Tensor) -> Tensor:
        """Fused silu(gate) * up (same shape and type, rows contiguous)."""
        if gate.ne != up.ne or gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate {gate.ne} {gate.type_name} and up {up.ne} {up.type_name} must match")
        L = self._lib
        if not (L.ggml_is_contiguous_1(gate.ptr) and L.ggml_is_contiguous_1(up.ptr)):
            raise ValueError("swiglu: gate and up must have contiguous rows")
        self._room()
        self._use(gate, up)
        return self._op(L.ggml_swiglu_split(self.ptr, gate.ptr, up.ptr), gate.ndim)

    def sum_rows(self, a: Tensor) -> Tensor:
        """Sum over ne[0]: [n, r, ...] -> [1, r, ...]."""
        return self._unary(self._lib.ggml_sum_rows, a)

    def argmax(self, a: Tensor) -> Tensor:
        """I32 [ne1]: index of the max of each row of a 2-D tensor."""
        if a.ne[2] != 1 or a.ne[3] != 1:
            raise ValueError(f"argmax needs a 2-D tensor, got ne={a.ne}")
        self._room()
        self._use(a)
        return self._op(self._lib.ggml_argmax(self.ptr, a.ptr), 1)

    def top_k(self, a: Tensor, k: int) -> Tensor:
        """I32 [k, ...]: indices of the k largest entries of each row, in no particular order."""
        if not 0 < k <= a.ne[0]:
            raise ValueError(f"top_k: k={k} must be in [1, ne[0]={a.ne[0]}]")
        self._room(4)
        self._use(a)
        before = self._lib.ggml_used_mem(self.ptr)
        ptr = self._lib.ggml_top_k(self.ptr, a.ptr, int(k))
        used = (self._lib.ggml_used_mem(self.ptr) - before) // self._lib.ggml_tensor_overhead()
        return self._op(ptr, a.ndim, max(1, used))

    def flash_attn(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None,
        scale: float,
        *,
        max_bias: float = 0.0,
        logit_softcap: float = 0.0,
        prec_f32: bool = True,
    ) -> Tensor:
        """ggml_flash_attn_ext: fused softmax(q·kᵀ·scale + mask)·v.

        q:    [D,  n_q,  n_head,    1]  (F32)
        k:    [D,  n_kv, n_head_kv, 1]  (F16 typical; F32 allowed on CPU)
        v:    [Dv, n_kv, n_head_kv, 1]  (same type as k; NOT transposed)
        mask: [n_kv, ≥n_q, 1, 1] F16, additive (0 / −inf), or None
        → F32 [Dv, n_head, n_q] — note heads before tokens (permuted vs. q), so a
          reshape_2d(out, Dv*n_head, n_q) gives the concatenated heads per token.
        GQA: n_head must be a multiple of n_head_kv (query head h uses kv head
        h // (n_head / n_head_kv)).
        """
        qn, kn, vn = q.ne, k.ne, v.ne
        if kn[0] != qn[0] or qn[2] % kn[2] or qn[3] % kn[3]:
            raise ValueError(f"flash_attn: q {qn} and k {kn} do not match (head dim, n_head multiple of n_head_kv)")
        if vn[1] != kn[1] or vn[2] != kn[2] or not (qn[3] == kn[3] == vn[3]):
            raise ValueError(f"flash_attn: v {vn} must have k's {kn} n_kv and heads")
        for t, what in ((q, "q"), (k, "k"), (v, "v")):
            if t.struct.nb[0] != self._lib.ggml_type_size(t.dtype):
                raise ValueError(f"flash_attn: {what} must be contiguous along ne[0]")
        mptr = None
        if mask is not None:
            mn = mask.ne
            if mask.dtype != _F16 or not self._lib.ggml_is_contiguous(mask.ptr):
                raise ValueError("flash_attn: mask must be a contiguous F16 tensor")
            if mn[0] != kn[1] or mn[1] < qn[1] or qn[2] % mn[2] or qn[3] % mn[3]:
                raise ValueError(f"flash_attn: mask {mn} does not fit n_kv={kn[1]}, n_q={qn[1]}")
            mptr = mask.ptr
        elif max_bias > 0:
            raise ValueError("flash_attn: max_bias (ALiBi) needs a mask")
        self._room()
        self._use(q, k, v)
        if mask is not None:
            self._use(mask)
        L = self._lib
        ptr = L.ggml_flash_attn_ext(self.ptr, q.ptr, k.ptr, v.ptr, mptr, float(scale), float(max_bias), float(logit_softcap))
        if prec_f32:
            L.ggml_flash_attn_ext_set_prec(ptr, _lib.GGML_PREC_F32)
        return self._op(ptr, 3)

    def set_rows(self, dst: Tensor, src: Tensor, ids: Tensor) -> Tensor:
        """Write rows of src into dst at I32/I64 row indices; returns a view of dst.

        dst [E, R, B2, B3], src [E, n, B2, B3] (F32/F16), ids [n, ...]. The op converts
        src to dst's type (e.g. F32 activations into an F16 KV cache). Keep the result
        in the graph (build_graph(..., result)) so the write happens.
        """
        dn, sn, idn = dst.ne, src.ne, ids.ne
        if ids.dtype not in (_I32, int(ggml.GGMLType.I64)):
            raise ValueError(f"set_rows: ids must be I32 or I64, got {ids.type_name}")
        if src.dtype not in (_F32, _F16):
            raise ValueError(f"set_rows: src must be F32 or F16, got {src.type_name}")
        if dn[0] != sn[0] or dn[2] != sn[2] or dn[3] != sn[3] or sn[1] != idn[0] or sn[2] % idn[1] or sn[3] % idn[2] or idn[3] != 1:
            raise ValueError(f"set_rows: dst {dn}, src {sn} and ids {idn} do not match")
        L = self._lib
        if not (L.ggml_is_contiguous_rows(dst.ptr) and L.ggml_is_contiguous_rows(src.ptr)):
            raise ValueError("set_rows: dst and src rows must be contiguous")
        self._room()
        self._use(dst, src, ids)
        return self._op(L.ggml_set_rows(self.ptr, dst.ptr, src.ptr, ids.ptr), dst.ndim)

    def cast(self, a: Tensor, dtype) -> Tensor:
        return self._unary(self._lib.ggml_cast, a, int(dtype))


class OpsBackend(ggml.Backend):
    """A backend with the memory and asynchronous-transfer calls only the tests use."""

    def alloc_buffer(self, size: int) -> ggml.Buffer:
        """A buffer of the default type; place tensors into it with :meth:`Buffer.place`."""
        ptr = self._lib.ggml_backend_alloc_buffer(self._p(), int(size))
        if not ptr:
            raise MemoryError(f"{self.name}: cannot allocate {size} bytes")
        return ggml.Buffer(ptr)

    def get_async(self, tensor: Tensor, out: np.ndarray, offset: int = 0) -> None:
        """Start copying ``tensor`` bytes [offset, offset+out.nbytes) into ``out``; valid after synchronize()."""
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        tensor._ensure_data()
        tensor._check_range(offset, out.nbytes)
        self._pending.append(out)
        self._lib.ggml_backend_tensor_get_async(self._p(), tensor.ptr, out.ctypes.data, offset, out.nbytes)

def wrap_device_host_memory(device: ggml.Device, obj, size: int | None = None, *, max_tensor_size: int | None = None,
                            keepalive=None) -> ggml.Buffer:
    """Host memory as a buffer ``device`` can use directly (ggml_backend_dev_buffer_from_host_ptr).

    Only for devices whose ``props()["buffer_from_host_ptr"]`` is true (the CPU;
    some integrated GPUs). Same argument rules as :func:`ggml.wrap_host_memory`.
    """
    if not device.props()["buffer_from_host_ptr"]:
        raise ValueError(f"{device.name} cannot use host memory directly")
    L = _lib.load()
    return _wrap_host(
        obj, size, keepalive,
        lambda addr, n: L.ggml_backend_dev_buffer_from_host_ptr(device.ptr, addr, n, int(max_tensor_size or n)),
        f"{device.name}: ggml_backend_dev_buffer_from_host_ptr",
    )
