"""The cost model: how long a placement takes on a machine, from a routing trace.

A placement is a policy, a refresh interval `tau` and the expert slots of every MoE
layer. The trace is replayed through the engine's own policy code (as
`tide_local.experts.replay` does, and checked against it), which gives, per pass and
layer, exactly what the engine would see: hits, misses (CPU token-slots), uploads, and
how many distinct experts each side runs. A profile (`tide_local.planner.profile`)
turns those counts into seconds the way the engine spends them in one MoE layer:

    uploads (synchronous, before the layer's experts)
    + copy of the layer input to the host        (when there are misses)
    + max(device hits, CPU misses)               (they run concurrently; on an emulated device,
                                                  which shares the host, plus a measured slowdown)
    + copy of the CPU outputs back to the device (when there are misses)
    + fixed work: attention, router, shared expert, combine, host routing

A pass adds its MoE layers and, when it yields logits, the LM head. A block is its
denoising steps plus the commit pass that writes its final K/V.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tide_local.experts.policies import DEFAULT_TAU, Policy, refresh_layer
from tide_local.experts.offload import padded_rows
from tide_local.experts.replay import start_policy
from tide_local.errors import TraceError
from tide_local.experts.trace import RoutingTrace
from tide_local.planner.shape import ModelShape

BASELINES = ("swap", "static", "lru", "cpu")


@dataclass(frozen=True)
class Costs:
    """Seconds of each piece of work for one model on one machine (see Profile.costs)."""

    upload_per_copy_s: float
    upload_per_byte_s: float
    copies_per_expert: int
    upload_per_call_s: float  # once per layer and pass that uploads (host-side bookkeeping)
    cpu_per_call_s: float
    cpu_per_weight_byte_s: float
    cpu_per_flop_s: float
    device_per_call_s: float
    device_per_weight_byte_s: float
    device_per_flop_s: float
    layer_s: float
    layer_per_token_s: float
    layer_per_token_key_s: float
    logits_pass_s: float
    # > 1 when the device and the CPU share cores or memory bandwidth (an emulated device): while both
    # run, each progresses this many times slower, so a layer takes max + (slowdown - 1) * min
    overlap_slowdown: float = 1.0

    def adaptive_prices(self, shape: ModelShape) -> tuple[float, float]:
        """The adaptive policy's prices in CPU miss rows: (one expert's upload, reading one
        missed expert's weights on the CPU)."""
        row = max(self.cpu_per_flop_s * shape.expert_flops_per_row, 1e-15)
        upload = float(self.upload_seconds(1, shape.expert_bytes)) - self.upload_per_call_s
        return upload / row, self.cpu_per_weight_byte_s * shape.expert_bytes / row

    def upload_seconds(self, experts, expert_bytes: int):
        """One layer uploading `experts` experts (each `copies_per_expert` copies: gate, up, down)."""
        experts = np.asarray(experts)
        return np.where(experts > 0, self.upload_per_call_s, 0.0) + experts * (
            self.copies_per_expert * self.upload_per_copy_s + self.upload_per_byte_s * expert_bytes)

    def copy_seconds(self, nbytes):
        """One host<->device copy of `nbytes` (activations; both directions assumed alike)."""
        return self.upload_per_copy_s + self.upload_per_byte_s * np.asarray(nbytes)

    def cpu_seconds(self, rows, experts, shape: ModelShape):
        """The CPU share of a layer: `rows` missed token-slots over `experts` distinct experts.
        The engine pads rows (`padded_rows`: graphs are built per padded count)."""
        rows = np.asarray(rows)
        padded = padded_rows(rows)
        t = (self.cpu_per_call_s + self.cpu_per_weight_byte_s * np.asarray(experts) * shape.expert_bytes
             + self.cpu_per_flop_s * padded * shape.expert_flops_per_row)
        return np.where(rows > 0, t, 0.0)

    def device_seconds(self, rows, experts, shape: ModelShape, calls=1):
        """The device share of a layer: the slot pool's mul_mat_id over every (token, choice)
        row (misses ride along with weight 0) and `experts` distinct slots (a layer without
        hits runs no device graph: count it with `has_hits`)."""
        calls = np.asarray(calls)
        return (calls * self.device_per_call_s + self.device_per_weight_byte_s * np.asarray(experts) * shape.expert_bytes
                + calls * self.device_per_flop_s * np.asarray(rows) * shape.expert_flops_per_row)

    def layer_fixed_seconds(self, tokens, keys):
        return self.layer_s + self.layer_per_token_s * np.asarray(tokens) + \
            self.layer_per_token_key_s * np.asarray(tokens) * np.asarray(keys)


# -------------------------------------------------------------------------------------------------
# replay with the counts the cost model needs
# -------------------------------------------------------------------------------------------------


@dataclass
class PlacementCounts:
    """Per pass [P] and per pass and MoE layer [P, L] what the engine would count."""

    policy: str
    tau: int | None
    slots: dict[int, int]
    layers: list[int]
    kind: list[str]
    start: np.ndarray
    step: np.ndarray
    tokens: np.ndarray
    logits: np.ndarray  # bool: the pass ran the LM head
    block: np.ndarray  # decode block index (-1 for prefill passes)
    hits: np.ndarray
    misses: np.ndarray
    uploads: np.ndarray
    cpu_experts: np.ndarray  # distinct experts among the misses
    device_experts: np.ndarray  # distinct slots the device graph reads (0 when the layer has none)
    device_calls: np.ndarray | None = None  # device graph runs (rounds of a device-only policy); None: 1
    prefetched: bool = False  # the uploads were chosen before the pass (they overlap the layer's fixed work)

    @property
    def n_blocks(self) -> int:
        return int(self.block.max()) + 1 if len(self.block) and self.block.max() >= 0 else 0

    def as_replay(self) -> list[dict]:
        """The per-pass {layer: (hits, misses, uploads)} that `replay()` and the engine's
        `per_step` statistics report."""
        return [{"start": int(self.start[i]), "step": int(self.step[i]), "tokens": int(self.tokens[i]),
                 "kind": self.kind[i],
                 "layers": {layer: (int(self.hits[i, j]), int(self.misses[i, j]), int(self.uploads[i, j]))
                            for j, layer in enumerate(self.layers)}}
                for i in range(len(self.kind))]


def _blocks(kinds: list[str], starts: list[int]) -> np.ndarray:
    """Decode block of each pass: a block is a run of steps at one start plus its commit."""
    block, current, prev = [], -1, None
    for kind, start in zip(kinds, starts):
        if kind == "prefill":
            block.append(-1)
            prev = None
            continue
        if kind == "step" and prev != ("step", start) and prev != ("commit", start):
            current += 1
        block.append(current)
        prev = (kind, start)
    return np.asarray(block, dtype=np.int64)


def replay_counts(trace: RoutingTrace, policy: Policy | str, slots: int | dict[int, int], *, tau: int = DEFAULT_TAU,
                  popularity: dict[int, np.ndarray] | None = None) -> PlacementCounts:
    """Run `policy` over `trace` as the engine would (the same start and per-layer refresh as
    `tide_local.experts.replay.replay`) and count what the cost model needs."""
    name = policy if isinstance(policy, str) else policy.name
    layers = list(trace.moe_layers)
    per_layer = slots if isinstance(slots, dict) else {layer: int(slots) for layer in layers}
    if name == "cpu":
        per_layer = {layer: 0 for layer in layers}
    policy, layer_slots = start_policy(trace, policy, {layer: per_layer[layer] for layer in layers}, tau=tau,
                                       popularity=popularity)
    kinds = [p["kind"] for p in trace.passes]
    P, L = len(trace.passes), len(layers)
    arrays = {k: np.zeros((P, L), dtype=np.int64) for k in ("hits", "misses", "uploads", "cpu", "device", "calls")}
    start, step, tokens, logits = (np.zeros(P, dtype=np.int64) for _ in range(4))
    for i, p in enumerate(trace.passes):
        start[i], step[i], tokens[i], logits[i] = p["start"], p["step"], p["tokens"], p["logits"]
        for j, layer in enumerate(layers):
            experts = p["layers"].get(layer)
            if experts is None:
                continue
            s = layer_slots[layer]
            refresh = refresh_layer(policy, s, experts, p["step"], i + 1, refresh=p["kind"] != "commit")
            hits, misses, uploads = refresh.tally()
            resident = s.slot_of_expert >= 0
            used = refresh.counts > 0
            device = 0
            if s.n_slots:
                device = int(np.count_nonzero(used & resident))
                slot0 = s.expert_of_slot[0]
                if hits and misses and not (slot0 >= 0 and refresh.counts[slot0] > 0):
                    device += 1  # missed rows read slot 0 with weight 0
            arrays["hits"][i, j], arrays["misses"][i, j], arrays["uploads"][i, j] = hits, misses, uploads
            if refresh.rounds:  # every used expert was resident in some round
                device = int(np.count_nonzero(used))
            arrays["cpu"][i, j] = 0 if refresh.rounds else int(np.count_nonzero(used & ~resident))
            arrays["device"][i, j] = device
            arrays["calls"][i, j] = 1 + len(refresh.rounds)
    return PlacementCounts(name, getattr(policy, "tau", None), dict(per_layer), layers, kinds, start, step, tokens,
                           logits.astype(bool), _blocks(kinds, [int(x) for x in start]), arrays["hits"],
                           arrays["misses"], arrays["uploads"], arrays["cpu"], arrays["device"], arrays["calls"],
                           policy.prefetches)


# -------------------------------------------------------------------------------------------------
# counts → seconds
# -------------------------------------------------------------------------------------------------


@dataclass
class LayerTimes:
    """Seconds per pass and MoE layer [P, L]."""

    upload: np.ndarray
    transfer: np.ndarray  # activations to the host and CPU outputs back
    cpu: np.ndarray
    device: np.ndarray
    fixed: np.ndarray
    slowdown: float = 1.0

    @property
    def overlapped(self) -> np.ndarray:
        """The device and CPU shares run at once: the longer one, plus what sharing costs."""
        return np.maximum(self.cpu, self.device) + (self.slowdown - 1) * np.minimum(self.cpu, self.device)

    @property
    def cpu_as_run(self) -> np.ndarray:
        """The CPU share's duration while the device also works (what the engine's statistics time)."""
        return self.cpu + (self.slowdown - 1) * np.minimum(self.cpu, self.device)

    @property
    def total(self) -> np.ndarray:
        return self.variable + self.fixed

    @property
    def variable(self) -> np.ndarray:
        """What the placement decides (everything but the fixed work)."""
        return self.upload + self.transfer + self.overlapped


def layer_times(counts: PlacementCounts, shape: ModelShape, costs: Costs) -> LayerTimes:
    tokens = counts.tokens[:, None]
    has_slots = np.array([counts.slots.get(layer, 0) > 0 for layer in counts.layers])[None, :]
    missed = counts.misses > 0
    H, K = shape.hidden_size, shape.n_experts_used
    upload = costs.upload_seconds(counts.uploads, shape.expert_bytes)
    calls = counts.device_calls if counts.device_calls is not None else np.ones_like(counts.hits)
    # the layer's input to the host, and only the missed rows (plus their index) back
    transfer = np.where(missed, costs.copy_seconds(tokens * H * 4) + costs.copy_seconds(counts.misses * H * 4
                                                                                        + tokens * K * 4), 0.0)
    transfer = transfer + (calls - 1) * costs.copy_seconds(tokens * K * H * 4)  # each round's outputs come back
    cpu = costs.cpu_seconds(counts.misses, counts.cpu_experts, shape)
    device = np.where(has_slots & (counts.hits > 0),
                      costs.device_seconds(tokens * K, counts.device_experts, shape, calls), 0.0)
    keys = (counts.start + counts.tokens)[:, None]
    fixed = np.broadcast_to(costs.layer_fixed_seconds(tokens, keys), upload.shape).astype(float)
    if counts.prefetched:  # issued before the layer's attention and router run: only the excess shows
        upload = np.maximum(0.0, upload - fixed)
    return LayerTimes(upload, transfer, cpu, device, fixed, costs.overlap_slowdown)


@dataclass
class Prediction:
    """A placement's predicted costs over a trace; per-block figures are means over its decode blocks."""

    policy: str
    tau: int | None
    slots: dict[int, int]
    blocks: int
    block_seconds: float
    step_seconds: float  # mean denoising step
    steps_per_block: float
    uploads_per_block: float
    upload_seconds_per_block: float
    cpu_token_slots_per_block: float
    cpu_seconds_per_block: float
    device_seconds_per_block: float
    fixed_seconds_per_block: float
    hit_rate: float
    prefill_seconds: float
    tokens_per_second: float
    pass_seconds: np.ndarray = field(repr=False)  # [P]
    layer_seconds_per_block: dict[int, float] = field(repr=False, default_factory=dict)  # variable part per layer
    counts: PlacementCounts | None = field(repr=False, default=None)

    @property
    def label(self) -> str:
        return self.policy + (f" tau={self.tau}" if self.policy == "tide" and self.tau else "")

    def summary(self) -> dict:
        keys = ("policy", "tau", "blocks", "block_seconds", "step_seconds", "steps_per_block", "uploads_per_block",
                "upload_seconds_per_block", "cpu_token_slots_per_block", "cpu_seconds_per_block",
                "device_seconds_per_block", "fixed_seconds_per_block", "hit_rate", "prefill_seconds",
                "tokens_per_second")
        out = {k: getattr(self, k) for k in keys}
        out["slots"] = {str(k): v for k, v in self.slots.items()}
        return out


def predict_counts(counts: PlacementCounts, shape: ModelShape, costs: Costs) -> Prediction:
    t = layer_times(counts, shape, costs)
    pass_seconds = t.total.sum(axis=1) + np.where(counts.logits, costs.logits_pass_s, 0.0)
    decode = counts.block >= 0
    n_blocks = max(1, counts.n_blocks)
    steps = decode & counts.logits

    def per_block(x):
        return float(np.asarray(x)[decode].sum() / n_blocks)

    block_seconds = per_block(pass_seconds)
    hits, misses = counts.hits[decode].sum(), counts.misses[decode].sum()
    layer_var = t.variable
    return Prediction(
        policy=counts.policy, tau=counts.tau if counts.policy in ("tide", "prefetch") else None, slots=counts.slots,
        blocks=counts.n_blocks, block_seconds=block_seconds,
        step_seconds=float(pass_seconds[steps].mean()) if steps.any() else 0.0,
        steps_per_block=float(steps.sum() / n_blocks),
        uploads_per_block=per_block(counts.uploads.sum(axis=1)),
        upload_seconds_per_block=per_block(t.upload.sum(axis=1)),
        cpu_token_slots_per_block=per_block(counts.misses.sum(axis=1)),
        cpu_seconds_per_block=per_block(t.cpu.sum(axis=1)),
        device_seconds_per_block=per_block(t.device.sum(axis=1)),
        fixed_seconds_per_block=per_block(t.fixed.sum(axis=1) + np.where(counts.logits, costs.logits_pass_s, 0.0)),
        hit_rate=float(hits / max(1, hits + misses)),
        prefill_seconds=float(pass_seconds[~decode].sum()),
        tokens_per_second=shape.block_length / block_seconds if block_seconds > 0 else 0.0,
        pass_seconds=pass_seconds,
        layer_seconds_per_block={layer: float(layer_var[decode, j].sum() / n_blocks)
                                 for j, layer in enumerate(counts.layers)},
        counts=counts,
    )


def predict(trace: RoutingTrace, shape: ModelShape, costs: Costs, policy: Policy | str, slots: int | dict[int, int], *,
            tau: int = DEFAULT_TAU, popularity: dict[int, np.ndarray] | None = None) -> Prediction:
    """Predicted costs of `policy` with `slots` per MoE layer (and `tau` for tide) over `trace`."""
    return predict_counts(replay_counts(trace, policy, slots, tau=tau, popularity=popularity), shape, costs)


def check_trace(trace: RoutingTrace, shape: ModelShape, source: str = "the trace") -> None:
    """A trace recorded on a model of another shape cannot be replayed for this one."""
    if trace.n_experts != shape.n_experts or trace.n_used != shape.n_experts_used or \
            list(trace.moe_layers) != list(shape.moe_layers):
        raise TraceError(
            f"{source} is of a model with {trace.n_experts} experts (top-{trace.n_used}) and MoE layers "
            f"{trace.moe_layers[:1]}..{trace.moe_layers[-1:]}, not of {shape.name} ({shape.n_experts} experts, "
            f"top-{shape.n_experts_used}, MoE layers {list(shape.moe_layers[:1])}..{list(shape.moe_layers[-1:])}); "
            "record one with this model (`tide plan` does when no --trace is given)")
    if not any(p["logits"] for p in trace.passes):
        raise TraceError(f"{source} has no denoising steps: record it with `tide generate --trace FILE`")
