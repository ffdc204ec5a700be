"""The routed experts of a MoE layer, as the forward sees them: an *executor*.

The forward builds one graph chain per pass shape and routes on the host between graphs
(``forward.py``). Where a layer's chosen experts run is not its business: it asks the
executor given at construction for a per-pass object, which supplies the per-choice expert
outputs ``[H, K, T]`` of a layer as a graph tensor, and which is run with the layer's
routing before the graph that consumes that tensor.

* :class:`ResidentExperts` (here): every expert where the model's weights are, one
  ``mul_mat_id`` over the stacks inside the layer's graph.
* ``tide_local.experts.offload.HybridExperts``: resident experts in device slots, misses
  on the CPU, placed by a policy.
"""

from __future__ import annotations

from typing import Protocol

from tide_local import ggml
from tide_local.diffusion.blockmodel import PassInfo
from tide_local.model.router import Routing
from tide_local.model.timing import PhaseTimer

F32, I32 = int(ggml.GGMLType.F32), int(ggml.GGMLType.I32)


def routed_experts(ctx: ggml.Context, stacks: dict, x, ids, weights):
    """Weighted per-choice expert outputs [H, K, T] of x [H, T] (the weight applied before the
    linear down); `stacks`: gate/up/down expert stacks, ids I32 [K, T], weights F32 [1, K, T].

    The one SwiGLU expert graph: the forward, the CPU share of the offload, the profiler and
    the benchmarks all build it here, which is what makes every placement bit-exact."""
    xr = ctx.reshape(x, x.ne[0], 1, x.ne[1])
    gate = ctx.mul_mat_id(stacks["gate"], xr, ids)  # [M, K, T]
    up = ctx.mul_mat_id(stacks["up"], xr, ids)
    act = ctx.mul(ctx.mul(ctx.silu(gate), up), weights)
    return ctx.mul_mat_id(stacks["down"], act, ids)  # [H, K, T]


class PassExperts(Protocol):
    """One pass shape's expert work, created before the pass's state buffer is allocated."""

    graphs: list  # graphs of its own the pass must bind with its segments

    def output(self, layer: int, x) -> "ggml.Tensor":
        """Graph construction: the per-choice outputs [H, K, T] of `layer` for FFN input `x`."""

    def run(self, layer: int, x, routing: Routing) -> None:
        """Before the graph reading `output(layer, x)` runs: place `routing` and do the work."""


class ExpertsExecutor(Protocol):
    """Given to the model at construction; says where each routed expert runs."""

    def for_pass(self, ctx: ggml.Context, n_tokens: int, timer: PhaseTimer) -> PassExperts:
        """Create the pass's persistent expert tensors in `ctx` (allocated with the pass state)."""

    def begin_pass(self, start: int, n_tokens: int, info: PassInfo) -> None:
        """A forward over positions [start, start+n_tokens) begins; `info` says what it is for."""


class ResidentExperts:
    """Every expert runs on the model's backend from the weight stacks (CPU-only runs, and the
    upper bound a device run is compared with)."""

    def __init__(self, weights, config):
        self.weights, self.config = weights, config

    def for_pass(self, ctx: ggml.Context, n_tokens: int, timer: PhaseTimer) -> "_ResidentPass":
        return _ResidentPass(self, ctx, n_tokens)

    def begin_pass(self, start: int, n_tokens: int, info: PassInfo) -> None:
        pass


class _ResidentPass:
    def __init__(self, executor: ResidentExperts, ctx: ggml.Context, n_tokens: int):
        cfg = executor.config
        self.executor, self.ctx, self.graphs = executor, ctx, []
        self.ids = {layer: ctx.new_tensor(I32, ne=(cfg.n_experts_used, n_tokens)) for layer in cfg.moe_layers}
        self.weights = {layer: ctx.new_tensor(F32, ne=(1, cfg.n_experts_used, n_tokens)) for layer in cfg.moe_layers}

    def output(self, layer: int, x):
        stacks = self.executor.weights.layers[layer].experts
        return routed_experts(self.ctx, stacks, x, self.ids[layer], self.weights[layer])

    def run(self, layer: int, x, routing: Routing) -> None:
        self.ids[layer].set(routing.experts)
        self.weights[layer].set(routing.weights)
