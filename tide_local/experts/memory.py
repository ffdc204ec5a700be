"""The device memory plan: what sits on the accelerator and how many expert slots fit.

Everything but the routed experts and the token embedding goes to the device (attention,
norms, routers, shared experts, dense layers, LM head, the KV cache and a compute
reserve); what remains of the budget becomes expert slots, the same number in every MoE
layer (never more than the layer has experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tide_local import architecture
from tide_local.errors import BudgetError
from tide_local.modelfile import ModelFile
from tide_local.units import human_bytes, parse_size


def parse_memory(value) -> int:
    """'6GiB', '6000MiB', '6GB', 6442450944 → bytes (see units.parse_size; 0 is allowed)."""
    return parse_size(value, what="memory size", allow_zero=True)


def kv_cache_bytes(cfg: architecture.LLaDA2Config, n_ctx: int) -> int:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * n_ctx * 4  # f32 K and V


def compute_reserve(cfg: architecture.LLaDA2Config, n_ctx: int, block: int = 32) -> int:
    """A bound on one pass's activations for a block: attention scores dominate."""
    scores = 4 * cfg.n_heads * block * n_ctx
    activations = 4 * block * (cfg.qkv_dim + 4 * cfg.hidden_size + 3 * cfg.n_experts_used * cfg.hidden_size)
    return 2 * (scores + activations) + 4 * block * cfg.vocab_size + (16 << 20)


def pool_slots(slots: int, experts_per_token: int) -> int:
    """Slots a layer's device pool holds for `slots` usable ones: at least K (experts per token),
    so that a token's K choices can always name K different slots (offload.distinct_slots);
    the ones past `slots` stay zero. No pool for no slots."""
    return max(slots, experts_per_token) if slots > 0 else 0


@dataclass
class MemoryPlan:
    budget: int
    device_bytes: dict[str, int]  # by kind
    expert_bytes: int  # one expert (gate + up + down) of a MoE layer
    slots: dict[int, int]  # MoE layer → slots
    n_experts: int
    n_ctx: int
    notes: list[str] = field(default_factory=list)
    experts_per_token: int = 1  # pools hold at least this many slots (pool_slots)

    def slot_bytes(self, slots: dict[int, int]) -> int:
        """Device bytes of the expert pools for `slots` per layer."""
        return sum(pool_slots(n, self.experts_per_token) for n in slots.values()) * self.expert_bytes

    @property
    def fixed_bytes(self) -> int:
        return sum(v for k, v in self.device_bytes.items() if k != "expert slots")

    @property
    def total_bytes(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def fits(self) -> bool:
        """Everything the plan puts on the device stays within the budget, and no layer has
        more slots than experts."""
        return self.total_bytes <= self.budget and all(0 <= n <= self.n_experts for n in self.slots.values())

    def with_slots(self, slots: dict[int, int], note: str) -> "MemoryPlan":
        """The same budget, fixed part and context with other expert slots per MoE layer (`note`
        says where they come from); check `fits` before using it."""
        device_bytes = dict(self.device_bytes)
        device_bytes["expert slots"] = self.slot_bytes(slots)
        return replace(self, device_bytes=device_bytes, slots=dict(slots), notes=list(self.notes) + [note])

    @property
    def resident_fraction(self) -> float:
        return sum(self.slots.values()) / max(1, len(self.slots) * self.n_experts)

    def describe(self) -> str:
        lines = [f"device memory plan for a budget of {human_bytes(self.budget)} (context {self.n_ctx}):"]
        for kind, n in self.device_bytes.items():
            lines.append(f"  {kind:<22} {human_bytes(n):>12}")
        lines.append(f"  {'total':<22} {human_bytes(self.total_bytes):>12}")
        per_layer = sorted(set(self.slots.values()))
        slots = str(per_layer[0]) if len(per_layer) == 1 else ", ".join(f"{k}:{v}" for k, v in self.slots.items())
        lines.append(f"  expert slots per MoE layer: {slots} of {self.n_experts} "
                     f"({100 * self.resident_fraction:.1f}% of routed experts resident; "
                     f"{human_bytes(self.expert_bytes)} per expert)")
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)


# What the memory plan calls each device-resident tensor, by role (the rest: "norms and routers").
_DEVICE_KINDS = {
    "output": "LM head",
    "attn_qkv": "attention",
    "attn_output": "attention",
    **{f"shared_{p}": "shared experts" for p in architecture.EXPERT_PROJECTIONS},
    "ffn_gate": "dense layers",
    "ffn_up": "dense layers",
    "ffn_down": "dense layers",
}


def plan_memory(model: ModelFile, budget: int, n_ctx: int, *, max_slots: int | None = None,
                sequences: int = 1) -> MemoryPlan:
    """Slots per MoE layer for `budget` bytes; raises BudgetError naming the smallest budget that works.
    `sequences`: how many sequences are decoded together (each its KV cache of n_ctx, and a
    pass's activations grow with them)."""
    cfg = model.config
    g = model.gguf
    kinds = {"attention": 0, "norms and routers": 0, "shared experts": 0, "dense layers": 0, "LM head": 0}
    roles = {spec.name: spec.role for spec in model.specs}
    for name, t in g.tensors.items():
        role = roles.get(name)
        if role in architecture.PARTLY_READ_ROLES:  # the embedding and the expert stacks stay on the host
            continue
        kinds[_DEVICE_KINDS.get(role, "norms and routers")] += t.nbytes
    kinds["KV cache"] = kv_cache_bytes(cfg, n_ctx) * sequences
    kinds["compute buffers"] = compute_reserve(cfg, n_ctx, block=32 * sequences)
    fixed = sum(kinds.values())
    moe = list(cfg.moe_layers)
    expert_bytes = max((sum(model.experts(layer, p).slice_bytes for p in architecture.EXPERT_PROJECTIONS) for layer in moe),
                       default=0)
    if budget < fixed:
        raise BudgetError(
            f"a device budget of {human_bytes(budget)} cannot hold the non-expert part of the model "
            f"({human_bytes(fixed)} at context {n_ctx}"
            + (f", KV caches for {sequences} sequences decoded together" if sequences > 1 else "")
            + f"); the smallest budget that works is {human_bytes(fixed)} (or lower the context"
            + (" or the sequences decoded together, --max-batch" if sequences > 1 else "") + ")"
        )
    per_layer = (budget - fixed) // max(1, expert_bytes * len(moe)) if moe else 0
    per_layer = min(per_layer, cfg.n_experts if max_slots is None else max_slots)
    padded = pool_slots(per_layer, cfg.n_experts_used) * expert_bytes * len(moe)
    if padded > budget - fixed:  # a pool holds K slots at least, and K do not fit
        per_layer = 0
    plan = MemoryPlan(budget, kinds, expert_bytes, {layer: per_layer for layer in moe}, cfg.n_experts, n_ctx,
                      experts_per_token=cfg.n_experts_used)
    kinds["expert slots"] = plan.slot_bytes(plan.slots)
    if per_layer < cfg.n_experts_used and moe and (max_slots is None or max_slots > 0):
        plan.notes.append(f"fewer slots than experts per token ({cfg.n_experts_used}): most work will run on the CPU")
    if sequences > 1:
        plan.notes.append(f"KV caches and activations for {sequences} sequences decoded together")
    return plan


def budget_for_slots(model: ModelFile, slots: int, n_ctx: int, sequences: int = 1) -> int:
    """The device budget that gives `slots` expert slots per MoE layer."""
    plan = plan_memory(model, 1 << 62, n_ctx, max_slots=0, sequences=sequences)
    return plan.fixed_bytes + plan.slot_bytes({layer: slots for layer in plan.slots})
