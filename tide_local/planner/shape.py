"""What the cost model needs to know about a model: sizes of the things that move and run.

Built from a GGUF (exact byte counts, the memory plan's fixed device bytes) or from a
Hugging Face config and a weight type alone (for predictions about a model that is not
on disk, e.g. LLaDA2.0-mini or -flash in bf16 as the paper ran them).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from tide_local import architecture
from tide_local.experts.memory import compute_reserve, kv_cache_bytes

# Bytes per weight of the types a config-only shape may assume. q4_k_m mixes q4_K and
# q6_K; 4.85 bits is llama.cpp's average for it.
BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 4.85 / 8}


@dataclass(frozen=True)
class ModelShape:
    name: str
    moe_layers: tuple[int, ...]
    n_experts: int
    n_experts_used: int
    hidden_size: int
    expert_ffn_dim: int
    expert_bytes: int  # one routed expert: gate + up + down
    expert_type: str
    layer_bytes: int  # device weights of one MoE layer besides its routed experts
    vocab_size: int
    n_heads: int
    head_dim: int
    block_length: int
    steps: int
    non_expert_bytes: int  # fixed device bytes without the KV cache and compute buffers
    config: architecture.LLaDA2Config = field(repr=False, compare=False)

    @property
    def n_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_flops_per_row(self) -> int:
        """One token through one expert: gate, up and down matmuls."""
        return 6 * self.hidden_size * self.expert_ffn_dim

    @property
    def layer_flops_per_token(self) -> float:
        """Attention projections, router and shared expert of one layer, per token."""
        return 2.0 * self.layer_bytes / max(1e-9, self.bytes_per_weight)

    @property
    def attention_flops_per_token_key(self) -> int:
        """Scores and weighted values, per query token and key position."""
        return 4 * self.n_heads * self.head_dim

    @property
    def bytes_per_weight(self) -> float:
        return self.expert_bytes / max(1, 3 * self.hidden_size * self.expert_ffn_dim)

    def fixed_device_bytes(self, n_ctx: int) -> int:
        """What must sit on the device besides expert slots (the memory plan's fixed part)."""
        return self.non_expert_bytes + kv_cache_bytes(self.config, n_ctx) + compute_reserve(self.config, n_ctx)

    def signature(self) -> dict:
        """The fields a measured profile must agree on to describe this model's costs."""
        return {"n_experts": self.n_experts, "n_experts_used": self.n_experts_used, "hidden_size": self.hidden_size,
                "expert_ffn_dim": self.expert_ffn_dim, "expert_bytes": self.expert_bytes,
                "n_moe_layers": self.n_moe_layers}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        d["moe_layers"] = list(self.moe_layers)
        return d


def shape_from_file(model) -> ModelShape:
    """From an open ModelFile: exact byte counts of this GGUF."""
    from tide_local.experts.memory import plan_memory

    cfg = model.config
    moe = tuple(cfg.moe_layers)
    expert_bytes = max((sum(model.experts(layer, p).slice_bytes for p in architecture.EXPERT_PROJECTIONS) for layer in moe),
                       default=0)
    layer_bytes = 0
    if moe:  # what one MoE layer reads whole (its expert stacks are read in part)
        layer_bytes = sum(model.tensor(spec.name).nbytes for spec in model.specs
                          if spec.layer == moe[0] and not spec.read_in_part)
    gate = model.experts(moe[0], "gate").tensor.type_name if moe else "none"
    plan = plan_memory(model, 1 << 62, 32, max_slots=0)
    kv = kv_cache_bytes(cfg, 32) + compute_reserve(cfg, 32)
    dec = model.decoding_defaults()
    shape = ModelShape(
        name=model.path.name, moe_layers=moe, n_experts=cfg.n_experts, n_experts_used=cfg.n_experts_used,
        hidden_size=cfg.hidden_size, expert_ffn_dim=cfg.expert_ffn_dim, expert_bytes=expert_bytes,
        expert_type=gate, layer_bytes=layer_bytes, vocab_size=cfg.vocab_size, n_heads=cfg.n_heads,
        head_dim=cfg.head_dim, block_length=dec["block_length"], steps=dec["steps"],
        non_expert_bytes=plan.fixed_bytes - kv, config=cfg)
    return shape


def shape_from_config(cfg: architecture.LLaDA2Config, weight_type: str = "bf16", name: str = "model") -> ModelShape:
    """From hyperparameters alone, every matrix in `weight_type` (norms and routers f32),
    with the memory plan's rule of what lives on the device (all but experts and the
    token embedding)."""
    if weight_type not in BYTES_PER_WEIGHT:
        raise ValueError(f"unknown weight type '{weight_type}' (choose from {', '.join(BYTES_PER_WEIGHT)})")
    bpw = BYTES_PER_WEIGHT[weight_type]
    moe = tuple(cfg.moe_layers)
    non_expert = 0
    layer_bytes = 0
    for spec in architecture.tensor_specs(cfg):
        if spec.read_in_part:  # the experts and the embedding table stay in the mapped file
            continue
        n = 1
        for d in spec.ne:
            n *= d
        nbytes = int(n * (4 if spec.always_f32 else bpw))
        non_expert += nbytes
        if moe and spec.layer == moe[0]:
            layer_bytes += nbytes
    expert_bytes = int(3 * cfg.hidden_size * cfg.expert_ffn_dim * bpw)
    shape = ModelShape(
        name=name, moe_layers=moe, n_experts=cfg.n_experts, n_experts_used=cfg.n_experts_used,
        hidden_size=cfg.hidden_size, expert_ffn_dim=cfg.expert_ffn_dim, expert_bytes=expert_bytes,
        expert_type=weight_type, layer_bytes=layer_bytes, vocab_size=cfg.vocab_size, n_heads=cfg.n_heads,
        head_dim=cfg.head_dim, block_length=architecture.DEFAULT_BLOCK_LENGTH, steps=architecture.DEFAULT_STEPS,
        non_expert_bytes=non_expert, config=cfg)
    return shape


def preset_shape(preset: str, weight_type: str = "bf16") -> ModelShape:
    """LLaDA2.0-mini or -flash shaped ('mini', 'flash'), as the test checkpoints define them."""
    from tide_local.converters.testmodel import build_config

    cfg = architecture.LLaDA2Config.from_hf(build_config(preset))
    return shape_from_config(cfg, weight_type, name=f"LLaDA2.0-{preset}-shaped ({weight_type})")
