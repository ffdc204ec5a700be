"""`measure`: a profile of this machine, timed with the engine's own pieces on a real GGUF
(its expert slices give the sizes that move). Four stages, each fitted to the cost model's
terms (``tide_local.planner.cost.Costs``):

1. uploads: ``Tensor.set`` of expert slices and larger blocks into a device buffer, fitted
   as ``a + b·bytes`` per copy, then the engine's own expert uploads for the per-copy and
   per-layer costs as it pays them (an expert is three copies: gate, up, down);
2. CPU experts and 3. device experts, alone and both at once (``expert_timing``);
4. the fixed work of a pass (attention, routers, shared experts, host routing, LM head):
   whole engine passes at a few token counts and context lengths, minus the expert work
   the cost model predicts for their (recorded) routing, fitted per MoE layer as
   ``l0 + l1·tokens + l2·tokens·keys`` plus the LM head per logits pass.

Above the engine: it loads the model and uses only the engine's public surface (its
backends, ``model.forward``, ``model.weights``, ``offload.upload``/``pools``, traces).
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from dataclasses import fields

import numpy as np

import tide_local
from tide_local import architecture, ggml
from tide_local.calibration.expert_timing import (ExpertBench, measure_cpu_experts, measure_device_experts,
                                                  measure_overlap)
from tide_local.calibration.fitting import (COPIES_PER_EXPERT, Evidence, ExpertCosts, FixedCosts, UploadCosts,
                                            assemble_costs, fit_nonnegative, median_time, timed)
from tide_local.errors import BudgetError
from tide_local.modelfile import ModelFile
from tide_local.planner.cost import Costs, predict_counts, replay_counts
from tide_local.planner.profile import Profile
from tide_local.planner.shape import ModelShape, shape_from_file

# Block sizes of the plain copies, beside the model's own expert slices.
COPY_SIZES = tuple(1 << k for k in range(12, 27, 2))  # 4 KiB .. 64 MiB


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device(device: str) -> str:
    """'auto' → the first accelerator of the loaded libggml, else 'emulated'."""
    if device != "auto":
        return device
    backend = ggml.Backend.best_accelerator()
    return backend.name if backend is not None else "emulated"


def open_engine(model_path, device: str, n_experts: int, *, threads: int | None, n_ctx: int):
    """The engine to measure with, and the placement it runs: every expert resident when the
    device holds them all (or on the CPU), else the static slots that fit."""
    if device == "cpu":
        return tide_local.load(model_path, device="cpu", threads=threads, n_ctx=n_ctx), "resident", n_experts
    try:
        eng = tide_local.load(model_path, device=device, policy="resident", expert_slots=n_experts, n_ctx=n_ctx,
                              threads=threads)
        return eng, "resident", n_experts
    except BudgetError:  # a model larger than the device: measure with the slots that fit
        eng = tide_local.load(model_path, device=device, policy="static", n_ctx=n_ctx, threads=threads)
        return eng, "static", next(iter(eng.plan.slots.values()))


# -------------------------------------------------------------------------------------------------
# 1. uploads
# -------------------------------------------------------------------------------------------------


def _time_copies(backend: ggml.Backend, model: ModelFile, layer: int, repeat: int) -> tuple[list[int], list[float]]:
    """Median seconds of one `Tensor.set` into a device buffer, by size (the layer's expert
    slices, from the mapped file, and larger blocks)."""
    sizes = sorted({model.experts(layer, p).slice_bytes for p in architecture.EXPERT_PROJECTIONS} | set(COPY_SIZES))
    ctx = ggml.Context(max_tensors=2)
    scratch = ctx.new_tensor(int(ggml.GGMLType.I8), ne=(max(sizes),))
    buffer = backend.alloc_tensors(ctx)  # noqa: F841 (kept alive while copying; freed on return)
    host = np.random.default_rng(0).integers(-128, 127, size=max(sizes), dtype=np.int8)
    src = model.gguf.tensor_data(model.experts(layer, "gate").tensor.name).view(np.int8)
    seconds = []
    for n in sizes:
        data = src[:n] if n <= len(src) else host[:n]
        rounds = repeat if n < (1 << 22) else max(2, repeat // 2)
        seconds.append(median_time(lambda: scratch.set(data, offset=0), rounds))
    return sizes, seconds


def _time_engine_uploads(offload, shape: ModelShape, slots: int, repeat: int) -> tuple[list[int], list[float]]:
    """Median seconds of the engine uploading k experts into one layer's slots, by k (another
    layer and other experts each time: nothing cached; not counted in its statistics)."""
    ks, seconds = sorted({1, 2, 4, min(8, slots)}), []
    pick = np.random.default_rng(3)
    for k in ks:
        times = []
        for r in range(repeat + 1):
            layer = shape.moe_layers[r % len(shape.moe_layers)]
            moves = list(zip(pick.permutation(slots)[:k].tolist(), pick.permutation(shape.n_experts)[:k].tolist()))
            times.append(timed(lambda: offload.upload(layer, moves, count=False)))
        seconds.append(float(np.median(times[1:])))
    return ks, seconds


def measure_uploads(eng, model: ModelFile, shape: ModelShape, slots: int, repeat: int, evidence: Evidence,
                    log) -> UploadCosts:
    sizes, seconds = _time_copies(eng.backend, model, shape.moe_layers[0], repeat)
    (a, b), err = fit_nonnegative(np.column_stack([np.ones(len(sizes)), sizes]), seconds)
    evidence.samples["upload"] = {"bytes": sizes, "seconds": seconds}
    per_call = 0.0
    if eng.offload is not None and slots:
        # the per-copy cost as the engine pays it (slicing the mapped file, one set per
        # projection and expert), with the bandwidth of the large copies above
        large = [(n, t) for n, t in zip(sizes, seconds) if n >= (1 << 20)]
        if len(large) >= 2:
            (_, b), _ = fit_nonnegative(np.column_stack([np.ones(len(large)), [n for n, _ in large]]),
                                        [t for _, t in large])
        ks, per_k = _time_engine_uploads(eng.offload, shape, slots, repeat)
        (per_call, expert), err = fit_nonnegative(np.column_stack([np.ones(len(ks)), ks]), per_k)
        a = max(0.0, (expert - b * shape.expert_bytes) / COPIES_PER_EXPERT)
        evidence.samples["upload"].update(engine_experts=ks, engine_seconds=per_k)
    evidence.fit_errors["upload"] = err
    log(f"profile [1/4] uploads: {len(sizes)} sizes, {per_call * 1e6:.1f} us per layer + {a * 1e6:.1f} us per "
        f"copy + {1 / max(b, 1e-15) / 1e9:.2f} GB/s (median fit error {100 * err:.1f}%)")
    return UploadCosts(per_copy_s=float(a), per_byte_s=float(b), per_call_s=float(per_call))


# -------------------------------------------------------------------------------------------------
# 4. the fixed work of whole passes
# -------------------------------------------------------------------------------------------------


def _time_passes(eng, configs: list[tuple[int, int, bool]], vocab_size: int, repeat: int):
    """`repeat + 1` engine passes per (tokens, start, logits) configuration, the routing
    recorded; the first of each builds the graphs."""
    trace = eng.record_trace()
    walls = []
    rng = np.random.default_rng(2)
    for T, start, logits in configs:
        rows = np.arange(T) if logits else None
        for _ in range(repeat + 1):
            tokens = rng.integers(0, vocab_size, size=T).astype(np.int32)
            walls.append(timed(lambda: eng.model.forward(tokens, start, rows=rows)))
    eng.stop_trace()
    return trace, np.asarray(walls)


def measure_fixed_work(eng, shape: ModelShape, expert_costs: Costs, policy: str, slots: int, n_ctx: int,
                       repeat: int, evidence: Evidence, log) -> FixedCosts:
    """Whole passes less the expert work `expert_costs` predicts for their routing."""
    configs = [(32, s, logits) for logits in (True, False) for s in (0, 256, 768) if s + 32 <= n_ctx]
    configs += [(64, 0, False), (min(128, n_ctx), 0, False)]
    trace, walls = _time_passes(eng, configs, shape.vocab_size, repeat)
    counts = replay_counts(trace, policy, slots)
    variable = predict_counts(counts, shape, expert_costs).pass_seconds
    # one point per configuration: its mean pass (the graph-building first one left out)
    per_config = repeat + 1
    groups = [np.arange(c * per_config + 1, (c + 1) * per_config) for c in range(len(configs))]
    first = np.asarray([g[0] for g in groups])
    tokens = counts.tokens[first].astype(float)
    keys = (counts.start + counts.tokens)[first].astype(float)
    L = shape.n_moe_layers
    mean_wall = np.asarray([walls[g].mean() for g in groups])
    mean_expert = np.asarray([variable[g].mean() for g in groups])
    residual = np.maximum(mean_wall - mean_expert, 1e-6)
    X = np.column_stack([np.full(len(tokens), L), L * tokens, L * tokens * keys, counts.logits[first]])
    (l0, l1, l2, lm), err = fit_nonnegative(X, residual)
    evidence.fit_errors["fixed"] = err
    evidence.samples["fixed"] = {"tokens": tokens.tolist(), "keys": keys.tolist(),
                                 "logits": counts.logits[first].tolist(), "seconds": mean_wall.tolist(),
                                 "expert_seconds": mean_expert.tolist(), "all_seconds": walls.tolist()}
    log(f"profile [4/4] fixed work: {len(walls)} passes, {l0 * 1e6:.0f} us per MoE layer + "
        f"{l1 * 1e6:.2f} us per token + LM head {lm * 1e3:.2f} ms (median fit error {100 * err:.1f}%)")
    return FixedCosts(layer_s=float(l0), layer_per_token_s=float(l1), layer_per_token_key_s=float(l2),
                      logits_pass_s=float(lm))


# -------------------------------------------------------------------------------------------------
# the whole profile
# -------------------------------------------------------------------------------------------------


def _measure_experts(eng, shape: ModelShape, slots: int, repeat: int, evidence: Evidence,
                     log) -> tuple[ExpertCosts, ExpertCosts, float]:
    """Stages 2-3: the CPU and device shares alone, then both at once (their slowdown)."""
    bench = ExpertBench(eng, shape, slots, repeat)
    try:
        cpu = measure_cpu_experts(bench, evidence, log)
        device = measure_device_experts(bench, evidence, log)
        return cpu, device, measure_overlap(bench, cpu, device, evidence, log)
    finally:
        bench.close()


def measure(model_path, device: str = "auto", *, threads: int | None = None, n_ctx: int = 1024, repeat: int = 5,
            log=_log) -> Profile:
    """Measure this machine on `model_path` (a LLaDA2 GGUF) with the engine's own pieces."""
    device = resolve_device(device)
    with ModelFile(model_path) as model:
        shape = shape_from_file(model)
        n_ctx = min(n_ctx, model.config.context_length)
        log(f"profile: device {device}, model {shape.name} ({shape.n_moe_layers} MoE layers, {shape.n_experts} "
            f"experts of {shape.expert_bytes / 2**20:.2f} MiB)")
        eng, policy, slots = open_engine(model_path, device, shape.n_experts, threads=threads, n_ctx=n_ctx)
        evidence = Evidence()
        try:
            uploads = measure_uploads(eng, model, shape, slots, repeat, evidence, log)
            cpu, dev, slowdown = _measure_experts(eng, shape, slots, repeat, evidence, log)
            fixed = measure_fixed_work(eng, shape, assemble_costs(cpu, dev, uploads=uploads, overlap_slowdown=slowdown),
                                       policy, slots, n_ctx, repeat, evidence, log)
            machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                       "cpu_count": os.cpu_count(), "device_threads": eng.backend.n_threads,
                       "cpu_expert_threads": eng.cpu_backend.n_threads, "n_ctx": n_ctx,
                       "measured_with": {"policy": policy, "slots": slots}}
        finally:
            eng.close()
    costs = assemble_costs(cpu, dev, uploads=uploads, fixed=fixed, overlap_slowdown=slowdown)
    figures = {f.name: float(getattr(costs, f.name)) for f in fields(Costs)}
    figures["copies_per_expert"] = costs.copies_per_expert
    return Profile(device=device, source="measured", description=f"measured on this machine with {shape.name}",
                   model={"name": shape.name, **shape.signature()}, costs=figures, machine=machine,
                   samples=evidence.samples, fit_errors={k: float(v) for k, v in evidence.fit_errors.items()},
                   created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
