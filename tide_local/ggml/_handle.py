"""What every wrapper of an owned ggml object shares: freeing it, and turning a failed
``ggml_status`` into an exception.

Contexts, buffers, graph allocators, backends and events each own one C object that
must be released exactly once; :class:`OwnedHandle` gives them the same ``with`` /
garbage-collection behaviour so no module repeats it.
"""

from __future__ import annotations

from tide_local.ggml import _lib


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


def status_error(status: int, what: str) -> RuntimeError:
    """The exception for a ggml call that returned ``status`` (ggml's own wording included)."""
    s = _lib.load().ggml_status_to_string(status)
    return RuntimeError(f"{what} failed: {(s or b'?').decode()} (status {status})")
