"""Tensor handles: a pointer into a ggml context plus its metadata and data transfers.

Shape conventions
-----------------
* ``Tensor.ne`` is ggml's order, always 4 entries: ``ne[0]`` is the fastest-varying
  (contiguous) dimension. A row-major numpy array of shape ``(a, b, c)`` has
  ``ne == (c, b, a, 1)``.
* ``Tensor.shape`` is numpy order, ``tuple(reversed(ne[:ndim]))``. ``ndim`` is the
  number of dimensions the tensor was created with (or, for op results, what the op
  naturally produces; trailing ggml dims of 1 are not counted).
* Every op parameter that names dimensions (``reshape``, ``view``, ``permute``,
  ``new_tensor(ne=...)``) uses ggml order, like llama.cpp code does. Only
  ``new_tensor(shape=...)``, ``Tensor.shape`` and numpy transfers use numpy order.

``Tensor.set``/``Tensor.get`` copy synchronously through ggml-backend, so they work
for host and device memory alike.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from tide_local.ggml import _lib
from tide_local.ggml.quant import GGMLType, numpy_dtype, type_name

if TYPE_CHECKING:
    from tide_local.ggml.context import Context

__all__ = ["Tensor"]

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
