"""Backend buffers: memory that tensors are placed in, including wrapped host memory.

A :class:`Buffer` is allocated by a backend (``Backend.alloc_tensors``) or wraps
memory that already exists (:func:`wrap_host_memory`: a numpy array or a GGUF file's
mmap, without copying). :meth:`Buffer.place` puts a tensor at a byte offset in it,
which is how model weights are read in place from the mmapped file.

Buffers over read-only memory are recorded in ``_lib.READONLY_BUFFERS`` so that
``Tensor.set`` refuses to write there instead of crashing the process.
"""

from __future__ import annotations

import numpy as np

from tide_local.ggml import _lib
from tide_local.ggml._handle import OwnedHandle, status_error
from tide_local.ggml.device import BufferType, note_released
from tide_local.ggml.tensor import Tensor

__all__ = ["Buffer", "aligned_empty", "wrap_host_memory"]


def _L():
    return _lib.load()


class Buffer(OwnedHandle):
    """A ggml backend buffer. Freed by :meth:`free` or when garbage collected.

    ``owner`` keeps wrapped host memory (numpy array, mmap, ...) alive as long as the
    buffer exists.
    """

    def __init__(self, ptr: int, owner=None, readonly: bool = False):
        self.ptr: int | None = ptr
        self.owner = owner
        self.readonly = readonly
        self._lib = _L()
        if readonly:
            _lib.READONLY_BUFFERS.add(ptr)

    def _p(self) -> int:
        if self.ptr is None:
            raise RuntimeError("the buffer was freed")
        return self.ptr

    @property
    def name(self) -> str:
        return self._lib.ggml_backend_buffer_name(self._p()).decode()

    @property
    def size(self) -> int:
        return int(self._lib.ggml_backend_buffer_get_size(self._p()))

    @property
    def base(self) -> int:
        """Base address (host address for host buffers, a device address otherwise)."""
        return self._lib.ggml_backend_buffer_get_base(self._p()) or 0

    @property
    def is_host(self) -> bool:
        return bool(self._lib.ggml_backend_buffer_is_host(self._p()))

    @property
    def buffer_type(self) -> BufferType:
        return BufferType(self._lib.ggml_backend_buffer_get_type(self._p()))

    @property
    def alignment(self) -> int:
        return int(self._lib.ggml_backend_buffer_get_alignment(self._p()))

    def set_usage(self, usage: str | int) -> None:
        """``"weights"``, ``"compute"`` or ``"any"``."""
        u = {"any": _lib.BUFFER_USAGE_ANY, "weights": _lib.BUFFER_USAGE_WEIGHTS, "compute": _lib.BUFFER_USAGE_COMPUTE}
        self._lib.ggml_backend_buffer_set_usage(self._p(), u[usage] if isinstance(usage, str) else int(usage))

    def clear(self, value: int = 0) -> None:
        """Fill the whole buffer with a byte value."""
        if self.readonly:
            raise ValueError("cannot clear a buffer over read-only memory")
        self._lib.ggml_backend_buffer_clear(self._p(), int(value))

    def alloc_size(self, tensor: Tensor) -> int:
        return int(self._lib.ggml_backend_buffer_get_alloc_size(self._p(), tensor.ptr))

    def place(self, tensor: Tensor, offset: int) -> None:
        """Put an unallocated tensor at byte ``offset`` of this buffer (ggml_backend_tensor_alloc).

        The tensor then reads/writes the buffer's memory in place: for a buffer from
        :func:`wrap_host_memory` that is the wrapped memory itself (no copy). The
        tensor's context keeps this buffer alive.
        """
        s = tensor.struct
        if s.buffer or s.data is not None:
            raise ValueError(f"{tensor!r} already has memory")
        if s.view_src:
            raise ValueError(f"{tensor!r} is a view; place its source tensor instead")
        offset = int(offset)
        need = self.alloc_size(tensor)
        if offset < 0 or offset + need > self.size:
            raise ValueError(f"{tensor!r} needs bytes [{offset}, {offset + need}) but the buffer has {self.size}")
        status = self._lib.ggml_backend_tensor_alloc(self._p(), tensor.ptr, self.base + offset)
        if status != _lib.GGML_STATUS_SUCCESS:
            raise status_error(status, "ggml_backend_tensor_alloc")
        tensor.ctx.keep_alive(self)

    def free(self) -> None:
        """Free now. Tensors placed in this buffer must not be used afterwards."""
        if self.ptr is not None:
            _lib.READONLY_BUFFERS.discard(self.ptr)
            if not self._lib.ggml_backend_buffer_is_host(self.ptr):
                note_released(self._lib.ggml_backend_buffer_get_type(self.ptr))
            self._lib.ggml_backend_buffer_free(self.ptr)
            self.ptr = None
        self.owner = None

    def __repr__(self) -> str:
        if self.ptr is None:
            return "Buffer(freed)"
        return f"Buffer({self.name!r}, {self.size} bytes)"


def _host_address(obj, size: int | None) -> tuple[int, int, object, bool]:
    """(address, size, owner, readonly) of host memory given as array/buffer/address."""
    if isinstance(obj, int):
        if size is None:
            raise ValueError("wrapping a raw address needs size=")
        return obj, int(size), None, False
    if isinstance(obj, np.ndarray):
        arr = obj
    else:
        try:
            arr = np.frombuffer(obj, dtype=np.uint8)
        except TypeError:
            arr = np.frombuffer(memoryview(obj).cast("B"), dtype=np.uint8)
    if not arr.flags.c_contiguous:
        raise ValueError("host memory to wrap must be C-contiguous")
    n = arr.nbytes if size is None else int(size)
    if n > arr.nbytes:
        raise ValueError(f"size {n} exceeds the object's {arr.nbytes} bytes")
    return arr.ctypes.data, n, arr, not arr.flags.writeable


def _wrap_host(obj, size: int | None, keepalive, wrap, what: str) -> Buffer:
    """A :class:`Buffer` over host memory (argument rules of :func:`wrap_host_memory`);
    ``wrap(address, size)`` makes the ggml buffer, ``what`` names it in the error."""
    addr, n, owner, readonly = _host_address(obj, size)
    _check_alignment(addr)
    ptr = wrap(addr, n)
    if not ptr:
        raise MemoryError(f"{what} failed")
    return Buffer(ptr, owner=(owner, keepalive) if keepalive is not None else owner, readonly=readonly)


def wrap_host_memory(obj, size: int | None = None, *, keepalive=None) -> Buffer:
    """Wrap existing host memory as a CPU backend buffer, without copying.

    ``obj``: a numpy array, any buffer-protocol object (``mmap.mmap``, bytearray, ...),
    or an integer address (then ``size`` is required and ``keepalive`` should hold
    whatever owns the memory). The start address must be 32-byte aligned (mmapped
    files are page aligned; for numpy use :func:`aligned_empty`). Place tensors in it
    with :meth:`Buffer.place`. The buffer keeps ``obj`` alive; closing an mmap that is
    still wrapped raises ``BufferError``.
    """
    return _wrap_host(
        obj, size, keepalive, lambda addr, n: _L().ggml_backend_cpu_buffer_from_ptr(addr, n),
        "ggml_backend_cpu_buffer_from_ptr",
    )


def _check_alignment(addr: int) -> None:
    if addr % _lib.TENSOR_ALIGNMENT:
        raise ValueError(
            f"host memory at {addr:#x} is not {_lib.TENSOR_ALIGNMENT}-byte aligned (ggml requires it); "
            "use an aligned array (tide_local.ggml.aligned_empty) or an mmap"
        )


def aligned_empty(shape, dtype=np.uint8, alignment: int = 64) -> np.ndarray:
    """Uninitialized C-contiguous numpy array whose data starts on an ``alignment`` boundary."""
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    return raw[start : start + n].view(dtype).reshape(shape)

