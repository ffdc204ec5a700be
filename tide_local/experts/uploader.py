"""Expert slices into device slots, asynchronously where the device can.

On an accelerator with asynchronous copies and events (CUDA, Vulkan, Metal), uploads go on a
second backend of the same device — its own stream or queue — so they run beside the compute
backend's work and the CPU's misses; each layer's copies end with an event that the compute
backend waits on, on the device, before that layer's experts run. The host never blocks on an
upload: it blocks only where it reads a result. On the CPU and the emulated device (a CPU
backend, whose copies are memcpy) a copy is made at once.
"""

from __future__ import annotations

from tide_local import ggml


def _asynchronous(backend: ggml.Backend) -> bool:
    dev = backend.device
    if dev is None or dev.type == "cpu":
        return False
    props = dev.props()
    return bool(props.get("async") and props.get("events"))


class Uploader:
    """Copies for the slot pools of one device backend (`compute`)."""

    def __init__(self, compute: ggml.Backend):
        self.compute = compute
        self.transfer: ggml.Backend | None = None
        self._events: dict[int, ggml.Event] = {}  # per layer, the end of its last copies
        self._waiting: set[int] = set()  # layers whose copies the compute backend has not waited for
        if _asynchronous(compute):
            self.transfer = ggml.Backend.from_device(compute.device)

    @property
    def asynchronous(self) -> bool:
        return self.transfer is not None

    def put(self, tensor: ggml.Tensor, data, offset: int) -> None:
        """Copy `data` (host bytes; held until the copy is done) into `tensor` at `offset`."""
        if self.transfer is None:
            tensor.set(data, offset=offset)
        else:
            self.transfer.set_async(tensor, data, offset)

    def finish(self, layer: int) -> None:
        """The copies of `layer` so far are all issued: mark their end."""
        if self.transfer is None:
            return
        event = self._events.get(layer)
        if event is None:
            event = self._events[layer] = ggml.Event(self.compute.device)
        event.record(self.transfer)
        self._waiting.add(layer)

    def ready(self, layer: int) -> None:
        """Before `layer`'s experts run on the compute backend: it waits (on the device) for the
        layer's copies."""
        if layer in self._waiting:
            self._events[layer].wait(self.compute)
            self._waiting.discard(layer)

    def drain(self) -> None:
        """Wait for every copy issued (the held host arrays are released)."""
        if self.transfer is not None:
            self.transfer.synchronize()
            self._waiting.clear()

    def close(self) -> None:
        self.drain()
        for event in self._events.values():
            event.free()
        self._events.clear()
