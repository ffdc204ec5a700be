"""Contexts: where tensors are created and graphs are built, one method per op.

Every op the engine's forward pass uses is a :class:`Context` method returning a new
:class:`~tide_local.ggml.tensor.Tensor`; dimensions are in ggml order (see
:mod:`tide_local.ggml.tensor`). ggml aborts the process on a failed internal
assertion, so the op methods check the shapes and types ggml asserts on and raise
``ValueError`` instead.

All contexts are ``no_alloc``: tensors get memory from backend buffers
(:class:`~tide_local.ggml.buffers.Buffer`, graph allocators), never from the context.
A context remembers the other contexts its ops read from, so a graph can be sized
for, and keep alive, everything it depends on.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable

from tide_local.ggml import _lib
from tide_local.ggml._handle import OwnedHandle
from tide_local.ggml.graph import Graph
from tide_local.ggml.quant import GGMLType, _check_type, type_name
from tide_local.ggml.tensor import Tensor

__all__ = ["Context"]

_TYPE_SIZES: dict[int, tuple[int, int]] = {}


def _block_and_type_size(lib, dtype: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type; asked of libggml once per type."""
    sizes = _TYPE_SIZES.get(dtype)
    if sizes is None:
        sizes = _TYPE_SIZES[dtype] = (lib.ggml_blck_size(dtype), lib.ggml_type_size(dtype))
    return sizes

_I32 = int(GGMLType.I32)
_F32 = int(GGMLType.F32)
_F16 = int(GGMLType.F16)


class Context(OwnedHandle):
    """Creates tensors and builds graphs: every op is a method returning a :class:`Tensor`.

    ``max_tensors`` bounds how many tensors (leaves, op results, views) the context can
    hold; exceeding it raises ``ValueError``. Contexts never hold tensor data.
    Use as a context manager or call :meth:`free`; tensors and graphs keep their
    context alive while referenced.
    """

    def __init__(self, max_tensors: int = 4096):
        L = _lib.load()
        self._lib = L
        self.max_tensors = int(max_tensors)
        mem = (self.max_tensors + 8) * L.ggml_tensor_overhead()
        params = _lib.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True)
        ptr = L.ggml_init(params)
        if not ptr:
            raise MemoryError(f"ggml_init failed for a {mem}-byte context")
        self.ptr: int | None = ptr
        self.n_tensors = 0
        self._n_ops = 0  # tensors made by ops (graph nodes)
        self._n_leaf = 0  # tensors made by new_tensor (graph leaves)
        self._deps: dict[int, Context] = {}  # contexts whose tensors our ops use (kept alive)
        self._keep: dict[int, object] = {}  # buffers/allocators holding this context's tensor data
        # bytes of each tensor a view was taken of (its address stays its own while we keep it alive)
        self._root_bytes: dict[int, int] = {}

    # ---- lifetime
    def _check_alive(self) -> None:
        if self.ptr is None:
            raise RuntimeError("the ggml context was freed")

    def free(self) -> None:
        """Free the context's metadata (its tensors become invalid)."""
        if self.ptr is not None:
            self._lib.ggml_free(self.ptr)
            self.ptr = None
        self._keep = {}

    def keep_alive(self, obj) -> None:
        """Hold ``obj`` (a buffer, allocator, host array) as long as this context lives."""
        self._keep[id(obj)] = obj

    # ---- internals
    def _room(self, n: int = 1) -> None:
        self._check_alive()
        if self.n_tensors + n > self.max_tensors:
            raise ValueError(f"ggml context is full ({self.max_tensors} tensors); create it with a larger max_tensors")

    def _op(self, ptr: int, ndim: int, n: int = 1) -> Tensor:
        self.n_tensors += n
        self._n_ops += n
        return Tensor(ptr, self, ndim)

    def _use(self, *ts: Tensor) -> None:
        for t in ts:
            if t.ctx is not self:
                self._deps[id(t.ctx)] = t.ctx

    # ---- tensor creation
    def new_tensor(
        self,
        dtype,
        ne: Iterable[int] | None = None,
        *,
        shape: Iterable[int] | None = None,
        name: str | None = None,
        input: bool = False,
    ) -> Tensor:
        """New (unallocated) tensor. Give ``ne`` in ggml order or ``shape`` in numpy order.

        ``input=True`` marks it as a graph input (see :meth:`Tensor.set_input`).
        """
        if (ne is None) == (shape is None):
            raise ValueError("give exactly one of ne (ggml order) or shape (numpy order)")
        dims = [int(x) for x in (ne if ne is not None else reversed(tuple(shape)))]
        if not 1 <= len(dims) <= 4 or any(d < 0 for d in dims):
            raise ValueError(f"bad tensor dimensions {dims} (1 to 4 non-negative sizes)")
        t = _check_type(dtype)
        L = self._lib
        blck = L.ggml_blck_size(t)
        if dims[0] % blck:
            raise ValueError(f"ne[0]={dims[0]} is not a multiple of {type_name(t)}'s block size {blck}")
        self._room()
        arr = (ctypes.c_int64 * len(dims))(*dims)
        ptr = L.ggml_new_tensor(self.ptr, t, len(dims), arr)
        self.n_tensors += 1
        self._n_leaf += 1
        tensor = Tensor(ptr, self, len(dims))
        if name:
            L.ggml_set_name(ptr, name.encode()[: _lib.GGML_MAX_NAME - 1])
        if input:
            L.ggml_set_input(ptr)
        return tensor

    # ---- elementwise
    def _binary(self, fn, a: Tensor, b: Tensor, what: str) -> Tensor:
        an, bn = a.ne, b.ne
        if not (an[0] % bn[0] == 0 and an[1] % bn[1] == 0 and an[2] % bn[2] == 0 and an[3] % bn[3] == 0) or 0 in bn:
            raise ValueError(f"{what}: b {bn} does not broadcast to a {an} (each a.ne[i] must be a multiple of b.ne[i])")
        self._room()
        self._use(a, b)
        return self._op(fn(self.ptr, a.ptr, b.ptr), a.ndim)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        """a + b, b broadcast (repeated) along dims where it is smaller."""
        return self._binary(self._lib.ggml_add, a, b, "add")

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """Elementwise a * b, b broadcast."""
        return self._binary(self._lib.ggml_mul, a, b, "mul")

    def _unary(self, fn, a: Tensor, *args) -> Tensor:
        self._room()
        self._use(a)
        return self._op(fn(self.ptr, a.ptr, *args), a.ndim)

    def silu(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_silu, a)

    # ---- normalization
    def rms_norm(self, a: Tensor, eps: float) -> Tensor:
        """x / sqrt(mean(x^2 over ne[0]) + eps) (no weight; multiply by it with mul)."""
        return self._unary(self._lib.ggml_rms_norm, a, float(eps))

    # ---- matrix products
    def mul_mat(self, a: Tensor, b: Tensor, *, prec_f32: bool = False) -> Tensor:
        """ggml_mul_mat: ``b · aᵀ``.

        a: [K, M, (A2, A3)] (ne order; typically the weight, any type incl. quantized)
        b: [K, N, (B2, B3)] (activations, F32), with B2 % A2 == 0 and B3 % A3 == 0
        → F32 [M, N, B2, B3]. In numpy terms ``out = b_np @ a_np.T`` for 2-D inputs.
        ``prec_f32`` asks backends for F32 accumulation.
        """
        an, bn = a.ne, b.ne
        if an[0] != bn[0] or bn[2] % an[2] or bn[3] % an[3]:
            raise ValueError(f"mul_mat: a {an} and b {bn} do not match (need a.ne[0]==b.ne[0], b.ne[2:] multiples of a.ne[2:])")
        L = self._lib
        if L.ggml_is_transposed(a.ptr):
            raise ValueError("mul_mat: a must not be transposed (use cont())")
        self._room()
        self._use(a, b)
        out = self._op(L.ggml_mul_mat(self.ptr, a.ptr, b.ptr), max(b.ndim, 2))
        if prec_f32 and L.ggml_prec_set_acc is not None:
            L.ggml_prec_set_acc(out.ptr, _lib.GGML_PREC_F32)
        return out

    def mul_mat_id(self, experts: Tensor, b: Tensor, ids: Tensor) -> Tensor:
        """ggml_mul_mat_id: per-token expert matmuls over a stacked 3-D expert tensor.

        experts: [K, M, n_expert]            (ne order; expert e is the slice ne[2] == e,
                                               one contiguous [M, K] matrix, any type)
        b:       [K, n_b, n_tokens]  F32     n_b is n_expert_used (a separate input row per
                                               selected expert) or 1 (the same row for all)
        ids:     [n_expert_used, n_tokens] I32  expert index for each (slot, token)
        → F32 [M, n_expert_used, n_tokens]:
            out[:, s, t] = experts[:, :, ids[s, t]]ᵀ-product with b[:, s % n_b, t]
          i.e. in numpy terms out_np[t, s] = W[ids_np[t, s]] @ b_np[t, s % n_b] with
          W[e] of numpy shape (M, K).

        Every id must be in [0, n_expert): the CPU kernel does not check them (an
        out-of-range id corrupts memory) and there is no "skip" sentinel; map unused
        slots to any valid expert and ignore their outputs.
        """
        en, bn, idn = experts.ne, b.ne, ids.ne
        if ids.dtype != _I32:
            raise ValueError(f"mul_mat_id: ids must be I32, got {ids.type_name}")
        if en[3] != 1 or bn[3] != 1 or idn[2] != 1 or idn[3] != 1:
            raise ValueError(f"mul_mat_id: experts {en} and b {bn} must be 3-D, ids {idn} 2-D")
        if en[0] != bn[0]:
            raise ValueError(f"mul_mat_id: experts.ne[0]={en[0]} != b.ne[0]={bn[0]}")
        if idn[1] != bn[2]:
            raise ValueError(f"mul_mat_id: ids.ne[1]={idn[1]} must equal b.ne[2]={bn[2]} (tokens)")
        if idn[0] % bn[1]:
            raise ValueError(f"mul_mat_id: b.ne[1]={bn[1]} must be 1 or n_expert_used={idn[0]}")
        L = self._lib
        if L.ggml_is_transposed(experts.ptr):
            raise ValueError("mul_mat_id: experts must not be transposed")
        self._room()
        self._use(experts, b, ids)
        return self._op(L.ggml_mul_mat_id(self.ptr, experts.ptr, b.ptr, ids.ptr), 3)

    # ---- attention pieces
    def rope(
        self,
        a: Tensor,
        pos: Tensor,
        n_dims: int,
        *,
        neox: bool = True,
        freq_base: float = 10000.0,
        freq_scale: float = 1.0,
        freq_factors: Tensor | None = None,
        n_ctx_orig: int = 0,
        ext_factor: float = 0.0,
        attn_factor: float = 1.0,
        beta_fast: float = 32.0,
        beta_slow: float = 1.0,
    ) -> Tensor:
        """ggml_rope_ext on a: [head_dim, n_head, n_tokens, (1)] with I32 pos [n_tokens].

        Rotates the first ``n_dims`` of each head (partial rotary when n_dims < head_dim;
        the rest passes through). NeoX mode pairs dim i with i + n_dims/2:
        y[i] = x[i]·cos θ − x[i+h]·sin θ, y[i+h] = x[i+h]·cos θ + x[i]·sin θ,
        θ = pos · freq_base^(−2i/n_dims), h = n_dims/2. ``ext_factor=0`` disables YaRN.
        """
        if pos.dtype != _I32 or pos.ne[1] != 1 or pos.ne[2] != 1 or pos.ne[3] != 1:
            raise ValueError(f"rope: pos must be an I32 vector, got {pos.type_name} ne={pos.ne}")
        if a.ne[2] != pos.ne[0]:
            raise ValueError(f"rope: a.ne[2]={a.ne[2]} (tokens) != len(pos)={pos.ne[0]}")
        if n_dims <= 0 or n_dims % 2 or n_dims > a.ne[0]:
            raise ValueError(f"rope: n_dims={n_dims} must be even and <= head dim {a.ne[0]}")
        if freq_factors is not None and (freq_factors.dtype != _F32 or freq_factors.ne[0] < n_dims // 2):
            raise ValueError("rope: freq_factors must be F32 with at least n_dims/2 entries")
        self._room()
        self._use(a, pos)
        ff = None
        if freq_factors is not None:
            self._use(freq_factors)
            ff = freq_factors.ptr
        ptr = self._lib.ggml_rope_ext(
            self.ptr, a.ptr, pos.ptr, ff, int(n_dims),
            _lib.GGML_ROPE_TYPE_NEOX if neox else _lib.GGML_ROPE_TYPE_NORMAL,
            int(n_ctx_orig), float(freq_base), float(freq_scale), float(ext_factor),
            float(attn_factor), float(beta_fast), float(beta_slow),
        )  # fmt: skip
        return self._op(ptr, a.ndim)

    def soft_max(self, a: Tensor, mask: Tensor | None = None, scale: float = 1.0, max_bias: float = 0.0) -> Tensor:
        """softmax(a·scale + mask) along ne[0].

        a: [n_kv, n_q, H, B] contiguous; mask (F32 or F16, additive, −inf to block):
        [n_kv, ≥n_q, H', B'] with H % H' == 0 and B % B' == 0 (broadcast over heads).
        """
        L = self._lib
        if not L.ggml_is_contiguous(a.ptr):
            raise ValueError("soft_max: a must be contiguous (use cont())")
        if mask is not None:
            mn, an = mask.ne, a.ne
            if mask.dtype not in (_F32, _F16) or not L.ggml_is_contiguous(mask.ptr):
                raise ValueError("soft_max: mask must be a contiguous F32 or F16 tensor")
            if mn[0] != an[0] or mn[1] < an[1] or an[2] % mn[2] or an[3] % mn[3]:
                raise ValueError(f"soft_max: mask {mn} does not fit a {an}")
        elif max_bias > 0:
            raise ValueError("soft_max: max_bias (ALiBi) needs a mask")
        self._room()
        self._use(a)
        mptr = None
        if mask is not None:
            self._use(mask)
            mptr = mask.ptr
        return self._op(L.ggml_soft_max_ext(self.ptr, a.ptr, mptr, float(scale), float(max_bias)), a.ndim)

    # ---- indexing
    def get_rows(self, a: Tensor, ids: Tensor) -> Tensor:
        """Rows of a selected by I32 ids: a [E, R, (B2, B3)], ids [n, (B2, B3)] → [E, n, (B2, B3)].

        a may be quantized (rows are dequantized to F32).
        """
        an, idn = a.ne, ids.ne
        if ids.dtype != _I32:
            raise ValueError(f"get_rows: ids must be I32, got {ids.type_name}")
        if an[2] != idn[1] or an[3] != idn[2] or idn[3] != 1:
            raise ValueError(f"get_rows: ids {idn} do not match a {an}")
        self._room()
        self._use(a, ids)
        return self._op(self._lib.ggml_get_rows(self.ptr, a.ptr, ids.ptr), max(ids.ndim + 1, 2))

    def concat(self, a: Tensor, b: Tensor, dim: int) -> Tensor:
        """Concatenate along ggml dim ``dim`` (0 = ne[0])."""
        if not 0 <= dim < 4:
            raise ValueError(f"concat: dim {dim} out of range")
        if a.dtype != b.dtype:
            raise ValueError(f"concat: types differ ({a.type_name}, {b.type_name})")
        if any(a.ne[d] != b.ne[d] for d in range(4) if d != dim):
            raise ValueError(f"concat: {a.ne} and {b.ne} differ outside dim {dim}")
        self._room()
        self._use(a, b)
        return self._op(self._lib.ggml_concat(self.ptr, a.ptr, b.ptr, int(dim)), max(a.ndim, b.ndim, dim + 1))

    # ---- copies
    def cont(self, a: Tensor) -> Tensor:
        """Contiguous copy (materializes a permute/transpose/view)."""
        return self._unary(self._lib.ggml_cont, a)

    def cpy(self, a: Tensor, b: Tensor) -> Tensor:
        """Copy a into b (converting type); returns a view of b to keep in the graph."""
        if a.nelements != b.nelements:
            raise ValueError(f"cpy: {a.nelements} elements into {b.nelements}")
        self._room()
        self._use(a, b)
        return self._op(self._lib.ggml_cpy(self.ptr, a.ptr, b.ptr), b.ndim)

    # ---- views and shape changes (no data movement)
    def reshape(self, a: Tensor, *ne: int) -> Tensor:
        """View of contiguous ``a`` with new ggml-order dims ``ne`` (1 to 4 of them)."""
        if len(ne) == 1 and isinstance(ne[0], (tuple, list)):
            ne = tuple(ne[0])
        ne = tuple(int(x) for x in ne)
        if not 1 <= len(ne) <= 4:
            raise ValueError("reshape takes 1 to 4 dims")
        if math.prod(ne) != a.nelements:
            raise ValueError(f"reshape: {a.ne} has {a.nelements} elements, {ne} has {math.prod(ne)}")
        L = self._lib
        if not L.ggml_is_contiguous(a.ptr):
            raise ValueError("reshape: a must be contiguous (use cont())")
        self._room()
        self._use(a)
        fn = (L.ggml_reshape_1d, L.ggml_reshape_2d, L.ggml_reshape_3d, L.ggml_reshape_4d)[len(ne) - 1]
        return self._op(fn(self.ptr, a.ptr, *ne), len(ne))

    def view(self, a: Tensor, ne, nb=None, offset: int = 0) -> Tensor:
        """Strided view of a: dims ``ne`` (ggml order), byte strides ``nb`` for dims 1.. and byte ``offset``.

        ``nb`` defaults to a's own strides ``a.nb[1:len(ne)]``.
        """
        ne = tuple(int(x) for x in ne)
        n = len(ne)
        if not 1 <= n <= 4:
            raise ValueError("view takes 1 to 4 dims")
        s = a.struct
        nb = tuple(int(x) for x in (nb if nb is not None else tuple(s.nb)[1:n]))
        if len(nb) != n - 1:
            raise ValueError(f"view: {n} dims need {n - 1} strides, got {len(nb)}")
        L = self._lib
        blck, type_size = _block_and_type_size(L, a.dtype)
        if ne[0] % blck:
            raise ValueError(f"view: ne[0]={ne[0]} is not a multiple of the block size {blck}")
        if any(x < 0 for x in ne) or offset < 0:
            raise ValueError("view: negative size or offset")
        if 0 not in ne:
            size = (ne[0] // blck) * type_size + sum((ne[i] - 1) * nb[i - 1] for i in range(1, n))
            root = s.view_src if s.view_src else None
            root_ptr = ctypes.cast(root, ctypes.c_void_p).value if root else a.ptr
            total = offset + s.view_offs + size
            root_bytes = self._root_bytes.get(root_ptr)
            if root_bytes is None:  # a tensor's size never changes: asked once per viewed tensor
                root_bytes = self._root_bytes[root_ptr] = L.ggml_nbytes(root_ptr)
            if total > root_bytes:
                raise ValueError(f"view: bytes up to {total} exceed the viewed tensor ({root_bytes} bytes)")
        self._room()
        self._use(a)
        off = int(offset)
        if n == 1:
            ptr = L.ggml_view_1d(self.ptr, a.ptr, ne[0], off)
        elif n == 2:
            ptr = L.ggml_view_2d(self.ptr, a.ptr, ne[0], ne[1], nb[0], off)
        elif n == 3:
            ptr = L.ggml_view_3d(self.ptr, a.ptr, ne[0], ne[1], ne[2], nb[0], nb[1], off)
        else:
            ptr = L.ggml_view_4d(self.ptr, a.ptr, ne[0], ne[1], ne[2], ne[3], nb[0], nb[1], nb[2], off)
        return self._op(ptr, n)

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        """ggml_permute: source dim i moves to position ``axes[i]`` (ggml order).

        E.g. [D, H, T] → permute(0, 2, 1) → [D, T, H]. Give 2 to 4 axes (the rest stay).
        The result is a strided view; use cont() before reshape.
        """
        ax = [int(x) for x in axes] + list(range(len(axes), 4))
        if sorted(ax) != [0, 1, 2, 3]:
            raise ValueError(f"permute: {axes} is not a permutation of the ggml dims")
        self._room()
        self._use(a)
        ndim = max(a.ndim, max(ax[: a.ndim]) + 1)
        return self._op(self._lib.ggml_permute(self.ptr, a.ptr, *ax), ndim)

    def transpose(self, a: Tensor) -> Tensor:
        """Swap ne[0] and ne[1] (strided view)."""
        self._room()
        self._use(a)
        return self._op(self._lib.ggml_transpose(self.ptr, a.ptr), max(a.ndim, 2))

    # ---- graphs
    def build_graph(self, *outputs: Tensor, size: int | None = None) -> Graph:
        """Graph computing ``outputs`` (each marked as a graph output)."""
        return Graph(outputs, size=size)

    def reachable_contexts(self) -> list[Context]:
        """This context and every context whose tensors its ops used, transitively."""
        seen: dict[int, Context] = {}
        stack = [self]
        while stack:
            c = stack.pop()
            if id(c) not in seen:
                seen[id(c)] = c
                stack.extend(c._deps.values())
        return list(seen.values())

    def __repr__(self) -> str:
        return f"Context({self.n_tensors}/{self.max_tensors} tensors{'' if self.ptr else ', freed'})"
