"""Where a step's ggml compute goes: its matmuls and attention run one op kind at a time.

`op_jobs` builds, over the model's own weights, one small graph per op kind and layer (the
routed experts with the routing a real step chose), each a job returning seconds per step.
Their sum is what ggml's kernels need for the step when nothing else runs: the step's own
time over it shows what our graphs add (norms, RoPE, copies, adds, graph start-ups)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from tide_local import ggml
from tide_local.model import forward
from tide_local.model.experts import routed_experts

BLOCK = 32
F32, F16, I32 = int(ggml.GGMLType.F32), int(ggml.GGMLType.F16), int(ggml.GGMLType.I32)


def time_graph(backend, build, reps: int = 3) -> float:
    """Median seconds of one graph built by build(ctx) -> (outputs, {input: array})."""
    ctx = ggml.Context(max_tensors=64)
    outputs, feeds = build(ctx)
    graph = ctx.build_graph(*outputs)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        backend.compute(graph, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def op_jobs(eng, context: int, n_rows: int, routings: list, reps: int = 3) -> list:
    """(category, job → seconds per step) pairs: where the ggml compute of a step goes, from the step's matmuls and attention run one op
    kind at a time over the model's own weights (every layer; the routed experts with each timed
    step's own routing, averaged), ms per step.
    Isolated ops: they leave out the norms, RoPE, K/V copies and adds, which are the rest."""
    cfg, w, backend = eng.config, eng.model.weights, eng.backend
    rng = np.random.default_rng(0)
    T, H, K = BLOCK, cfg.hidden_size, cfg.n_experts_used
    hd, nh, nkv, n_kv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads, context + BLOCK
    x_np = rng.standard_normal((T, H)).astype(np.float32)  # the routed experts' input

    def matmuls(*weights, n=T):
        def build(ctx):
            outs, feeds = [], {}
            for wt in weights:
                x = ctx.new_tensor(F32, ne=(wt.ne[0], n), input=True)
                feeds[x] = rng.standard_normal((n, wt.ne[0])).astype(np.float32)
                outs.append(ctx.mul_mat(wt, x))
            return outs, feeds
        return time_graph(backend, build, reps)

    def attention(ctx):  # the engine's own attention over a cache of exactly n_kv positions
        q = ctx.new_tensor(F32, ne=(hd, nh, T), input=True)
        kc = ctx.new_tensor(F32, ne=(hd, nkv, n_kv), input=True)
        vc = ctx.new_tensor(F32, ne=(n_kv, hd * nkv), input=True)
        mask = ctx.new_tensor(F16, ne=(n_kv, T * (nh // nkv)), input=True)
        out = forward.attention_core(ctx, q, kc, vc, n_kv, n_kv, mask)
        feeds = {q: rng.standard_normal((T, nh, hd)).astype(np.float32),
                 kc: rng.standard_normal((n_kv, nkv, hd)).astype(np.float32),
                 vc: rng.standard_normal((hd * nkv, n_kv)).astype(np.float32),
                 mask: forward.attention_mask(context, T, BLOCK, nh // nkv)}
        return [out], feeds

    def experts(layer):
        """mean over the steps, each with the routing that step chose"""
        lw = w.layers[layer]
        ctx = ggml.Context(max_tensors=64)
        x = ctx.new_tensor(F32, ne=(H, T), input=True)
        ids = ctx.new_tensor(I32, ne=(K, T), input=True)
        wts = ctx.new_tensor(F32, ne=(1, K, T), input=True)
        graph = ctx.build_graph(routed_experts(ctx, lw.experts, x, ids, wts))  # the engine's own
        times = []
        for i, routing in enumerate([routings[0]] + list(routings)):  # the first is a warm-up
            e, wt = routing[layer]
            t0 = time.perf_counter()
            backend.compute(graph, {x: x_np, ids: e, wts: wt.reshape(T, K, 1)})
            if i:
                times.append(time.perf_counter() - t0)
        return float(np.mean(times))

    jobs = [("attn_core", lambda: len(w.layers) * time_graph(backend, attention, reps))]
    for i, lw in enumerate(w.layers):
        jobs.append(("attn_proj", lambda lw=lw: matmuls(lw.attn_qkv) + matmuls(lw.attn_output)))
        if i in cfg.moe_layers:
            jobs.append(("routed_experts", lambda i=i: experts(i)))
            jobs.append(("router", lambda lw=lw: matmuls(lw.router)))
            if lw.shared_gate is not None:
                jobs.append(("shared_expert", lambda lw=lw: matmuls(lw.shared_gate, lw.shared_up, lw.shared_down)))
        else:
            jobs.append(("dense_ffn", lambda lw=lw: matmuls(lw.ffn_gate, lw.ffn_up, lw.ffn_down)))
    jobs.append(("lm_head", lambda: matmuls(w.output, n=n_rows)))
    return jobs


OP_KINDS = ("routed_experts", "shared_expert", "attn_proj", "attn_core", "router", "dense_ffn", "lm_head")
