"""Tensors, contexts (graph builders) and graphs.

Shape conventions
-----------------
* ``Tensor.ne`` is ggml's order, always 4 entries: ``ne[0]`` is the fastest-varying
  (contiguous) dimension. A row-major numpy array of shape ``(a, b, c)`` has
  ``ne == (c, b, a, 1)``.
* ``Tensor.shape`` is numpy order, ``tuple(reversed(ne[:ndim]))``. ``ndim`` is the
  number of dimensions the tensor was created with (or, for op results, what the op
  naturally produces; trailing ggml dims of 1 are not counted).
* Every op parameter that names dimensions (``reshape``, ``view``, ``permute``,
  ``concat``, ``new_tensor(ne=...)``) uses ggml order, like llama.cpp code does.
  Only ``new_tensor(shape=...)``, ``Tensor.shape`` and numpy transfers use numpy order.

ggml aborts the process on a failed internal assertion, so the op methods check
the shapes and types ggml asserts on and raise ``ValueError`` instead.

All contexts are ``no_alloc``: tensors get memory from backend buffers
(:class:`~tide_local.ggml.backend.Buffer`, graph allocators), never from the context.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable

import numpy as np

from tide_local.ggml import _lib
from tide_local.ggml.quant import GGMLType, _check_type, numpy_dtype, type_name

__all__ = ["Context", "Graph", "Tensor"]

_I32 = int(GGMLType.I32)
_F32 = int(GGMLType.F32)
_F16 = int(GGMLType.F16)

_tensor_from_address = _lib.ggml_tensor.from_address


def _L():
    return _lib.load()


def _dims(ne: tuple) -> int:
    n = 4
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


class Tensor:
    """A ggml tensor: a pointer into its :class:`Context` plus cached metadata.

    ``ne`` (ggml order, 4 entries), ``dtype`` (ggml type id) and ``ndim`` are fixed at
    creation; ``data``/``buffer`` change when the tensor is allocated.
    """

    __slots__ = ("ptr", "ctx", "ne", "dtype", "ndim", "__weakref__")

    def __init__(self, ptr: int, ctx: Context, ndim: int | None = None):
        s = _tensor_from_address(ptr)
        self.ptr = ptr
        self.ctx = ctx
        self.ne = tuple(s.ne)
        self.dtype = s.type
        self.ndim = _dims(self.ne) if ndim is None else ndim

    # ---- metadata
    @property
    def struct(self) -> _lib.ggml_tensor:
        """The C struct (live view; reading it touches the context's memory)."""
        self.ctx._check_alive()
        return _tensor_from_address(self.ptr)

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy-order shape: ``tuple(reversed(ne[:ndim]))``."""
        return tuple(reversed(self.ne[: self.ndim]))

    @property
    def type(self) -> GGMLType | int:
        try:
            return GGMLType(self.dtype)
        except ValueError:
            return self.dtype

    @property
    def type_name(self) -> str:
        return type_name(self.dtype)

    @property
    def nb(self) -> tuple[int, int, int, int]:
        """Strides in bytes, ggml order."""
        return tuple(self.struct.nb)

    @property
    def name(self) -> str:
        return self.struct.name.decode("utf-8", "replace")

    @name.setter
    def name(self, value: str) -> None:
        self.ctx._check_alive()
        _L().ggml_set_name(self.ptr, value.encode()[: _lib.GGML_MAX_NAME - 1])

    @property
    def op(self) -> str:
        """ggml's description of the op that produces this tensor (``"NONE"`` for leaves)."""
        self.ctx._check_alive()
        return _L().ggml_op_desc(self.ptr).decode()

    @property
    def nbytes(self) -> int:
        self.ctx._check_alive()
        return int(_L().ggml_nbytes(self.ptr))

    @property
    def nelements(self) -> int:
        return math.prod(self.ne)

    @property
    def is_contiguous(self) -> bool:
        self.ctx._check_alive()
        return bool(_L().ggml_is_contiguous(self.ptr))

    @property
    def data(self) -> int | None:
        """Address of the tensor's data (host or device address), None if unallocated."""
        return self.struct.data

    @property
    def buffer(self) -> int | None:
        """Address of the ``ggml_backend_buffer`` holding the data, None if unallocated."""
        s = self.struct
        if s.buffer:
            return s.buffer
        if s.view_src:
            return s.view_src.contents.buffer
        return None

    @property
    def is_allocated(self) -> bool:
        return self.struct.data is not None

    def set_input(self) -> Tensor:
        """Mark as a graph input: the graph allocator gives it its own, never-reused memory."""
        self.ctx._check_alive()
        _L().ggml_set_input(self.ptr)
        return self

    def set_output(self) -> Tensor:
        """Mark as a graph output: never overwritten by later nodes."""
        self.ctx._check_alive()
        _L().ggml_set_output(self.ptr)
        return self

    # ---- data transfer (any backend; synchronous)
    def _ensure_data(self) -> None:
        s = self.struct
        if s.data is None:
            if s.view_src and s.view_src.contents.data is not None:
                status = _L().ggml_backend_view_init(self.ptr)
                if status != _lib.GGML_STATUS_SUCCESS:
                    raise RuntimeError(f"ggml_backend_view_init failed for {self!r}")
                return
            raise ValueError(
                f"{self!r} has no memory yet: allocate its context on a backend, place it in a "
                "buffer, or allocate the graph before setting or reading it"
            )

    def _check_range(self, offset: int, size: int) -> None:
        if offset < 0 or offset + size > self.nbytes:
            raise ValueError(f"byte range [{offset}, {offset + size}) is outside {self!r} ({self.nbytes} bytes)")

    def set(self, array, offset: int | None = None) -> None:
        """Copy ``array``'s bytes into the tensor (ggml_backend_tensor_set).

        Without ``offset`` the array must fill the tensor exactly; with a byte ``offset``
        it writes that many bytes from there (e.g. one expert slot of a stacked tensor).
        The dtype must match the tensor type (float32 for F32, float16 for F16, int32 for
        I32, ...; uint8 bytes for quantized types); other float (int) arrays are converted
        to a float (int) tensor type, but never ints to floats or back.
        """
        arr = self._as_source(array, offset)
        self._ensure_data()
        if _lib.READONLY_BUFFERS and self.buffer in _lib.READONLY_BUFFERS:
            raise ValueError(f"{self!r} lives in read-only memory (a read-only mmap)")
        if not self.is_contiguous:
            raise ValueError(f"{self!r} is not contiguous; write through a contiguous tensor")
        off = offset or 0
        self._check_range(off, arr.nbytes)
        _L().ggml_backend_tensor_set(self.ptr, arr.ctypes.data, off, arr.nbytes)

    def _as_source(self, array, offset: int | None) -> np.ndarray:
        arr = np.asarray(array)
        want = numpy_dtype(self.dtype)
        if want is None:
            if arr.dtype != np.uint8:
                raise ValueError(f"{self.type_name} tensor {self.name!r} takes raw uint8 bytes, got {arr.dtype}")
        elif arr.dtype != want:
            if (want.kind == "f" and arr.dtype.kind == "f") or (want.kind == "i" and arr.dtype.kind in "iu"):
                arr = arr.astype(want)
            else:
                raise ValueError(f"{self.type_name} tensor {self.name!r} takes {want} data, got {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        if offset is None and arr.nbytes != self.nbytes:
            raise ValueError(
                f"array of {arr.nbytes} bytes (shape {arr.shape}) does not fill {self!r} ({self.nbytes} bytes)"
            )
        return arr

    def get(self, out: np.ndarray | None = None) -> np.ndarray:
        """Copy the tensor into a new numpy array of ``self.shape`` (or into ``out``).

        Quantized tensors come back as uint8 ``[rows..., row_bytes]``.
        """
        self._ensure_data()
        if not self.is_contiguous:
            raise ValueError(f"{self!r} is not contiguous; read cont(tensor) instead")
        if out is None:
            out = np.empty(self._numpy_shape(), dtype=numpy_dtype(self.dtype) or np.uint8)
        elif not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        if out.nbytes != self.nbytes:
            raise ValueError(f"out has {out.nbytes} bytes, {self!r} has {self.nbytes}")
        _L().ggml_backend_tensor_get(self.ptr, out.ctypes.data, 0, out.nbytes)
        return out

    def _numpy_shape(self) -> tuple[int, ...]:
        if numpy_dtype(self.dtype) is not None:
            return self.shape
        L = _L()
        row = L.ggml_row_size(self.dtype, self.ne[0])
        return tuple(reversed(self.ne[1 : max(self.ndim, 1)])) + (row,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Tensor) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)

    def __repr__(self) -> str:
        try:
            name = self.name
        except RuntimeError:
            name = "?"
        return f"Tensor({name!r}, {type_name(self.dtype)}, ne={self.ne[: self.ndim]})"


class OwnedHandle:
    """A handle that owns a ggml object: ``free()`` releases it; a ``with`` block or garbage
    collection calls it too (subclasses make ``free`` idempotent)."""

    def free(self) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn down ctypes
            pass


class Context(OwnedHandle):
    """Creates tensors and builds graphs: every op is a method returning a :class:`Tensor`.

    ``max_tensors`` bounds how many tensors (leaves, op results, views) the context can
    hold; exceeding it raises ``ValueError``. Contexts never hold tensor data.
    Use as a context manager or call :meth:`free`; tensors and graphs keep their
    context alive while referenced.
    """

    def __init__(self, max_tensors: int = 4096):
        L = _L()
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
        if self.ptr is None:
            raise RuntimeError("the ggml context was freed")
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

    def new_like(self, array: np.ndarray, *, dtype=None, name: str | None = None, input: bool = True) -> Tensor:
        """Tensor with the numpy array's shape and matching type (float32→F32, int32→I32, ...)."""
        array = np.asarray(array)
        if dtype is None:
            dtype = _DTYPE_FROM_NUMPY.get(array.dtype)
            if dtype is None:
                raise ValueError(f"no ggml type for numpy dtype {array.dtype}; pass dtype=")
        return self.new_tensor(dtype, shape=array.shape or (1,), name=name, input=input)

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

    def sub(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self._lib.ggml_sub, a, b, "sub")

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        """Elementwise a * b, b broadcast."""
        return self._binary(self._lib.ggml_mul, a, b, "mul")

    def div(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self._lib.ggml_div, a, b, "div")

    def _unary(self, fn, a: Tensor, *args) -> Tensor:
        self._room()
        self._use(a)
        return self._op(fn(self.ptr, a.ptr, *args), a.ndim)

    def scale(self, a: Tensor, s: float, bias: float = 0.0) -> Tensor:
        """a * s (+ bias)."""
        if bias:
            return self._unary(self._lib.ggml_scale_bias, a, float(s), float(bias))
        return self._unary(self._lib.ggml_scale, a, float(s))

    def silu(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_silu, a)

    def sigmoid(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_sigmoid, a)

    def exp(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_exp, a)

    def sqr(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_sqr, a)

    def sqrt(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_sqrt, a)

    def neg(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_neg, a)

    def tanh(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_tanh, a)

    def gelu(self, a: Tensor) -> Tensor:
        return self._unary(self._lib.ggml_gelu, a)

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

    def argsort(self, a: Tensor, descending: bool = False) -> Tensor:
        """I32 indices sorting each row (along ne[0])."""
        return self._unary(self._lib.ggml_argsort, a, _lib.SORT_DESC if descending else _lib.SORT_ASC)

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

    # ---- normalization
    def rms_norm(self, a: Tensor, eps: float) -> Tensor:
        """x / sqrt(mean(x^2 over ne[0]) + eps) (no weight; multiply by it with mul)."""
        return self._unary(self._lib.ggml_rms_norm, a, float(eps))

    def norm(self, a: Tensor, eps: float) -> Tensor:
        """(x - mean) / sqrt(var + eps) over ne[0]."""
        return self._unary(self._lib.ggml_norm, a, float(eps))

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

    def set_rows(self, dst: Tensor, src: Tensor, ids: Tensor) -> Tensor:
        """Write rows of src into dst at I32/I64 row indices; returns a view of dst.

        dst [E, R, B2, B3], src [E, n, B2, B3] (F32/F16), ids [n, ...]. The op converts
        src to dst's type (e.g. F32 activations into an F16 KV cache). Keep the result
        in the graph (build_graph(..., result)) so the write happens.
        """
        dn, sn, idn = dst.ne, src.ne, ids.ne
        if ids.dtype not in (_I32, int(GGMLType.I64)):
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

    # ---- copies, casts
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

    def cast(self, a: Tensor, dtype) -> Tensor:
        return self._unary(self._lib.ggml_cast, a, int(dtype))

    def repeat(self, a: Tensor, like: Tensor) -> Tensor:
        """a tiled to ``like``'s shape (each like.ne[i] a multiple of a.ne[i])."""
        an, ln = a.ne, like.ne
        if any(ln[i] % an[i] for i in range(4)):
            raise ValueError(f"repeat: {an} does not tile {ln}")
        self._room()
        self._use(a, like)
        return self._op(self._lib.ggml_repeat(self.ptr, a.ptr, like.ptr), like.ndim)

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
        blck = L.ggml_blck_size(a.dtype)
        if ne[0] % blck:
            raise ValueError(f"view: ne[0]={ne[0]} is not a multiple of the block size {blck}")
        if any(x < 0 for x in ne) or offset < 0:
            raise ValueError("view: negative size or offset")
        if 0 not in ne:
            size = (ne[0] // blck) * L.ggml_type_size(a.dtype) + sum((ne[i] - 1) * nb[i - 1] for i in range(1, n))
            root = s.view_src if s.view_src else None
            root_ptr = ctypes.cast(root, ctypes.c_void_p).value if root else a.ptr
            total = offset + s.view_offs + size
            if total > L.ggml_nbytes(root_ptr):
                raise ValueError(f"view: bytes up to {total} exceed the viewed tensor ({L.ggml_nbytes(root_ptr)} bytes)")
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

    @staticmethod
    def graph_size_bound(contexts: Iterable[Context]) -> int:
        """Upper bound on the nodes (op results) and leaves (new tensors) of any graph over these contexts."""
        contexts = list(contexts)
        return max(sum(c._n_ops for c in contexts), sum(c._n_leaf for c in contexts), 16)

    def __repr__(self) -> str:
        return f"Context({self.n_tensors}/{self.max_tensors} tensors{'' if self.ptr else ', freed'})"


class Graph:
    """A forward graph for some output tensors. Reusable: recompute after changing inputs.

    The graph lives in its own small ggml context sized from ``size`` (default: the
    number of tensors in every context the outputs depend on, so ggml cannot run out
    of node slots).
    """

    def __init__(self, outputs: Iterable[Tensor], size: int | None = None):
        outputs = list(outputs)
        if not outputs:
            raise ValueError("a graph needs at least one output tensor")
        ctxs = {id(t.ctx): t.ctx for t in outputs}
        for c in ctxs.values():
            c._check_alive()
        if size is None:
            reach = {id(r): r for c in ctxs.values() for r in c.reachable_contexts()}
            size = max(_lib.GGML_DEFAULT_GRAPH_SIZE, Context.graph_size_bound(reach.values()))
        L = _L()
        self._lib = L
        self.size = int(size)
        mem = L.ggml_graph_overhead_custom(self.size, False) + 1024
        ptr = L.ggml_init(_lib.ggml_init_params(mem_size=mem, mem_buffer=None, no_alloc=True))
        if not ptr:
            raise MemoryError("ggml_init failed for a graph context")
        self._gctx: int | None = ptr
        self.ptr = L.ggml_new_graph_custom(ptr, self.size, False)
        self.outputs = outputs
        self.contexts = list(ctxs.values())
        self.allocator = None
        for t in outputs:
            L.ggml_set_output(t.ptr)
            L.ggml_build_forward_expand(self.ptr, t.ptr)

    @property
    def n_nodes(self) -> int:
        return int(self._lib.ggml_graph_n_nodes(self.ptr))

    def node_ptrs(self) -> list[int]:
        L = self._lib
        return [L.ggml_graph_node(self.ptr, i) for i in range(L.ggml_graph_n_nodes(self.ptr))]

    def describe(self) -> list[str]:
        """One line per node: op and name (for debugging)."""
        L = self._lib
        out = []
        for p in self.node_ptrs():
            s = _tensor_from_address(p)
            out.append(f"{L.ggml_op_desc(p).decode()} {s.name.decode(errors='replace')!r} ne={tuple(s.ne)}")
        return out

    def allocate(self, target=None):
        """Give the graph's unallocated tensors memory from a graph allocator.

        ``target``: a :class:`~tide_local.ggml.backend.GraphAllocator` (shared compute
        buffer — then this graph is only valid until the allocator allocates another
        graph), a Backend or BufferType (a new allocator just for this graph), or None
        (CPU buffer type). Returns the allocator.
        """
        from tide_local.ggml.backend import GraphAllocator  # noqa: PLC0415

        alloc = target if isinstance(target, GraphAllocator) else GraphAllocator(target)
        alloc.alloc(self)
        return alloc

    def free(self) -> None:
        if self._gctx is not None:
            self._lib.ggml_free(self._gctx)
            self._gctx = None
            self.ptr = None

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"Graph({self.n_nodes if self.ptr else '?'} nodes, size={self.size})"


_DTYPE_FROM_NUMPY = {
    np.dtype(np.float32): int(GGMLType.F32),
    np.dtype(np.float16): int(GGMLType.F16),
    np.dtype(np.float64): int(GGMLType.F64),
    np.dtype(np.int8): int(GGMLType.I8),
    np.dtype(np.int16): int(GGMLType.I16),
    np.dtype(np.int32): int(GGMLType.I32),
    np.dtype(np.int64): int(GGMLType.I64),
}
