"""What a routing trace says about the routing: how stable it is between denoising steps of a
block (the premise of interval refresh) and how evenly a layer uses its experts."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from tide_local.experts.trace import RoutingTrace


def _counts(trace: RoutingTrace, experts: np.ndarray) -> np.ndarray:
    return np.bincount(experts.ravel(), minlength=trace.n_experts).astype(float)


def step_pairs(trace: RoutingTrace, lag: int = 1) -> Iterator[tuple[dict, dict]]:
    """Denoising passes of the same block `lag` steps apart."""
    steps = [p for p in trace.passes if p["logits"]]
    for i, p in enumerate(steps):
        j = i + lag
        if j < len(steps) and steps[j]["start"] == p["start"] and steps[j]["step"] == p["step"] + lag:
            yield p, steps[j]


def step_similarity(trace: RoutingTrace, lag: int = 1) -> float:
    """Mean cosine similarity of expert-count vectors of denoising steps `lag` apart in a block
    (the paper's measure of in-block routing stability)."""
    sims = []
    for p, q in step_pairs(trace, lag):
        for layer, experts in p["layers"].items():
            c1, c2 = _counts(trace, experts), _counts(trace, q["layers"][layer])
            sims.append(c1 @ c2 / max(1e-12, np.linalg.norm(c1) * np.linalg.norm(c2)))
    return float(np.mean(sims)) if sims else float("nan")


def top_overlap(trace: RoutingTrace, top: int) -> float:
    """Mean share of the `top` most-used experts of a step that are also the next step's."""
    shares = []
    for p, q in step_pairs(trace):
        for layer, experts in p["layers"].items():
            a = np.argsort(-_counts(trace, experts), kind="stable")[:top]
            b = np.argsort(-_counts(trace, q["layers"][layer]), kind="stable")[:top]
            shares.append(len(set(a.tolist()) & set(b.tolist())) / top)
    return float(np.mean(shares)) if shares else float("nan")


def distinct_per_step(trace: RoutingTrace) -> float:
    """Mean number of distinct experts a layer's denoising step uses."""
    counts = [np.unique(e).size for p in trace.passes if p["logits"] for e in p["layers"].values()]
    return float(np.mean(counts)) if counts else float("nan")


def expert_usage(trace: RoutingTrace) -> dict[int, dict[str, float]]:
    """Per MoE layer over every pass: the share of its experts used at all, and the largest
    expert's share of the layer's assignments (1/n_experts when perfectly even)."""
    return {layer: {"used": float((c > 0).mean()), "largest_share": float(c.max() / max(1, c.sum()))}
            for layer, c in sorted(trace.popularity().items())}
