"""Timing the routed experts of a loaded engine, stage by stage of `tide profile`:

* CPU experts: the engine's `CpuExperts` (mul_mat_id over the memory-mapped stacks) in a
  worker thread, as the engine runs them, over a grid of missed token-slots (rows) and
  distinct experts;
* device experts: the one expert graph (``routed_experts``) over the device's slot pool,
  as the engine's hit graph runs it, over the same kind of grid;
* both at once, as in a pass, for the slowdown of sharing the machine (an emulated device
  shares the host's cores and memory).

Each point is the mean of one call per MoE layer over a few rounds (weights as cold as in a
pass; the mean, not the median, because a pass's time is a sum and a busy machine's hiccups
are part of it).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tide_local import ggml
from tide_local.calibration.fitting import Evidence, ExpertCosts, assemble_costs, fit_expert_costs, timed
from tide_local.experts.offload import CpuExperts, Placement, padded_rows
from tide_local.model.experts import routed_experts
from tide_local.model.router import Routing
from tide_local.planner.shape import ModelShape

F32, I32 = int(ggml.GGMLType.F32), int(ggml.GGMLType.I32)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ExpertBench:
    """A loaded engine's expert work, run piece by piece: the CPU share through the engine's
    `CpuExperts` in a worker thread, the device share over its slot pools (or over the weight
    stacks when it runs on the CPU alone)."""

    def __init__(self, engine, shape: ModelShape, slots: int, repeat: int):
        cfg = engine.config
        self.shape, self.repeat = shape, repeat
        self.E, self.K, self.H = cfg.n_experts, cfg.n_experts_used, cfg.hidden_size
        self.layers = list(shape.moe_layers)
        self.offloaded = engine.offload is not None
        self.device = engine.backend
        self.cpu = CpuExperts(engine.cpu_backend, engine.model.weights, cfg)
        if self.offloaded:  # the slot pools (`slots` in every MoE layer)
            self.pools = {layer: engine.offload.pools.get(layer) for layer in self.layers}
            self.n_pool = slots
        else:  # all on the CPU: the weight stacks
            self.pools = {layer: engine.model.weights.layers[layer].experts for layer in self.layers}
            self.n_pool = self.E
        self.allocators = {layer: ggml.GraphAllocator(self.device) for layer in self.layers}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="tide-profile-cpu")
        self.rng = np.random.default_rng(1)

    def close(self) -> None:
        self.worker.shutdown(wait=True)

    # -- jobs ----------------------------------------------------------------------------------------
    def device_jobs(self, T: int, d: int) -> dict[int, tuple]:
        """Per MoE layer: a graph of T tokens x K choices over d distinct slots, and its inputs."""
        H, K, rng = self.H, self.K, self.rng
        jobs = {}
        for layer in self.layers:
            g = ggml.Context(max_tensors=32)
            x = g.new_tensor(F32, ne=(H, T), input=True)
            ids = g.new_tensor(I32, ne=(K, T), input=True)
            weights = g.new_tensor(F32, ne=(1, K, T), input=True)
            graph = g.build_graph(routed_experts(g, self.pools[layer], x, ids, weights))
            inputs = {x: rng.standard_normal((T, H)).astype(np.float32),
                      ids: (rng.permutation(self.n_pool)[:d][np.arange(T * K) % d]).reshape(T, K).astype(np.int32),
                      weights: rng.random((T, K, 1), dtype=np.float32)}
            jobs[layer] = (g, graph, inputs)
        return jobs

    def run_device(self, layer: int, job) -> float:
        """Seconds of the device graph (bound first, as the engine's hit graphs are bound once)."""
        _, graph, inputs = job
        self.allocators[layer].bind([graph])
        return timed(self.device.compute, graph, inputs)

    def cpu_job(self, rows: int, d: int) -> tuple:
        """`rows` missed assignments over `d` distinct experts: the layer input, routing and placement."""
        E, K, rng = self.E, self.K, self.rng
        T = max(32, -(-rows // K))
        routing = Routing(experts=rng.integers(0, E, size=(T, K)).astype(np.int32),
                          weights=rng.random((T, K), dtype=np.float32))
        flat = np.arange(rows)
        t_idx, k_idx = flat // K, flat % K
        routing.experts[t_idx, k_idx] = rng.permutation(E)[:d][flat % d]
        placement = Placement(np.zeros((T, K), np.int32), np.zeros((T, K), np.float32), t_idx, k_idx)
        return rng.standard_normal((T, self.H)).astype(np.float32), routing, placement

    def run_cpu(self, layer: int, job) -> float:
        """Seconds of the CPU share as the device side waits for it: the hand-off to the worker included."""
        return timed(lambda: self.worker.submit(self.cpu.run, layer, *job).result())

    def run_both(self, layer: int, cpu_job, device_job) -> float:
        """Seconds of both shares at once, as in a pass: the CPU's in the worker while the device computes."""
        _, graph, inputs = device_job
        self.allocators[layer].bind([graph])

        def both():
            future = self.worker.submit(self.cpu.run, layer, *cpu_job)
            self.device.compute(graph, inputs)
            future.result()

        return timed(both)

    def mean_over_layers(self, run_once) -> float:
        """Mean of `run_once(layer)` (seconds) over `repeat` rounds of every MoE layer, after a warm-up."""
        run_once(self.layers[0])  # warm-up: graphs
        return float(np.mean([run_once(layer) for _ in range(self.repeat) for layer in self.layers]))


# -------------------------------------------------------------------------------------------------
# the stages
# -------------------------------------------------------------------------------------------------


def _fit_side(bench: ExpertBench, name: str, title: str, points: list[tuple[int, int]], seconds: list[float],
              evidence: Evidence, log, fit_rows: list[int] | None = None) -> ExpertCosts:
    """Fit one side's (rows, distinct experts) points (with `fit_rows` in place of the rows
    when given), keep them as evidence and say what came out."""
    shape = bench.shape
    rows = [r for r, _ in points]
    experts = [d for _, d in points]
    costs, err = fit_expert_costs(list(zip(fit_rows or rows, experts)), seconds, shape.expert_bytes,
                                  shape.expert_flops_per_row)
    evidence.fit_errors[name] = err
    evidence.samples[name] = {"rows": rows, "experts": experts, "seconds": seconds}
    log(f"profile {title}: {len(points)} points, {costs.per_call_s * 1e6:.0f} us per call + "
        f"{costs.per_weight_byte_s * shape.expert_bytes * 1e6:.1f} us per expert + "
        f"{costs.per_flop_s * shape.expert_flops_per_row * 1e9:.0f} ns per row (median fit error {100 * err:.1f}%)")
    return costs


def measure_cpu_experts(bench: ExpertBench, evidence: Evidence, log) -> ExpertCosts:
    """The CPU share of a layer by missed rows (padded as the engine pads them, `padded_rows`)
    and distinct experts: ``c0 + c1·experts·expert_bytes + c2·padded rows·flops``."""
    grid = [(rows, d) for rows in ROWS
            for d in sorted({min(x, bench.E) for x in (1, max(1, rows // 4), max(1, rows // 2), rows)})]
    seconds = []
    for rows, d in grid:
        job = bench.cpu_job(rows, d)
        seconds.append(bench.mean_over_layers(lambda layer, job=job: bench.run_cpu(layer, job)))
    padded = [padded_rows(rows) for rows, _ in grid]
    return _fit_side(bench, "cpu_experts", "[2/4] CPU experts", grid, seconds, evidence, log, fit_rows=padded)


def measure_device_experts(bench: ExpertBench, evidence: Evidence, log) -> ExpertCosts:
    """The device share of a layer: every (token, choice) row over `d` distinct slots,
    ``d0 + d1·experts·expert_bytes + d2·rows·flops``."""
    points, seconds = [], []
    for T in (32, 128):
        for d in ROWS:
            if d > min(bench.n_pool, T * bench.K):
                continue
            jobs = bench.device_jobs(T, d)
            points.append((T * bench.K, d))
            seconds.append(bench.mean_over_layers(lambda layer, jobs=jobs: bench.run_device(layer, jobs[layer])))
    return _fit_side(bench, "device_experts", "[3/4] device experts", points, seconds, evidence, log)


def measure_overlap(bench: ExpertBench, cpu: ExpertCosts, device: ExpertCosts, evidence: Evidence, log) -> float:
    """How much slower each side runs while the other works: both at once take
    ``max + (slowdown - 1)·min`` of their times alone (least squares over a few pairs).
    1 without a device: the engine overlaps the two sides only with one."""
    if not bench.offloaded:
        return 1.0
    alone = assemble_costs(cpu, device)
    shape, E, n_pool, T = bench.shape, bench.E, bench.n_pool, 32
    pairs = []
    for rows, d_cpu in ((16, min(E, 8)), (64, min(E, 16)), (128, min(E, 32)), (256, min(E, 64))):
        cpu_job = bench.cpu_job(rows, d_cpu)
        for d_dev in sorted({min(n_pool, 4), min(n_pool, 16)}):
            jobs = bench.device_jobs(T, d_dev)
            wall = bench.mean_over_layers(lambda layer, cpu_job=cpu_job, jobs=jobs:
                                          bench.run_both(layer, cpu_job, jobs[layer]))
            pairs.append({"rows": rows, "cpu_experts": d_cpu, "device_experts": d_dev, "seconds": wall,
                          "cpu_alone": float(alone.cpu_seconds(rows, d_cpu, shape)),
                          "device_alone": float(alone.device_seconds(T * bench.K, d_dev, shape))})
    longer = np.asarray([max(p["cpu_alone"], p["device_alone"]) for p in pairs])
    shorter = np.asarray([min(p["cpu_alone"], p["device_alone"]) for p in pairs])
    both = np.asarray([p["seconds"] for p in pairs])
    slowdown = float(np.clip(1 + shorter @ (both - longer) / max(1e-18, shorter @ shorter), 1.0, 2.0))
    evidence.samples["overlap"] = pairs
    log(f"profile [3/4] both at once: {len(pairs)} pairs, each side {slowdown:.2f}x slower while the other works")
    return slowdown
