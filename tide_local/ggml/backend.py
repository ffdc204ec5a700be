"""Backends (compute streams on a device), the graph allocator and events.

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
serializes calls on the same backend with a lock. :func:`usable_cores` is the
default CPU thread count.

Devices and buffer types live in :mod:`tide_local.ggml.device`, buffers and host
memory wrapping in :mod:`tide_local.ggml.buffers`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping

import numpy as np

from tide_local.ggml import _lib
from tide_local.ggml._handle import OwnedHandle, status_error
from tide_local.ggml.buffers import Buffer
from tide_local.ggml.context import Context
from tide_local.ggml.device import (
    BufferType,
    Device,
    accelerator_devices,
    cpu_buffer_type,
    devices,
    note_released,
    released_count,
)
from tide_local.ggml.graph import Graph
from tide_local.ggml.tensor import Tensor

__all__ = ["Backend", "Event", "GraphAllocator", "usable_cores"]


def _L():
    return _lib.load()


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

    def __init__(self, ptr: int, device: Device | None = None, params: str | None = None):
        if not ptr:
            raise RuntimeError("backend initialization failed")
        self._lib = _L()
        self.ptr: int | None = ptr
        dev = self._lib.ggml_backend_get_device(ptr)
        self.device = device or (Device(dev) if dev else None)
        self._n_threads: int | None = None
        self._lock = threading.Lock()
        self._params = params
        # a driver that reads stale descriptor bindings: renew the backend after frees (device.py)
        self._renew = self.device is not None and self.device.reads_unused_descriptors
        self._released_seen = released_count(self.device) if self._renew else 0
        self._pending: list = []  # host arrays referenced by in-flight async copies

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
        backend = cls(ptr, device, params)
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

    # ---- memory
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

    # ---- asynchronous transfers
    def set_async(self, tensor: Tensor, array, offset: int | None = None) -> None:
        """Start copying ``array`` into ``tensor`` (whole tensor, or bytes from ``offset``) on this
        backend's queue. The array is held until :meth:`synchronize`; do not modify it before then.
        (A backend without asynchronous copies, the CPU's, copies at once.)"""
        arr = tensor._as_source(array, offset)
        tensor._ensure_data()
        off = offset or 0
        tensor._check_range(off, arr.nbytes)
        self._pending.append(arr)
        self._lib.ggml_backend_tensor_set_async(self._p(), tensor.ptr, arr.ctypes.data, off, arr.nbytes)

    def synchronize(self) -> None:
        """Wait for queued copies and compute on this backend; the held arrays are released."""
        self._lib.ggml_backend_synchronize(self._p())
        self._pending.clear()

    # ---- compute
    def compute(self, graph: Graph, inputs: Mapping[Tensor, np.ndarray] | None = None) -> None:
        """Run the graph to completion (allocating it on this backend first if needed).

        ``inputs`` maps input tensors to numpy arrays copied in before computing. The GIL
        is released while ggml computes.
        """
        with self._lock:
            if graph.ptr is None:
                raise RuntimeError("the graph was freed")
            if graph.allocator is None:
                GraphAllocator(self).alloc(graph)
            if inputs:
                for t, arr in inputs.items():
                    t.set(arr)
            if self._renew and released_count(self.device) != self._released_seen:
                self._renew_backend()
            status = self._lib.ggml_backend_graph_compute(self._p(), graph.ptr)
        if status != _lib.GGML_STATUS_SUCCESS:
            raise status_error(status, f"{self.name} graph compute")

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

    def _renew_backend(self) -> None:
        """Replace the ggml backend by a fresh one on the same device (same buffers, new
        descriptor sets and scratch), after device memory was freed; see device.py."""
        L = self._lib
        fresh = L.ggml_backend_dev_init(self.device.ptr, self._params.encode() if self._params else None)
        if not fresh:
            raise RuntimeError(f"cannot renew the backend on {self.device!r}")
        L.ggml_backend_synchronize(self._p())
        L.ggml_backend_free(self.ptr)
        self.ptr = fresh
        self._released_seen = released_count(self.device)
        if self._n_threads is not None and not self.is_cpu:
            self.n_threads = self._n_threads

    # ---- lifetime
    def free(self) -> None:
        if self.ptr is not None:
            self._lib.ggml_backend_free(self.ptr)
            self.ptr = None

    def __repr__(self) -> str:
        if self.ptr is None:
            return "Backend(freed)"
        extra = f", n_threads={self._n_threads}" if self._n_threads else ""
        return f"Backend({self.name!r}{extra})"


class GraphAllocator(OwnedHandle):
    """A compute buffer that ggml-alloc packs a graph's intermediate tensors into.

    ``alloc(graph)`` gives every unallocated tensor of the graph memory (tensors that
    already have memory, e.g. weights, are left alone). The buffer is reused between
    graphs: after allocating graph B, a graph A allocated earlier by the same allocator
    must not be computed again. Give each graph you keep around its own allocator
    (``GraphAllocator(backend).alloc(graph)``), or rebuild graphs.
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
        before = self.size
        ok = self._lib.ggml_gallocr_reserve(self._p(), graph.ptr)
        self._note_regrown(before)
        if not ok:
            raise MemoryError(f"cannot reserve a {self.buffer_type.name} compute buffer for {graph!r}")

    def _note_regrown(self, before: int) -> None:
        # ggml-alloc frees the old compute buffer when it allocates a larger one
        if before and self.size != before:
            note_released(self.buffer_type.ptr)

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
        before = self.size
        ok = self._lib.ggml_gallocr_alloc_graph(self._p(), graph.ptr)
        self._note_regrown(before)
        if not ok:
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
            if self.size:
                note_released(self.buffer_type.ptr)
            self._lib.ggml_gallocr_free(self.ptr)
            self.ptr = None

    def __repr__(self) -> str:
        return f"GraphAllocator({self.buffer_type.name}, {self.size if self.ptr else 0} bytes)"


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
