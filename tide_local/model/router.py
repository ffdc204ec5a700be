"""LLaDA2's MoE router, on the host: group-limited top-k over sigmoid scores.

Runs in numpy on the router's float32 logits, vectorised over tokens. The offload engine
needs the routing on the host before the layer's experts run (to split hits from misses),
so the forward computes router logits in ggml and selects here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Routing:
    """Per token: the chosen experts and their weights, both [n_tokens, n_used]."""

    experts: np.ndarray  # int32
    weights: np.ndarray  # float32


def route(
    logits: np.ndarray,
    expert_bias: np.ndarray,
    *,
    n_used: int,
    n_groups: int,
    n_groups_used: int,
    scale: float,
) -> Routing:
    """Select experts from router logits [n_tokens, n_experts].

    scores = sigmoid(logits); selection uses scores + bias; a group's score is the sum of
    its two best biased scores and only the best `n_groups_used` groups compete; weights
    are the unbiased scores of the chosen experts, normalised, times `scale`.
    """
    n_tokens, n_experts = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
    biased = scores + expert_bias.astype(np.float32)[None, :]
    if n_groups > 1 and n_groups_used < n_groups:
        grouped = biased.reshape(n_tokens, n_groups, n_experts // n_groups)
        top2 = np.partition(grouped, -2, axis=2)[:, :, -2:].sum(axis=2) if grouped.shape[2] > 1 else grouped[:, :, 0]
        dropped = np.argsort(-top2, axis=1, kind="stable")[:, n_groups_used:]
        mask = np.zeros((n_tokens, n_groups), dtype=bool)
        np.put_along_axis(mask, dropped, True, axis=1)
        biased = np.where(np.repeat(mask, n_experts // n_groups, axis=1), -np.inf, biased)
    # top-k by biased score, highest first (stable order keeps the result deterministic)
    experts = np.argsort(-biased, axis=1, kind="stable")[:, :n_used].astype(np.int32)
    chosen = np.take_along_axis(scores, experts, axis=1)
    weights = chosen / (chosen.sum(axis=1, keepdims=True) + 1e-20) * scale
    return Routing(experts, weights.astype(np.float32))
