"""Hybrid MoE execution: resident experts in device slots, misses on the CPU.

Per MoE layer and pass: the host routing is split into hits (the expert sits in a slot:
the device runs it from the slot pool, ids remapped to slots) and misses (the CPU runs
it from the memory-mapped stack, for those token-slots only, in a worker thread while
the device works). Each side returns per-slot weighted outputs with exact zeros where
the other side owns the slot, so the combined sum over the chosen experts is bit for bit
the sum an all-resident run computes: every policy gives the same tokens.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tide_local import ggml, architecture
from tide_local.experts.memory import MemoryPlan
from tide_local.experts.policies import LayerSlots, Policy
from tide_local.experts.trace import PassClock
from tide_local.model.router import Routing
from tide_local.model.weights import typed

F32, I32 = int(ggml.GGMLType.F32), int(ggml.GGMLType.I32)


@dataclass
class Placement:
    """One layer's split for one pass."""

    device_ids: np.ndarray  # int32 [T, K] slot of each assignment (0 where a miss)
    device_weights: np.ndarray  # float32 [T, K] routing weight (0 where a miss)
    miss_tokens: np.ndarray  # int [P] token of each missed assignment
    miss_slots: np.ndarray  # int [P] which of the K choices
    any_hits: bool

    @property
    def n_misses(self) -> int:
        return len(self.miss_tokens)


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    uploads: int = 0
    upload_bytes: int = 0


@dataclass
class OffloadStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    upload_seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU expert compute (worker thread)
    wait_seconds: float = 0.0  # device side waiting for the CPU share
    passes: int = 0

    def totals(self) -> dict:
        hits = sum(s.hits for s in self.layers.values())
        misses = sum(s.misses for s in self.layers.values())
        return {
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / max(1, hits + misses),
            "cpu_token_slots": misses,
            "uploads": sum(s.uploads for s in self.layers.values()),
            "upload_bytes": sum(s.upload_bytes for s in self.layers.values()),
            "upload_seconds": self.upload_seconds,
            "cpu_expert_seconds": self.cpu_seconds,
            "wait_seconds": self.wait_seconds,
        }


class CpuExperts:
    """Missed assignments on the CPU: one row per (token, choice) pair, over the mmapped stacks."""

    def __init__(self, backend: ggml.Backend, weights, cfg: architecture.LLaDA2Config):
        self.backend, self.weights, self.cfg = backend, weights, cfg
        self.allocator = ggml.GraphAllocator(backend)
        self._graphs: dict[tuple[int, int], tuple] = {}

    def _graph(self, layer: int, rows: int):
        key = (layer, rows)
        if key not in self._graphs:
            cfg, stacks = self.cfg, self.weights.layers[layer].experts
            ctx = ggml.Context(max_tensors=32)
            x = ctx.new_tensor(F32, ne=(cfg.hidden_size, 1, rows), input=True)
            ids = ctx.new_tensor(I32, ne=(1, rows), input=True)
            w = ctx.new_tensor(F32, ne=(1, 1, rows), input=True)
            gate = ctx.mul_mat_id(stacks["gate"], x, ids)
            up = ctx.mul_mat_id(stacks["up"], x, ids)
            out = ctx.mul_mat_id(stacks["down"], ctx.mul(ctx.mul(ctx.silu(gate), up), w), ids)
            graph = ctx.build_graph(out)
            if self.allocator.bind([graph]):
                self._graphs.clear()
            self._graphs[key] = (graph, x, ids, w, out)
        return self._graphs[key]

    def run(self, layer: int, x: np.ndarray, routing: Routing, placement: Placement) -> np.ndarray:
        """Weighted outputs [T, K, H] of the missed assignments (zeros elsewhere)."""
        T, K = routing.experts.shape
        y = np.zeros((T, K, self.cfg.hidden_size), dtype=np.float32)
        n = placement.n_misses
        if n == 0:
            return y
        rows = 1 << (n - 1).bit_length()  # power-of-two buckets: few graphs, reused
        t, k = placement.miss_tokens, placement.miss_slots
        xs = np.zeros((rows, self.cfg.hidden_size), dtype=np.float32)
        xs[:n] = x[t]
        ids = np.zeros(rows, dtype=np.int32)
        ids[:n] = routing.experts[t, k]
        ids[n:] = ids[0]  # padding rows: a valid expert, weight 0, output ignored
        w = np.zeros(rows, dtype=np.float32)
        w[:n] = routing.weights[t, k]
        graph, x_t, ids_t, w_t, out = self._graph(layer, rows)
        self.backend.compute(graph, {x_t: xs, ids_t: ids, w_t: w})
        y[t, k] = out.get().reshape(rows, self.cfg.hidden_size)[:n]
        return y


class ExpertOffload:
    """Slots on the device, the policy that fills them, the CPU share, and the statistics."""

    def __init__(self, model_file, weights, device: ggml.Backend, cpu: ggml.Backend, plan: MemoryPlan,
                 policy: Policy):
        self.file, self.weights, self.device, self.plan, self.policy = model_file, weights, device, plan, policy
        self.cfg = cfg = model_file.config
        self.slots: dict[int, LayerSlots] = {}
        self.pools: dict[int, dict[str, ggml.Tensor]] = {}
        self.context = ggml.Context(max_tensors=3 * cfg.n_layers + 4)
        for layer, n in plan.slots.items():
            self.slots[layer] = LayerSlots(n, cfg.n_experts)
            if n == 0:
                continue
            stacks = weights.layers[layer].experts
            self.pools[layer] = {
                proj: self.context.new_tensor(stacks[proj].dtype, ne=(stacks[proj].ne[0], stacks[proj].ne[1], n))
                for proj in architecture.EXPERT_PROJECTIONS
            }
        self.buffer = device.alloc_tensors(self.context) if self.pools else None
        self.cpu = CpuExperts(cpu, weights, cfg)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tide-cpu-experts")
        self.stats = OffloadStats()
        self.step_log: list[dict] = []  # per pass: block start, step, per-layer hits/misses/uploads
        self.clock = PassClock()
        for layer, slots in self.slots.items():
            self._upload(layer, policy.initial(layer, slots), count=False)

    # -- the pass clock ----------------------------------------------------------------------------
    def begin_pass(self, start: int, n_tokens: int) -> None:
        """A new forward pass over positions [start, start+n_tokens): steps count within a block."""
        self.clock.tick(start)
        self.stats.passes += 1
        self.step_log.append({"start": start, "step": self.clock.step, "tokens": n_tokens, "layers": {}})

    # -- per layer ----------------------------------------------------------------------------------
    def _upload(self, layer: int, uploads: list[tuple[int, int]], count: bool = True) -> None:
        if not uploads:
            return
        t0 = time.perf_counter()
        g = self.file.gguf
        pool = self.pools[layer]
        nbytes = 0
        for proj in architecture.EXPERT_PROJECTIONS:
            layout = self.file.experts(layer, proj)
            src = g.tensor_data(layout.tensor.name)
            size = layout.slice_bytes
            for slot, expert in uploads:
                pool[proj].set(typed(src[expert * size:(expert + 1) * size], pool[proj].dtype), offset=slot * size)
                nbytes += size
        self.stats.upload_seconds += time.perf_counter() - t0
        if count:
            s = self.stats.layers.setdefault(layer, LayerStats())
            s.uploads += len(uploads)
            s.upload_bytes += nbytes

    def place(self, layer: int, routing: Routing) -> Placement:
        slots = self.slots[layer]
        counts = np.bincount(routing.experts.ravel(), minlength=self.cfg.n_experts)
        uploads = self.policy.refresh(slots, counts, self.clock.step, self.clock.clock) if slots.n_slots else []
        self._upload(layer, uploads)
        slot_ids = slots.slot_of_expert[routing.experts]
        hit = slot_ids >= 0
        miss_t, miss_k = np.nonzero(~hit)
        n_hits = int(hit.sum())
        s = self.stats.layers.setdefault(layer, LayerStats())
        s.hits += n_hits
        s.misses += len(miss_t)
        self.step_log[-1]["layers"][layer] = (n_hits, len(miss_t), len(uploads))
        return Placement(
            device_ids=np.where(hit, slot_ids, 0).astype(np.int32),
            device_weights=np.where(hit, routing.weights, 0.0).astype(np.float32),
            miss_tokens=miss_t,
            miss_slots=miss_k,
            any_hits=n_hits > 0,
        )

    def start_misses(self, layer: int, x: np.ndarray, routing: Routing, placement: Placement) -> Future:
        def job():
            t0 = time.perf_counter()
            y = self.cpu.run(layer, x, routing, placement)
            self.stats.cpu_seconds += time.perf_counter() - t0
            return y

        return self.worker.submit(job)

    def wait(self, future: Future) -> np.ndarray:
        t0 = time.perf_counter()
        y = future.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        return y

    def reset_stats(self) -> None:
        self.stats = OffloadStats()
        self.step_log = []

    def close(self) -> None:
        self.worker.shutdown(wait=True)
