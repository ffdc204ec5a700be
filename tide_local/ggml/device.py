"""Devices and the kinds of memory they offer (ggml-backend's device registry).

A :class:`Device` is what ggml registered at load time (the CPU always, GPUs in an
accelerator build); a :class:`BufferType` is one kind of memory a device or backend
allocates from. Backends (:mod:`tide_local.ggml.backend`) are created on a device;
buffers (:mod:`tide_local.ggml.buffers`) are allocated from a buffer type.
"""

from __future__ import annotations

import ctypes

from tide_local.ggml import _lib

__all__ = ["BufferType", "Device", "accelerator_devices", "cpu_buffer_type", "devices"]


def _L():
    return _lib.load()


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

    @property
    def reads_unused_descriptors(self) -> bool:
        """Whether its driver touches every binding of a bound descriptor set (see
        :func:`note_released`): then a backend on it is renewed after device memory is freed."""
        return self.description.startswith(_READS_UNUSED_DESCRIPTORS)

    def memory(self) -> tuple[int, int]:
        """(free, total) bytes."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        _L().ggml_backend_dev_memory(self.ptr, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def props(self) -> dict:
        """ggml's description of the device, including what it can do (``events``,
        ``buffer_from_host_ptr``, ...)."""
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


# Vulkan drivers that, on vkCmdBindDescriptorSets, read every binding of the set, also those
# the pipeline does not use: Mesa's lavapipe before 23.1 (Debian 12 ships 22.3; its device
# description does not say which Mesa, so every lavapipe counts). ggml-vulkan gives all its
# pipelines one 12-binding set layout and rewrites only the bindings a pipeline uses, so a
# set keeps bindings to buffers an earlier graph used. Once such a buffer is freed (a
# pass's state, a compute buffer that grew), binding that set again makes lavapipe take a
# reference on the freed buffer: heap corruption in the process (lavapipe's device memory
# is host memory), aborting in a later malloc. The Vulkan spec allows stale bindings a
# pipeline does not use, so ggml is within its rights and real GPUs are unaffected. What we
# do: count device memory released per device here, and renew a backend on such a device
# (fresh descriptor sets) before it computes after a release (``Backend.compute``).
_READS_UNUSED_DESCRIPTORS = ("llvmpipe",)
_released: dict[int, int] = {}  # device address -> buffers of its memory released so far


def note_released(buffer_type_ptr: int) -> None:
    """A buffer of this buffer type's device memory was (or is about to be) freed."""
    dev = _L().ggml_backend_buft_get_device(buffer_type_ptr)
    if dev:
        _released[dev] = _released.get(dev, 0) + 1


def released_count(device: Device) -> int:
    """How many buffers of the device's memory were released so far (see :func:`note_released`)."""
    return _released.get(device.ptr, 0)


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

    def __eq__(self, other) -> bool:
        return isinstance(other, BufferType) and other.ptr == self.ptr

    def __hash__(self) -> int:
        return hash(self.ptr)

    def __repr__(self) -> str:
        return f"BufferType({self.name!r})"


def cpu_buffer_type() -> BufferType:
    """Plain host memory, as the CPU backend allocates it."""
    return BufferType(_L().ggml_backend_cpu_buffer_type())
