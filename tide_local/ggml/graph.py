"""Forward graphs over context tensors, sized so ggml never runs out of node slots.

ggml aborts when a graph holds more nodes than it was created for (2048 by default),
and our graphs can span several contexts (weights, caches, per-step scratch). A
:class:`Graph` therefore counts the op results and leaves of every context its
outputs depend on and makes room for all of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from tide_local.ggml import _lib
from tide_local.ggml._handle import OwnedHandle

if TYPE_CHECKING:
    from tide_local.ggml.context import Context
    from tide_local.ggml.tensor import Tensor

__all__ = ["Graph"]


def _size_bound(contexts: Iterable[Context]) -> int:
    """Upper bound on the nodes (op results) and leaves (new tensors) of any graph over these contexts."""
    contexts = list(contexts)
    return max(sum(c._n_ops for c in contexts), sum(c._n_leaf for c in contexts), 16)


class Graph(OwnedHandle):
    """A forward graph for some output tensors. Reusable: recompute after changing inputs.

    The graph lives in its own small ggml context sized from ``size`` (default: the
    number of tensors in every context the outputs depend on, so ggml cannot run out
    of node slots). Memory for its intermediate tensors comes from a
    :class:`~tide_local.ggml.backend.GraphAllocator` (``allocator`` once allocated).
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
            size = max(_lib.GGML_DEFAULT_GRAPH_SIZE, _size_bound(reach.values()))
        L = _lib.load()
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
        """Addresses of the graph's nodes (op results), in compute order."""
        L = self._lib
        return [L.ggml_graph_node(self.ptr, i) for i in range(L.ggml_graph_n_nodes(self.ptr))]

    def free(self) -> None:
        if self._gctx is not None:
            self._lib.ggml_free(self._gctx)
            self._gctx = None
            self.ptr = None

    def __repr__(self) -> str:
        return f"Graph({self.n_nodes if self.ptr else '?'} nodes, size={self.size})"
