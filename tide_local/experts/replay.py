"""Replay a placement policy over a routing trace, exactly as the engine would run it.

The engine's statistics (hits, misses, uploads per pass and layer) depend only on the
routing and the policy, so a recorded trace replayed through the same `Policy`,
`LayerSlots` and per-layer counting (`refresh_layer`, which `HybridExperts.place` uses)
reproduces them without running the model: this is how policies and refresh intervals
are compared on a large model, and what the planner's cost model counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tide_local.experts.policies import DEFAULT_TAU, LayerSlots, Policy, make_policy, refresh_layer
from tide_local.experts.trace import RoutingTrace


@dataclass
class ReplayResult:
    policy: str
    slots: dict[int, int]
    # per pass: {layer: (hits, misses, uploads)}, with the pass's block start, step and tokens
    passes: list[dict] = field(default_factory=list)

    def totals(self, layers: list[int] | None = None, *, decode_only: bool = False) -> dict:
        """Hits, misses and uploads summed over the passes (`decode_only`: prefill passes left
        out) and per block; blocks are counted by their first steps, so a trace of several
        generations counts every one's blocks."""
        hits = misses = uploads = 0
        for p in self.passes:
            if decode_only and p["kind"] == "prefill":
                continue
            for layer, (h, m, u) in p["layers"].items():
                if layers is None or layer in layers:
                    hits, misses, uploads = hits + h, misses + m, uploads + u
        blocks = sum(p["kind"] == "step" and p["step"] == 0 for p in self.passes) or 1
        return {"hits": hits, "misses": misses, "hit_rate": hits / max(1, hits + misses), "uploads": uploads,
                "blocks": blocks, "uploads_per_block": uploads / blocks, "cpu_token_slots_per_block": misses / blocks}


def start_policy(trace: RoutingTrace, policy: Policy | str, slots: int | dict[int, int], *, tau: int = DEFAULT_TAU,
                 popularity: dict[int, np.ndarray] | None = None) -> tuple[Policy, dict[int, LayerSlots]]:
    """`policy` (a name, or a Policy) and each MoE layer's `slots` (an int, or per layer) with
    the policy's initial residency, as the engine loads them."""
    if isinstance(policy, str):
        policy = make_policy(policy, tau, popularity)
    per_layer = slots if isinstance(slots, dict) else {layer: int(slots) for layer in trace.moe_layers}
    layer_slots = {layer: LayerSlots(n, trace.n_experts) for layer, n in per_layer.items()}
    for layer, s in layer_slots.items():
        policy.initial(layer, s)
    return policy, layer_slots


def replay(trace: RoutingTrace, policy: Policy | str, slots: int | dict[int, int], *, tau: int = DEFAULT_TAU,
           popularity: dict[int, np.ndarray] | None = None) -> ReplayResult:
    """Run `policy` over `trace` with `slots` per MoE layer (an int, or per layer)."""
    policy, layer_slots = start_policy(trace, policy, slots, tau=tau, popularity=popularity)
    result = ReplayResult(policy.name, {layer: s.n_slots for layer, s in layer_slots.items()})
    for clock, p in enumerate(trace.passes, start=1):
        entry = {"start": p["start"], "step": p["step"], "tokens": p["tokens"], "kind": p["kind"], "layers": {}}
        for layer, experts in p["layers"].items():
            entry["layers"][layer] = refresh_layer(policy, layer_slots[layer], experts, p["step"], clock,
                                                   refresh=p["kind"] != "commit").tally()
        result.passes.append(entry)
    return result
