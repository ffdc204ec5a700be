"""Devices, backends, buffers and graph allocators (ggml-backend / ggml-alloc).

Typical use::

    cpu = Backend.cpu(n_threads=8)
    weights = Context(max_tensors=...)
    w = weights.new_tensor(GGMLType.Q4_K, ne=(K, M, n_expert), name="ffn_up_exps")
    mm = wrap_host_memory(np.frombuffer(mmap_obj, dtype=np.uint8))   # zero-copy
    mm.place(w, offset=tensor_data_offset)                           # w reads the file bytes
    weights.keep_alive(mm)

    g = Context()
    x = g.new_tensor(GGMLType.F32, ne=(K, n_tokens), name="x", input=True)
    y = g.mul_mat(w, x)
    graph = g.build_graph(y)
    cpu.compute(graph, {x: x_np})   # allocates the graph on first use
    out = y.get()                   # numpy (n_tokens, M)

Thread-safety: ctypes releases the GIL during every C call, so compute on one
backend can run in a worker thread while Python (or another backend) works.
A single backend must not compute two graphs at once; :meth:`Backend.compute`
serializes calls on the same backend with a lock.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping

import numpy as np

from tide_local.ggml import _lib
from tide_local.ggml.core import Context, Graph, OwnedHandle, Tensor

__all__ = [
    "Backend",
    "Buffer",
    "BufferType",
    "Device",
    "Event",
    "GraphAllocator",
    "cpu_buffer_type",
    "devices",
    "wrap_host_memory",
]


def _L():
    return _lib.load()


def _status_error(status: int, what: str) -> RuntimeError:
    s = _L().ggml_status_to_string(status)
    return RuntimeError(f"{what} failed: {(s or b'?').decode()} (status {status})")


# --------------------------------------------------------------------------- devices


class Device:
    """A ggml backend device (CPU, a GPU, ...)."""

    __slots__ = ("ptr", "index")

    def __init__(self, ptr: int, index: int | None = None):
        self.ptr = ptr
        self.index = index

    @property
    def name(self) -> str:
        return _L().ggml_backend_dev_name(self.ptr).decode()

    @property
    def description(self) -> str:
        return (_L().ggml_backend_dev_description(self.ptr) or b"").decode()

    @property
    def type(self) -> str:
        """``"cpu"``, ``"gpu"``, ``"igpu"``, ``"accel"`` or ``"meta"``."""
        return _lib.DEV_TYPE_NAMES.get(_L().ggml_backend_dev_type(self.ptr), "unknown")

    @property
    def is_accelerator(self) -> bool:
        return self.type in ("gpu", "igpu")

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _L().ggml_backend_dev_memory(self.ptr, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def props(self) -> dict:
        p = _lib.ggml_backend_dev_props()
        _L().ggml_backend_dev_get_props(self.ptr, ctypes.byref(p))
        caps = p.caps
        return {
            "name": (p.name or b"").decode(),
            "description": (p.description or b"").decode(),
            "memory_free": p.memory_free,
            "memory_total": p.memory_total,
            "type": _lib.DEV_TYPE_NAMES.get(p.type, "unknown"),
            "device_id": (p.device_id or b"").decode() or None,
            "async": caps.async_,
            "host_buffer": caps.host_buffer,
            "buffer_from_host_ptr": caps.buffer_from_host_ptr,
            "events": caps.events,
            "mmap_support": caps.mmap_support,
        }

    @property
    def buffer_type(self) -> BufferType:
        return BufferType(_L().ggml_backend_dev_buffer_type(self.ptr))

    @property
    def host_buffer_type(self) -> BufferType | None:
        """Pinned host memory for fast uploads to this device (None if it has none)."""
        ptr = _L().ggml_backend_dev_host_buffer_type(self.ptr)
        return BufferType(ptr) if ptr else None

    def init(self, params: str | None = None) -> Backend:
        return Backend.from_device(self, params)

    def wrap_host_memory(self, obj, size: int | None = None, *, max_tensor_size: int | None = None, keepalive=None) -> Buffer:
        """Host memory as a buffer this device can use directly (ggml_backend_dev_buffer_from_host_ptr).

        Only for devices whose ``props()["buffer_from_host_ptr"]`` is true (the CPU;
        some integrated GPUs). Same argument rules as :func:`wrap_host_memory`.
        """
        if not self.props()["buffer_from_host_ptr"]:
            raise ValueError(f"{self.name} cannot use host memory directly")
        addr, n, owner, readonly = _host_address(obj, size)
        _check_alignment(addr)
        ptr = _L().ggml_backend_dev_buffer_from_host_ptr(self.ptr, addr, n, int(max_tensor_size or n))
        if not ptr:
            raise MemoryError(f"{self.name}: cannot wrap {n} bytes of host memory")
        return Buffer(ptr, owner=(owner, keepalive) if keepalive is not None else owner, readonly=readonly)

    def __eq__(self, other) -> bool:
        return isinstance(other, Device) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)

    def __repr__(self) -> str:
        return f"Device({self.name!r}, {self.type}, {self.description!r})"


def devices() -> list[Device]:
    """Every registered device (the CPU is always one of them)."""
    L = _L()
    return [Device(L.ggml_backend_dev_get(i), i) for i in range(L.ggml_backend_dev_count())]


def accelerator_devices() -> list[Device]:
    """GPU/iGPU devices (empty on a CPU-only build or machine)."""
    return [d for d in devices() if d.is_accelerator]


# --------------------------------------------------------------------------- buffers


class BufferType:
    """A kind of memory a backend can allocate (device memory, host memory, pinned host ...)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        if not ptr:
            raise ValueError("null buffer type")
        self.ptr = ptr

    @property
    def name(self) -> str:
        return _L().ggml_backend_buft_name(self.ptr).decode()

    @property
    def alignment(self) -> int:
        return int(_L().ggml_backend_buft_get_alignment(self.ptr))

    @property
    def max_size(self) -> int:
        return int(_L().ggml_backend_buft_get_max_size(self.ptr))

    @property
    def is_host(self) -> bool:
        return bool(_L().ggml_backend_buft_is_host(self.ptr))

    @property
    def device(self) -> Device | None:
        ptr = _L().ggml_backend_buft_get_device(self.ptr)
        return Device(ptr) if ptr else None

    def alloc_size(self, tensor: Tensor) -> int:
        """Bytes a tensor takes in this buffer type (may exceed nbytes for padding)."""
        return int(_L().ggml_backend_buft_get_alloc_size(self.ptr, tensor.ptr))

    def alloc(self, size: int) -> Buffer:
        ptr = _L().ggml_backend_buft_alloc_buffer(self.ptr, int(size))
        if not ptr:
            raise MemoryError(f"cannot allocate {size} bytes of {self.name}")
        return Buffer(ptr)

    def __eq__(self, other) -> bool:
        return isinstance(other, BufferType) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)

    def __repr__(self) -> str:
        return f"BufferType({self.name!r})"


def cpu_buffer_type() -> BufferType:
    return BufferType(_L().ggml_backend_cpu_buffer_type())


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
            raise _status_error(status, "ggml_backend_tensor_alloc")
        tensor.ctx.keep_alive(self)

    def free(self) -> None:
        """Free now. Tensors placed in this buffer must not be used afterwards."""
        if self.ptr is not None:
            _lib.READONLY_BUFFERS.discard(self.ptr)
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


def wrap_host_memory(obj, size: int | None = None, *, keepalive=None) -> Buffer:
    """Wrap existing host memory as a CPU backend buffer, without copying.

    ``obj``: a numpy array, any buffer-protocol object (``mmap.mmap``, bytearray, ...),
    or an integer address (then ``size`` is required and ``keepalive`` should hold
    whatever owns the memory). The start address must be 32-byte aligned (mmapped
    files are page aligned; for numpy use :func:`aligned_empty`). Place tensors in it
    with :meth:`Buffer.place`. The buffer keeps ``obj`` alive; closing an mmap that is
    still wrapped raises ``BufferError``.
    """
    addr, n, owner, readonly = _host_address(obj, size)
    _check_alignment(addr)
    ptr = _L().ggml_backend_cpu_buffer_from_ptr(addr, n)
    if not ptr:
        raise MemoryError("ggml_backend_cpu_buffer_from_ptr failed")
    return Buffer(ptr, owner=(owner, keepalive) if keepalive is not None else owner, readonly=readonly)


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


class Event(OwnedHandle):
    """A device event for ordering work between backends (only on devices with ``events`` in props)."""

    def __init__(self, device: Device):
        self._lib = _L()
        self.ptr: int | None = self._lib.ggml_backend_event_new(device.ptr)
        if not self.ptr:
            raise ValueError(f"{device.name} does not support events")

    def record(self, backend: Backend) -> None:
        """Mark the current end of ``backend``'s queue."""
        self._lib.ggml_backend_event_record(self.ptr, backend._p())

    def synchronize(self) -> None:
        """Block the host until the recorded point is reached."""
        self._lib.ggml_backend_event_synchronize(self.ptr)

    def wait(self, backend: Backend) -> None:
        """Make ``backend`` wait (on the device) for the recorded point."""
        self._lib.ggml_backend_event_wait(backend._p(), self.ptr)

    def free(self) -> None:
        if self.ptr is not None:
            self._lib.ggml_backend_event_free(self.ptr)
            self.ptr = None


# --------------------------------------------------------------------------- graph allocator


class GraphAllocator(OwnedHandle):
    """A compute buffer that ggml-alloc packs a graph's intermediate tensors into.

    ``alloc(graph)`` gives every unallocated tensor of the graph memory (tensors that
    already have memory, e.g. weights, are left alone). The buffer is reused between
    graphs: after allocating graph B, a graph A allocated earlier by the same allocator
    must not be computed again. Give each graph you keep around its own allocator
    (``graph.allocate(backend)`` does), or rebuild graphs.
    """

    def __init__(self, target=None):
        if target is None:
            buft = cpu_buffer_type()
        elif isinstance(target, Backend):
            buft = target.buffer_type
        elif isinstance(target, BufferType):
            buft = target
        else:
            raise TypeError(f"GraphAllocator needs a Backend or BufferType, not {type(target).__name__}")
        self.buffer_type = buft
        self._lib = _L()
        self.ptr: int | None = self._lib.ggml_gallocr_new(buft.ptr)
        if not self.ptr:
            raise MemoryError("ggml_gallocr_new failed")

    def reserve(self, graph: Graph) -> None:
        """Size the compute buffer for a worst-case graph (optional; alloc grows it too)."""
        if not self._lib.ggml_gallocr_reserve(self._p(), graph.ptr):
            raise MemoryError(f"cannot reserve a {self.buffer_type.name} compute buffer for {graph!r}")

    def bind(self, graphs: list[Graph]) -> bool:
        """Give several graphs fixed addresses in this one shared buffer.

        ggml assigns a node its address once and never moves it, and frees the buffer
        when a larger graph needs more. So all graphs are reserved first (the buffer
        reaches its final size), then allocated. Returns True when the buffer grew:
        graphs bound earlier then point into freed memory and must be rebuilt.
        Graphs bound together may share memory: compute them one at a time and read
        an output before computing the next.
        """
        size = self.size
        for g in graphs:
            self.reserve(g)
        for g in graphs:
            self.alloc(g)
        return self.size != size

    def alloc(self, graph: Graph) -> None:
        if not self._lib.ggml_gallocr_alloc_graph(self._p(), graph.ptr):
            raise MemoryError(f"cannot allocate {graph!r} in a {self.buffer_type.name} compute buffer")
        graph.allocator = self
        for ctx in graph.contexts:
            ctx.keep_alive(self)

    @property
    def size(self) -> int:
        """Bytes of the compute buffer."""
        return int(self._lib.ggml_gallocr_get_buffer_size(self._p(), 0))

    def _p(self) -> int:
        if self.ptr is None:
            raise RuntimeError("the graph allocator was freed")
        return self.ptr

    def free(self) -> None:
        if self.ptr is not None:
            self._lib.ggml_gallocr_free(self.ptr)
            self.ptr = None

    def __repr__(self) -> str:
        return f"GraphAllocator({self.buffer_type.name}, {self.size if self.ptr else 0} bytes)"


# --------------------------------------------------------------------------- backends


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one): the default
    thread count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Backend(OwnedHandle):
    """A ggml backend stream on one device: computes graphs, moves tensor data.

    Create with :meth:`cpu` or :meth:`from_device`. Several CPU backends may coexist
    (each has its own thread count and work buffer), which is how a second,
    "emulated" device can be made on machines without an accelerator.
    """

    def __init__(self, ptr: int, device: Device | None = None):
        if not ptr:
            raise RuntimeError("backend initialization failed")
        self._lib = _L()
        self.ptr: int | None = ptr
        dev = self._lib.ggml_backend_get_device(ptr)
        self.device = device or (Device(dev) if dev else None)
        self._n_threads: int | None = None
        self._pending: list = []  # host arrays referenced by in-flight async copies
        self._lock = threading.Lock()

    # ---- construction
    @classmethod
    def cpu(cls, n_threads: int | None = None) -> Backend:
        """A new CPU backend using ``n_threads`` threads (default: the CPUs this process may use)."""
        L = _L()
        ptr = L.ggml_backend_cpu_init() if L.ggml_backend_cpu_init is not None else None
        if not ptr:
            ptr = L.ggml_backend_init_by_type(_lib.DEV_TYPE_CPU, None)
        backend = cls(ptr)
        backend.n_threads = n_threads or usable_cores()
        return backend

    @classmethod
    def from_device(cls, device: Device | int | str, params: str | None = None) -> Backend:
        """A backend on a device given as a :class:`Device`, index into :func:`devices` or name."""
        L = _L()
        if isinstance(device, int):
            n = L.ggml_backend_dev_count()
            if not 0 <= device < n:
                raise ValueError(f"device index {device} out of range (there are {n} devices)")
            device = Device(L.ggml_backend_dev_get(device), device)
        elif isinstance(device, str):
            ptr = L.ggml_backend_dev_by_name(device.encode())
            if not ptr:
                names = ", ".join(d.name for d in devices())
                raise ValueError(f"no ggml device named {device!r} (have: {names})")
            device = Device(ptr)
        ptr = L.ggml_backend_dev_init(device.ptr, params.encode() if params else None)
        if not ptr:
            raise RuntimeError(f"cannot initialize a backend on {device!r}")
        backend = cls(ptr, device)
        if device.type == "cpu":
            backend.n_threads = usable_cores()
        return backend

    @classmethod
    def best_accelerator(cls) -> Backend | None:
        """A backend on the first GPU/iGPU device, or None if there is none."""
        devs = accelerator_devices()
        return cls.from_device(devs[0]) if devs else None

    # ---- properties
    def _p(self) -> int:
        if self.ptr is None:
            raise RuntimeError("the backend was freed")
        return self.ptr

    @property
    def name(self) -> str:
        return self._lib.ggml_backend_name(self._p()).decode()

    @property
    def is_cpu(self) -> bool:
        return self.device is not None and self.device.type == "cpu"

    @property
    def buffer_type(self) -> BufferType:
        """The backend's default buffer type (device memory for a GPU)."""
        return BufferType(self._lib.ggml_backend_get_default_buffer_type(self._p()))

    @property
    def alignment(self) -> int:
        return int(self._lib.ggml_backend_get_alignment(self._p()))

    @property
    def n_threads(self) -> int | None:
        return self._n_threads

    @n_threads.setter
    def n_threads(self, n: int) -> None:
        n = int(n)
        if n < 1:
            raise ValueError("n_threads must be >= 1")
        L = self._lib
        if self.is_cpu and L.ggml_backend_cpu_set_n_threads is not None:
            L.ggml_backend_cpu_set_n_threads(self._p(), n)
        else:
            fn = self._proc("ggml_backend_set_n_threads", _lib.ggml_backend_set_n_threads_t)
            if fn is None:
                raise ValueError(f"backend {self.name} has no thread count")
            fn(self._p(), n)
        self._n_threads = n

    def _proc(self, name: str, prototype):
        if self.device is None:
            return None
        L = self._lib
        reg = L.ggml_backend_dev_backend_reg(self.device.ptr)
        addr = L.ggml_backend_reg_get_proc_address(reg, name.encode()) if reg else None
        return prototype(addr) if addr else None

    def supports(self, tensor: Tensor) -> bool:
        """Whether this backend can compute the op producing ``tensor``."""
        return bool(self._lib.ggml_backend_supports_op(self._p(), tensor.ptr))

    def supports_buffer_type(self, buft: BufferType) -> bool:
        return bool(self._lib.ggml_backend_supports_buft(self._p(), buft.ptr))

    # ---- memory
    def alloc_buffer(self, size: int) -> Buffer:
        """A buffer of the default type; place tensors into it with :meth:`Buffer.place`."""
        ptr = self._lib.ggml_backend_alloc_buffer(self._p(), int(size))
        if not ptr:
            raise MemoryError(f"{self.name}: cannot allocate {size} bytes")
        return Buffer(ptr)

    def alloc_tensors(self, ctx: Context, buffer_type: BufferType | None = None, usage: str | None = None) -> Buffer | None:
        """One buffer holding every not-yet-allocated tensor of ``ctx``.

        Returns None if there was nothing to allocate. The context keeps the buffer alive.
        """
        ctx._check_alive()
        buft = buffer_type or self.buffer_type
        L = self._lib
        if L.ggml_backend_alloc_ctx_tensors_from_buft_size(ctx.ptr, buft.ptr) == 0:
            return None
        ptr = L.ggml_backend_alloc_ctx_tensors_from_buft(ctx.ptr, buft.ptr)
        if not ptr:
            raise MemoryError(f"{self.name}: cannot allocate the tensors of {ctx!r}")
        buf = Buffer(ptr)
        if usage:
            buf.set_usage(usage)
        ctx.keep_alive(buf)
        return buf

    # ---- transfers
    def set_async(self, tensor: Tensor, array, offset: int | None = None) -> None:
        """Start copying ``array`` into ``tensor`` (whole tensor, or bytes from ``offset``).

        The array is held until :meth:`synchronize`; do not modify it before then.
        """
        arr = tensor._as_source(array, offset)
        tensor._ensure_data()
        off = offset or 0
        tensor._check_range(off, arr.nbytes)
        self._pending.append(arr)
        self._lib.ggml_backend_tensor_set_async(self._p(), tensor.ptr, arr.ctypes.data, off, arr.nbytes)

    def get_async(self, tensor: Tensor, out: np.ndarray, offset: int = 0) -> None:
        """Start copying ``tensor`` bytes [offset, offset+out.nbytes) into ``out``; valid after synchronize()."""
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("out must be a writeable C-contiguous array")
        tensor._ensure_data()
        tensor._check_range(offset, out.nbytes)
        self._pending.append(out)
        self._lib.ggml_backend_tensor_get_async(self._p(), tensor.ptr, out.ctypes.data, offset, out.nbytes)

    def copy(self, src: Tensor, dst: Tensor, *, async_from: Backend | None = None) -> None:
        """Copy tensor data between backends (same type and size).

        With ``async_from`` (the source's backend) the copy is queued after that
        backend's work and this backend waits for it (ggml_backend_tensor_copy_async).
        """
        if src.nbytes != dst.nbytes or src.dtype != dst.dtype:
            raise ValueError(f"copy: {src!r} and {dst!r} differ in type or size")
        src._ensure_data()
        dst._ensure_data()
        if async_from is None:
            self._lib.ggml_backend_tensor_copy(src.ptr, dst.ptr)
        else:
            self._lib.ggml_backend_tensor_copy_async(async_from._p(), self._p(), src.ptr, dst.ptr)

    def synchronize(self) -> None:
        """Wait for queued copies and compute on this backend."""
        self._lib.ggml_backend_synchronize(self._p())
        self._pending.clear()

    # ---- compute
    def _prepare(self, graph: Graph, inputs: Mapping[Tensor, np.ndarray] | None) -> None:
        if graph.ptr is None:
            raise RuntimeError("the graph was freed")
        if graph.allocator is None:
            GraphAllocator(self).alloc(graph)
        if inputs:
            for t, arr in inputs.items():
                t.set(arr)

    def compute(self, graph: Graph, inputs: Mapping[Tensor, np.ndarray] | None = None) -> None:
        """Run the graph to completion (allocating it on this backend first if needed).

        ``inputs`` maps input tensors to numpy arrays copied in before computing. The GIL
        is released while ggml computes.
        """
        with self._lock:
            self._prepare(graph, inputs)
            status = self._lib.ggml_backend_graph_compute(self._p(), graph.ptr)
        if status != _lib.GGML_STATUS_SUCCESS:
            raise _status_error(status, f"{self.name} graph compute")

    def compute_async(self, graph: Graph, inputs: Mapping[Tensor, np.ndarray] | None = None) -> None:
        """Queue the graph (returns at once on asynchronous backends); call :meth:`synchronize`."""
        self._prepare(graph, inputs)
        status = self._lib.ggml_backend_graph_compute_async(self._p(), graph.ptr)
        if status != _lib.GGML_STATUS_SUCCESS:
            raise _status_error(status, f"{self.name} graph compute")

    def check_graph(self, graph: Graph) -> None:
        """Raise ValueError if a node's op is unsupported here or a tensor lives in a buffer
        this backend cannot read (walks the graph; call once per built graph, not per step)."""
        L = self._lib
        seen_bufts: dict[int, bool] = {}
        for p in graph.node_ptrs():
            if not L.ggml_backend_supports_op(self._p(), p):
                s = _lib.ggml_tensor.from_address(p)
                raise ValueError(f"{self.name} cannot compute {L.ggml_op_desc(p).decode()} ({s.name.decode()!r})")
            s = _lib.ggml_tensor.from_address(p)
            for src in s.src:
                if not src:
                    continue
                c = src.contents
                buf = c.buffer or (c.view_src.contents.buffer if c.view_src else None)
                if not buf:
                    continue
                buft = L.ggml_backend_buffer_get_type(buf)
                ok = seen_bufts.get(buft)
                if ok is None:
                    ok = seen_bufts[buft] = bool(L.ggml_backend_supports_buft(self._p(), buft))
                if not ok:
                    raise ValueError(
                        f"{self.name} cannot read tensor {c.name.decode()!r} in a "
                        f"{L.ggml_backend_buft_name(buft).decode()} buffer"
                    )

    # ---- lifetime
    def free(self) -> None:
        if self.ptr is not None:
            self._lib.ggml_backend_free(self.ptr)
            self.ptr = None
        self._pending.clear()

    def __repr__(self) -> str:
        if self.ptr is None:
            return "Backend(freed)"
        extra = f", n_threads={self._n_threads}" if self._n_threads else ""
        return f"Backend({self.name!r}{extra})"
