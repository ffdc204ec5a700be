"""Synthetic routing traces, for predictions about models whose routing we cannot record.

The stochastic model (per MoE layer, independent across layers):

* the context favours some experts: a popularity vector ``z ~ N(0, skew²)`` over the
  experts, drawn once per generation and drifting between blocks as an AR(1) process
  with coefficient ``block_drift``;
* each token of a block has its own preferences ``u_i ~ N(0, 1)`` over the experts and
  routes to the top-K experts of ``z + u_i`` (with a Gaussian ``u`` this is a smooth
  version of sampling K experts without replacement in proportion to popularity);
* from one denoising step to the next every token's preferences move as an AR(1)
  process, ``u_i ← stability·u_i + sqrt(1 − stability²)·ε``: ``stability`` = 1 routes
  every step identically, 0 redraws it;
* a block is ``steps`` denoising passes of ``block_length`` tokens, then a commit pass
  (one more move); a new block starts with fresh tokens; the prompt is one prefill
  pass of independent tokens.

Two knobs are calibrated (``calibrate``): ``stability`` so that the cosine similarity
of adjacent steps' expert-count vectors (routed token-slots per expert at one step,
averaged over layers, steps and blocks) matches the paper's 0.985, and ``skew`` so that
refreshing every step (tau = 1) with half the experts resident hits the paper's
measured 0.95 on LLaDA2.0-mini. Both are statements about the paper's measurements
(whole-window routing, real weights), applied here to 32-token passes: the result is
a plausible trace, not a recorded one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from tide_local.diffusion.blockmodel import PassInfo
from tide_local.experts.trace import RoutingTrace
from tide_local.experts.trace_stats import step_similarity

TARGET_ADJACENT_SIMILARITY = 0.985  # paper: adjacent denoising steps, within a block
TARGET_HIT_RATE = 0.95  # paper's code notebook: mini, 128 of 256 resident, tau = 1


@dataclass(frozen=True)
class SynthSpec:
    n_experts: int = 256
    n_used: int = 8
    moe_layers: tuple[int, ...] = tuple(range(1, 20))
    blocks: int = 4
    steps: int = 16
    block_length: int = 32
    prompt_tokens: int = 64
    stability: float = 0.9
    skew: float = 1.0
    block_drift: float = 0.9
    seed: int = 0


def synthesize(spec: SynthSpec, name: str = "synthetic") -> RoutingTrace:
    rng = np.random.default_rng(spec.seed)
    E, K, T = spec.n_experts, spec.n_used, spec.block_length
    layers = list(spec.moe_layers)
    trace = RoutingTrace(name, E, K, layers)
    z = {layer: spec.skew * rng.standard_normal(E) for layer in layers}
    a, b = spec.stability, float(np.sqrt(max(0.0, 1.0 - spec.stability ** 2)))

    def top_k(scores: np.ndarray) -> np.ndarray:
        return np.argpartition(-scores, K - 1, axis=-1)[..., :K].astype(np.int32)

    if spec.prompt_tokens:
        trace.begin_pass(0, spec.prompt_tokens, False, PassInfo("prefill"))
        for layer in layers:
            trace.record(layer, top_k(z[layer] + rng.standard_normal((spec.prompt_tokens, E))))
    start = -(-spec.prompt_tokens // T) * T
    for _ in range(spec.blocks):
        u = {layer: rng.standard_normal((T, E)) for layer in layers}
        for step in range(spec.steps + 1):  # the steps, then the commit pass
            info = PassInfo.step_at(start, T, step) if step < spec.steps else PassInfo.commit_at(start, T)
            trace.begin_pass(start, T, step < spec.steps, info)
            for layer in layers:
                if step:
                    u[layer] = a * u[layer] + b * rng.standard_normal((T, E))
                trace.record(layer, top_k(z[layer] + u[layer]))
        for layer in layers:
            z[layer] = spec.block_drift * z[layer] + np.sqrt(1 - spec.block_drift ** 2) * spec.skew * \
                rng.standard_normal(E)
        start += T
    return trace


def swap_hit_rate(trace: RoutingTrace, slots: int) -> float:
    """Hit rate of refreshing every step to the step's top-`slots` experts (tau = 1)."""
    hits = total = 0
    for p in trace.passes:
        if not p["logits"]:
            continue
        for experts in p["layers"].values():
            counts = np.sort(np.bincount(experts.ravel(), minlength=trace.n_experts))[::-1]
            hits += counts[:slots].sum()
            total += experts.size
    return hits / max(1, total)


def _bisect(f, lo: float, hi: float, target: float, iters: int = 18) -> float:
    """x in [lo, hi] with f(x) ≈ target, f increasing."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def calibrate(spec: SynthSpec, similarity: float = TARGET_ADJACENT_SIMILARITY, hit_rate: float = TARGET_HIT_RATE,
              sample_layers: int = 4) -> SynthSpec:
    """`spec` with `skew` and `stability` fitted to the targets (on a few layers and blocks)."""
    probe = replace(spec, moe_layers=tuple(range(1, 1 + sample_layers)), blocks=3, seed=spec.seed + 1)
    half = spec.n_experts // 2
    for _ in range(2):  # the two knobs interact a little: alternate twice
        skew = _bisect(lambda s: swap_hit_rate(synthesize(replace(probe, skew=s)), half), 0.0, 6.0, hit_rate)
        probe = replace(probe, skew=skew)
        stability = _bisect(lambda a: step_similarity(synthesize(replace(probe, stability=a))), 0.0, 0.99999,
                            similarity)
        probe = replace(probe, stability=stability)
    return replace(spec, skew=probe.skew, stability=probe.stability)
