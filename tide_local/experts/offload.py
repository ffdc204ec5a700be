"""Hybrid MoE execution: resident experts in device slots, misses on the CPU.

`HybridExperts` is the experts executor (see ``tide_local/model/experts.py``) the engine gives
the model when there is a device: the forward asks it for a layer's per-choice outputs and runs
it with the routing; everything about where an expert runs lives here.

Per MoE layer and pass: the host routing is split into hits (the expert sits in a slot:
the device runs it from the slot pool, ids remapped to slots) and misses (the CPU runs
it from the memory-mapped stack, for those token-slots only, in a worker thread while
the device works). Each side returns per-slot weighted outputs with exact zeros where
the other side owns the slot, so the combined sum over the chosen experts is bit for bit
the sum an all-resident run computes: every policy gives the same tokens.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tide_local import ggml, architecture
from tide_local.experts.memory import MemoryPlan, pool_slots
from tide_local.experts.policies import LayerSlots, Policy, refresh_layer
from tide_local.experts.uploader import Uploader
from tide_local.diffusion.blockmodel import PassInfo
from tide_local.model.experts import routed_experts
from tide_local.model.router import Routing
from tide_local.model.timing import PhaseTimer
from tide_local.model.weights import typed
from tide_local.results import LayerOffload, OffloadStats

F32, I32 = int(ggml.GGMLType.F32), int(ggml.GGMLType.I32)


@dataclass
class Placement:
    """One layer's split for one pass."""

    device_ids: np.ndarray  # int32 [T, K] slot of each assignment (where a miss: a slot the token names nowhere else)
    device_weights: np.ndarray  # float32 [T, K] routing weight (0 where a miss)
    miss_tokens: np.ndarray  # int [P] token of each missed assignment
    miss_slots: np.ndarray  # int [P] which of the K choices
    # a device-only policy's further rounds: (uploads, device_ids, device_weights, computed mask),
    # each run after the one before, its weights zero where another round (or the CPU) owns it
    rounds: list = field(default_factory=list)
    uploads: list = field(default_factory=list)  # (slot, expert) pairs the first round needs, made after the misses start

    def first_round_mask(self) -> np.ndarray:
        """bool [T, K]: the assignments the first device round computes."""
        mask = np.ones(self.device_ids.shape, dtype=bool)
        mask[self.miss_tokens, self.miss_slots] = False
        for *_, later in self.rounds:
            mask &= ~later
        return mask

    @property
    def n_misses(self) -> int:
        return len(self.miss_tokens)

    @property
    def n_hits(self) -> int:
        """Assignments of the first round on the device."""
        return int(self.first_round_mask().sum()) if self.rounds else self.device_ids.size - self.n_misses


@dataclass
class OffloadCounters:
    """Running counts of one generation (reset by `reset_stats`)."""

    layers: dict[int, LayerOffload] = field(default_factory=dict)
    upload_seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU expert compute (worker thread)
    wait_seconds: float = 0.0  # device side waiting for the CPU share
    passes: int = 0

    def add(self, layer: int, **counts: int) -> None:
        old = self.layers.get(layer, LayerOffload())
        self.layers[layer] = LayerOffload(**{k: getattr(old, k) + counts.get(k, 0) for k in vars(old)})


# The CPU share's graphs are built per row count, padded up to a multiple of this: few graphs,
# and at most 7 wasted rows (padding rows run a valid expert with weight 0, output ignored).
MISS_ROW_QUANTUM = 8


def padded_rows(n):
    """Rows the CPU share computes for `n` missed (token, choice) rows (ints or an array)."""
    return -(-n // MISS_ROW_QUANTUM) * MISS_ROW_QUANTUM


def distinct_slots(slot_ids: np.ndarray, computed: np.ndarray) -> np.ndarray:
    """int32 [T, K] ids for a device round's mul_mat_id: `slot_ids` where `computed`, elsewhere
    (weight 0, output ignored) slots among 0..K-1 that the token names nowhere else.

    A slot named twice by one token breaks ggml-vulkan's mul_mat_id: it computes at most one
    row per (expert, token) (its dispatch has one column per token), so the other rows of that
    expert are never written and the layer sums whatever the buffer held. The CPU backend
    copes, so only a device run shows it. The computed slots of a token differ (its experts
    do), so slots 0..K-1 hold enough free ones; pools have at least K slots."""
    T, K = slot_ids.shape
    taken = np.zeros((T, K + 1), dtype=bool)  # column K: slots >= K, and the uncomputed
    taken[np.arange(T)[:, None], np.where(computed, np.minimum(slot_ids, K), K)] = True
    free = np.argsort(taken[:, :K], axis=1, kind="stable")  # each row: its free slots first, ascending
    rank = np.maximum(np.cumsum(~computed, axis=1) - 1, 0)
    return np.where(computed, slot_ids, np.take_along_axis(free, rank, axis=1)).astype(np.int32)


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
            x = ctx.new_tensor(F32, ne=(cfg.hidden_size, rows), input=True)  # one row per missed choice
            ids = ctx.new_tensor(I32, ne=(1, rows), input=True)
            w = ctx.new_tensor(F32, ne=(1, 1, rows), input=True)
            out = routed_experts(ctx, stacks, x, ids, w)
            graph = ctx.build_graph(out)
            if self.allocator.bind([graph]):
                self._graphs.clear()
            self._graphs[key] = (graph, x, ids, w, out)
        return self._graphs[key]

    def run(self, layer: int, x: np.ndarray, routing: Routing, placement: Placement) -> np.ndarray:
        """Weighted outputs [n, H] of the n missed assignments, in the placement's miss order."""
        n = placement.n_misses
        if n == 0:
            return np.zeros((0, self.cfg.hidden_size), dtype=np.float32)
        rows = padded_rows(n)
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
        return out.get().reshape(rows, self.cfg.hidden_size)[:n]


class HybridExperts:
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
            self.pools[layer] = {  # memory.pool_slots: slots past the policy's n stay zero
                proj: self.context.new_tensor(stacks[proj].dtype,
                                              ne=(stacks[proj].ne[0], stacks[proj].ne[1], pool_slots(n, cfg.n_experts_used)))
                for proj in architecture.EXPERT_PROJECTIONS
            }
        self.buffer = device.alloc_tensors(self.context) if self.pools else None
        if self.buffer is not None:
            self.buffer.clear(0)
        self.uploader = Uploader(device)
        self._prefetched: dict[int, int] = {}  # per layer, uploads a prefetching policy made at the pass's start
        self.cpu = CpuExperts(cpu, weights, cfg)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tide-cpu-experts")
        self.stats = OffloadCounters()
        self.step_log: list[dict] = []  # per pass: what it was for, and per layer (hits, misses, uploads)
        self.log_steps = True  # off while a batch serves for hours: the log would grow without end
        self.pass_info = PassInfo.plain()
        self.clock = 0  # passes so far (LRU's recency)
        self.timeline: list[dict] | None = None  # per (pass, layer) phase times, while recorded
        self._timeline_origin = 0.0
        for layer, slots in self.slots.items():
            self.upload(layer, policy.initial(layer, slots), count=False)

    # -- the pass clock ----------------------------------------------------------------------------
    def begin_pass(self, start: int, n_tokens: int, info: PassInfo) -> None:
        """A forward over positions [start, start+n_tokens) begins: `info` (the decoder's block and
        step) says when the policy may refresh; a commit pass never does. A prefetching policy's
        refreshes are known now, so every layer's uploads start here, beside the work of the
        layers before it."""
        self.uploader.drain()  # the last pass's copies (long done): their host arrays go
        self.pass_info = info
        self.clock += 1
        self.stats.passes += 1
        if self.log_steps:
            self.step_log.append({"start": start, "kind": info.kind, "block": info.block, "step": info.step,
                                  "commit": info.kind == "commit", "tokens": n_tokens, "layers": {}})
        self._prefetched = {}
        if self.policy.prefetches and info.refreshes:
            for layer, slots in self.slots.items():
                uploads = self.policy.prefetch(slots, info.step, self.clock) if slots.n_slots else None
                if uploads is not None:
                    self.upload(layer, uploads)
                    self._prefetched[layer] = len(uploads)

    # -- per layer ----------------------------------------------------------------------------------
    def upload(self, layer: int, uploads: list[tuple[int, int]], count: bool = True) -> None:
        """Copy expert slices into slots: `uploads` holds (slot, expert) pairs."""
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
                self.uploader.put(pool[proj], typed(src[expert * size:(expert + 1) * size], pool[proj].dtype),
                                  slot * size)
                nbytes += size
        self.uploader.finish(layer)
        self.stats.upload_seconds += time.perf_counter() - t0  # issuing them, where they are asynchronous
        if count:
            self.stats.add(layer, uploads=len(uploads), upload_bytes=nbytes)

    def place(self, layer: int, routing: Routing) -> Placement:
        info = self.pass_info
        refresh = refresh_layer(self.policy, self.slots[layer], routing.experts, info.step, self.clock,
                                refresh=info.refreshes)
        hit = refresh.hit
        miss_t, miss_k = np.nonzero(~hit)
        hits, misses, uploads = refresh.tally()
        uploads += self._prefetched.pop(layer, 0)  # made at the pass's start
        self.stats.add(layer, hits=hits, misses=misses)
        if self.log_steps:
            self.step_log[-1]["layers"][layer] = (hits, misses, uploads)
        rounds = [(ups, distinct_slots(ids, ids >= 0), np.where(ids >= 0, routing.weights, 0.0)
                   .astype(np.float32), ids >= 0) for ups, ids in refresh.rounds]
        if rounds:  # the CPU runs only what no round computes
            miss_t, miss_k = np.nonzero(~hit & np.logical_and.reduce([ids < 0 for _, ids in refresh.rounds]))
        return Placement(
            uploads=refresh.uploads,  # the first round's; later rounds upload as they run
            device_ids=distinct_slots(refresh.slot_ids, hit),
            device_weights=np.where(hit, routing.weights, 0.0).astype(np.float32),
            miss_tokens=miss_t,
            miss_slots=miss_k,
            rounds=rounds,
        )

    def start_misses(self, layer: int, x: np.ndarray, routing: Routing, placement: Placement,
                     span: dict | None = None) -> Future:
        """Run the misses on the CPU in the worker thread (they never wait for the uploads);
        `span`: a timeline entry that gets the job's ("cpu") start and end."""
        def job():
            t0 = time.perf_counter()
            y = self.cpu.run(layer, x, routing, placement)
            t1 = time.perf_counter()
            self.stats.cpu_seconds += t1 - t0
            if span is not None:
                span["cpu"] = (t0, t1)
            return y

        return self.worker.submit(job)

    def wait(self, future: Future) -> np.ndarray:
        t0 = time.perf_counter()
        y = future.result()
        self.stats.wait_seconds += time.perf_counter() - t0
        return y

    # -- the per-layer timeline (`tide generate --trace`) ---------------------------------------------
    def record_timeline(self, on: bool = True) -> None:
        """Record per pass and MoE layer when the uploads, the device's experts, the CPU's misses
        and the wait for them ran (seconds from now); `timeline` holds the entries."""
        self.timeline, self._timeline_origin = ([], time.perf_counter()) if on else (None, 0.0)

    def _span(self, layer: int) -> dict | None:
        if self.timeline is None:
            return None
        span = {"pass": self.stats.passes, "layer": layer}
        self.timeline.append(span)
        return span

    def timeline_seconds(self) -> list[dict]:
        """The timeline with (start, end) pairs in seconds since `record_timeline`."""
        o = self._timeline_origin
        return [{k: (round(v[0] - o, 6), round(v[1] - o, 6)) if isinstance(v, tuple) else v for k, v in span.items()}
                for span in self.timeline or []]

    # -- the executor's side ------------------------------------------------------------------------
    def for_pass(self, ctx: ggml.Context, n_tokens: int, timer: PhaseTimer) -> "_HybridPass":
        return _HybridPass(self, ctx, n_tokens, timer)

    def reset_stats(self) -> None:
        self.stats = OffloadCounters()
        self.step_log = []

    def report(self, tau: int | None, tau_source: str | None) -> OffloadStats:
        """The counts since `reset_stats`, typed."""
        s = self.stats
        return OffloadStats(policy=self.policy.name, tau=tau, tau_source=tau_source, per_layer=dict(s.layers),
                            per_step=list(self.step_log), upload_seconds=s.upload_seconds,
                            cpu_expert_seconds=s.cpu_seconds, wait_seconds=s.wait_seconds)

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        self.uploader.close()


@contextmanager
def _timed(span: dict | None, phase: str):
    """Put the block's (start, end) into the timeline entry `span` (when one is recorded)."""
    t0 = time.perf_counter()
    yield
    if span is not None:
        span[phase] = (t0, time.perf_counter())


class _HybridPass:
    """One pass shape: per MoE layer a device graph over the slot pool (its own graph, run while
    the CPU works), and the rows the device did not compute (the CPU's misses; a device-only
    policy's earlier rounds) gathered into place on the device: the layer's graph takes
    y_device + gather(rows, index). Only those rows cross to the device, not [T, K, H]; the
    index points every other choice at row 0, which stays zero, so each side contributes exact
    zeros where the other owns the choice and the sum is the all-resident one, bit for bit."""

    def __init__(self, executor: HybridExperts, ctx: ggml.Context, n_tokens: int, timer: PhaseTimer):
        cfg = executor.cfg
        self.executor, self.ctx, self.timer = executor, ctx, timer
        self.n_tokens, self.K, self.H = n_tokens, cfg.n_experts_used, cfg.hidden_size
        self.ids = {layer: ctx.new_tensor(I32, ne=(cfg.n_experts_used, n_tokens)) for layer in executor.pools}
        self.weights = {layer: ctx.new_tensor(F32, ne=(1, cfg.n_experts_used, n_tokens)) for layer in executor.pools}
        # shared by the layers of the pass: one layer's outputs are consumed before the next runs
        self.y_device = ctx.new_tensor(F32, ne=(cfg.hidden_size, cfg.n_experts_used, n_tokens))
        self.rows = ctx.new_tensor(F32, ne=(cfg.hidden_size, cfg.n_experts_used * n_tokens + 1))  # row 0: zeros
        self.index = ctx.new_tensor(I32, ne=(cfg.n_experts_used * n_tokens,))  # choice -> its row, else 0
        self._zero_row_set = self._index_zero = self._y_device_zero = False
        self.hit_graphs: dict[int, ggml.Graph] = {}
        self.graphs: list[ggml.Graph] = []

    def output(self, layer: int, x):
        ctx, pool = self.ctx, self.executor.pools.get(layer)
        gathered = ctx.reshape(ctx.get_rows(self.rows, self.index), self.H, self.K, self.n_tokens)
        if pool is None:  # no slots in this layer: all on the CPU
            return gathered
        y = routed_experts(ctx, pool, x, self.ids[layer], self.weights[layer])
        self.hit_graphs[layer] = graph = ctx.build_graph(ctx.cpy(y, self.y_device))
        self.graphs.append(graph)
        return ctx.add(self.y_device, gathered)

    def _device_round(self, layer: int, ids: np.ndarray, weights: np.ndarray) -> None:
        self.ids[layer].set(ids)
        self.weights[layer].set(weights)
        self.executor.uploader.ready(layer)  # the device waits for the layer's copies, the host does not
        with self.timer.phase("compute_experts"):
            self.executor.device.compute(self.hit_graphs[layer])
        self._y_device_zero = False

    def run(self, layer: int, x, routing: Routing) -> None:
        executor = self.executor
        placement = executor.place(layer, routing)
        span = executor._span(layer)
        # the misses start first: the CPU computes them while the refresh uploads and the device runs
        future = executor.start_misses(layer, x.get(), routing, placement, span) if placement.n_misses else None
        with _timed(span, "upload"):
            executor.upload(layer, placement.uploads)
        if layer in self.hit_graphs and placement.n_hits:
            with _timed(span, "device"):
                self._device_round(layer, placement.device_ids, placement.device_weights)
        elif layer in self.hit_graphs and not self._y_device_zero:  # no hits: no device work, zeros
            self.y_device.set(np.zeros(self.y_device.shape, dtype=np.float32))
            self._y_device_zero = True
        parts, where = [], []  # rows the layer's graph gathers, and the (token, choice) of each
        previous = placement.first_round_mask()
        for uploads, ids, weights, mask in placement.rounds:  # a device-only policy's later rounds
            t, k = np.nonzero(previous)  # the previous round's outputs move to the gathered rows
            parts.append(self.y_device.get()[t, k])
            where.append(t * self.K + k)
            executor.upload(layer, uploads)
            self._device_round(layer, ids, weights)
            previous = mask  # the last round's outputs stay in y_device
        if future is not None:
            with _timed(span, "wait"):
                parts.append(executor.wait(future))
            where.append(placement.miss_tokens * self.K + placement.miss_slots)
        self._gather(parts, where)

    def _gather(self, parts: list[np.ndarray], where: list[np.ndarray]) -> None:
        if not self._zero_row_set:
            self.rows.set(np.zeros(self.H, dtype=np.float32), offset=0)
            self._zero_row_set = True
        n = sum(len(w) for w in where)
        if n == 0:
            if not self._index_zero:
                self.index.set(np.zeros(self.index.shape, dtype=np.int32))
                self._index_zero = True
            return
        index = np.zeros(self.K * self.n_tokens, dtype=np.int32)
        index[np.concatenate(where)] = np.arange(1, n + 1, dtype=np.int32)
        self.rows.set(np.ascontiguousarray(np.concatenate(parts), dtype=np.float32), offset=self.H * 4)
        self.index.set(index)
        self._index_zero = False
