"""The LLaDA2.0 model family as data: hyperparameters, GGUF keys, tensor names and shapes.

The converter writes these names, `tide info` validates them and the engine reads them,
so they live in one place. GGUF names follow llama.cpp's ``bailingmoe2`` conventions
under the architecture ``llada2``; shapes are given in ggml ``ne`` order (innermost
first), the reverse of the Hugging Face / torch order.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, fields

ARCH = "llada2"
HF_MODEL_TYPES = ("llada2_moe",)
HF_ARCHITECTURES = ("LLaDA2MoeModelLM",)

# Layout of the tide.* keys; bump when the meaning of a key changes.
LAYOUT_VERSION = 1

# Decoding defaults of the model family (block diffusion, threshold decoding).
DEFAULT_BLOCK_LENGTH = 32
DEFAULT_STEPS = 32
DEFAULT_THRESHOLD = 0.95

# Special tokens, found in the tokenizer files by content, never by id.
SPECIAL_TOKENS = {
    "bos": "<|startoftext|>",
    "eos": "<|endoftext|>",
    "mask": "<|mask|>",
    "role_end": "<|role_end|>",
}
# GGUF key holding each special id (llama.cpp's names; end-of-turn is `eot`).
SPECIAL_TOKEN_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "mask": "tokenizer.ggml.mask_token_id",
    "role_end": "tokenizer.ggml.eot_token_id",
}

EXPERT_PROJECTIONS = ("gate", "up", "down")


@dataclass(frozen=True)
class LLaDA2Config:
    """Hyperparameters of one LLaDA2.0 model (names are ours; sources in from_hf/from_gguf)."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # dense layers
    expert_ffn_dim: int
    n_experts: int
    n_experts_used: int
    n_shared_experts: int
    n_groups: int
    n_groups_used: int
    routed_scaling_factor: float
    rope_theta: float
    rotary_dim: int
    rms_eps: float
    context_length: int
    n_dense_layers: int

    # -- derived ---------------------------------------------------------------
    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    @property
    def moe_layers(self) -> range:
        return range(self.n_dense_layers, self.n_layers)

    def check(self) -> list[str]:
        """Inconsistencies that make the model unrunnable (empty when fine)."""
        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and value <= 0 and f.name != "n_dense_layers":
                problems.append(f"{f.name} must be positive (got {value})")
        if problems:
            return problems
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.n_experts % self.n_groups:
            problems.append(f"n_experts {self.n_experts} is not a multiple of n_groups {self.n_groups}")
        if not self.n_groups_used <= self.n_groups:
            problems.append(f"n_groups_used {self.n_groups_used} exceeds n_groups {self.n_groups}")
        if self.n_experts_used > self.n_groups_used * (self.n_experts // self.n_groups):
            problems.append("n_experts_used exceeds the experts of the kept groups")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            problems.append(f"rotary_dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}")
        if self.n_dense_layers > self.n_layers:
            problems.append("more dense layers than layers")
        return problems

    # -- Hugging Face config.json ---------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict) -> "LLaDA2Config":
        """From a LLaDA2.0 config.json; raises KeyError naming a missing field, ValueError on a bad one."""
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        if cfg.get("rotary_dim"):
            rotary_dim = int(cfg["rotary_dim"])
        else:
            rotary_dim = int(head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            head_dim=head_dim,
            ffn_dim=int(cfg["intermediate_size"]),
            expert_ffn_dim=int(cfg["moe_intermediate_size"]),
            n_experts=int(cfg["num_experts"]),
            n_experts_used=int(cfg["num_experts_per_tok"]),
            n_shared_experts=int(cfg.get("num_shared_experts") or 0),
            n_groups=int(cfg.get("n_group") or 1),
            n_groups_used=int(cfg.get("topk_group") or 1),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rotary_dim=rotary_dim,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            context_length=int(cfg.get("max_position_embeddings", 4096)),
            n_dense_layers=int(cfg.get("first_k_dense_replace", 0)),
        )

    # -- GGUF metadata ----------------------------------------------------------------
    def gguf_metadata(self) -> dict[str, object]:
        """The arch keys (llama.cpp bailingmoe2 names under `llada2.`) with their values."""
        values = asdict(self)
        return {f"{ARCH}.{key}": cast(values[attr]) for key, attr, cast in _GGUF_KEYS}

    @classmethod
    def from_gguf(cls, metadata: dict) -> "LLaDA2Config":
        """From GGUF metadata; raises KeyError naming the missing key."""
        values = {}
        for key, attr, cast in _GGUF_KEYS:
            full = f"{ARCH}.{key}"
            if full not in metadata:
                raise KeyError(full)
            values[attr] = cast(metadata[full])
        return cls(**values)


# (key under `llada2.`, field, type) in the order they are written.
_GGUF_KEYS: tuple[tuple[str, str, type], ...] = (
    ("context_length", "context_length", int),
    ("embedding_length", "hidden_size", int),
    ("block_count", "n_layers", int),
    ("feed_forward_length", "ffn_dim", int),
    ("attention.head_count", "n_heads", int),
    ("attention.head_count_kv", "n_kv_heads", int),
    ("attention.key_length", "head_dim", int),
    ("attention.layer_norm_rms_epsilon", "rms_eps", float),
    ("rope.dimension_count", "rotary_dim", int),
    ("rope.freq_base", "rope_theta", float),
    ("vocab_size", "vocab_size", int),
    ("leading_dense_block_count", "n_dense_layers", int),
    ("expert_count", "n_experts", int),
    ("expert_used_count", "n_experts_used", int),
    ("expert_shared_count", "n_shared_experts", int),
    ("expert_feed_forward_length", "expert_ffn_dim", int),
    ("expert_weights_scale", "routed_scaling_factor", float),
    ("expert_group_count", "n_groups", int),
    ("expert_group_used_count", "n_groups_used", int),
)

# Keys llama.cpp expects that carry no information of ours (constant for the family).
CONSTANT_ARCH_METADATA = {
    f"{ARCH}.attention.causal": False,
    f"{ARCH}.expert_weights_norm": True,
    f"{ARCH}.expert_gating_func": 2,  # sigmoid
    f"{ARCH}.rope.scaling.type": "none",
    "diffusion.shift_logits": False,
}


# GGUF tensor names by role (llama.cpp's bailingmoe2 names): the model-wide tensors, and
# those of layer i under ``blk.{i}.``. Which layer has which is `tensor_specs`'s business.
MODEL_TENSORS = {
    "token_embd": "token_embd.weight",
    "output_norm": "output_norm.weight",
    "output": "output.weight",
}
LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight",
    "attn_qkv": "attn_qkv.weight",
    "attn_q_norm": "attn_q_norm.weight",
    "attn_k_norm": "attn_k_norm.weight",
    "attn_output": "attn_output.weight",
    "ffn_norm": "ffn_norm.weight",
    # dense layers
    "ffn_gate": "ffn_gate.weight",
    "ffn_up": "ffn_up.weight",
    "ffn_down": "ffn_down.weight",
    # MoE layers: router, its expert bias, routed expert stacks, shared experts
    "router": "ffn_gate_inp.weight",
    "expert_bias": "exp_probs_b.bias",
    **{f"expert_{p}": f"ffn_{p}_exps.weight" for p in EXPERT_PROJECTIONS},
    **{f"shared_{p}": f"ffn_{p}_shexp.weight" for p in EXPERT_PROJECTIONS},
}

# Tensors a forward reads only in part: the embedding table (the rows of the step's tokens)
# and the routed expert stacks (the chosen experts). The engine leaves them in the mapped
# file, and puts everything else on the device.
PARTLY_READ_ROLES = frozenset({"token_embd", *(f"expert_{p}" for p in EXPERT_PROJECTIONS)})


def tensor_name(role: str, layer: int | None = None) -> str:
    """The GGUF name of a model-wide tensor (`layer` None) or of one of layer `layer`."""
    return MODEL_TENSORS[role] if layer is None else f"blk.{layer}.{LAYER_TENSORS[role]}"


def expert_tensor_name(layer: int, projection: str) -> str:
    return tensor_name(f"expert_{projection}", layer)


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor of the model: its name, ggml shape and where it comes from."""

    name: str
    ne: tuple[int, ...]
    hf_names: tuple[str, ...]  # one source, or one per expert (stacked expert-major)
    layer: int | None = None
    always_f32: bool = False  # norms, router, expert bias
    role: str = ""  # key of MODEL_TENSORS (layer None) or LAYER_TENSORS

    @property
    def is_expert_stack(self) -> bool:
        return len(self.ne) == 3

    @property
    def read_in_part(self) -> bool:
        return self.role in PARTLY_READ_ROLES

    @property
    def n_per_row(self) -> int:
        return self.ne[0]

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])


def tensor_specs(cfg: LLaDA2Config) -> list[TensorSpec]:
    """Every tensor of the GGUF, in file order, with its Hugging Face source(s)."""
    H, V = cfg.hidden_size, cfg.vocab_size

    def model_wide(role, ne, source, f32=False):
        return TensorSpec(tensor_name(role), ne, (source,), always_f32=f32, role=role)

    specs = [model_wide("token_embd", (H, V), "model.word_embeddings.weight")]
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."

        def add(role, ne, source, f32=False):
            sources = source if isinstance(source, tuple) else (hf + source,)
            specs.append(TensorSpec(tensor_name(role, i), ne, sources, layer=i, always_f32=f32, role=role))

        add("attn_norm", (H,), "input_layernorm.weight", True)
        add("attn_qkv", (H, cfg.qkv_dim), "attention.query_key_value.weight")
        add("attn_q_norm", (cfg.head_dim,), "attention.query_layernorm.weight", True)
        add("attn_k_norm", (cfg.head_dim,), "attention.key_layernorm.weight", True)
        add("attn_output", (cfg.n_heads * cfg.head_dim, H), "attention.dense.weight")
        add("ffn_norm", (H,), "post_attention_layernorm.weight", True)
        if not cfg.is_moe_layer(i):
            F = cfg.ffn_dim
            add("ffn_gate", (H, F), "mlp.gate_proj.weight")
            add("ffn_up", (H, F), "mlp.up_proj.weight")
            add("ffn_down", (F, H), "mlp.down_proj.weight")
            continue
        E, M = cfg.n_experts, cfg.expert_ffn_dim
        add("router", (H, E), "mlp.gate.weight", True)
        add("expert_bias", (E,), "mlp.gate.expert_bias", True)
        for proj in EXPERT_PROJECTIONS:
            ne = (M, H, E) if proj == "down" else (H, M, E)
            add(f"expert_{proj}", ne, tuple(f"{hf}mlp.experts.{e}.{proj}_proj.weight" for e in range(E)))
        if cfg.n_shared_experts:
            S = cfg.expert_ffn_dim * cfg.n_shared_experts
            add("shared_gate", (H, S), "mlp.shared_experts.gate_proj.weight")
            add("shared_up", (H, S), "mlp.shared_experts.up_proj.weight")
            add("shared_down", (S, H), "mlp.shared_experts.down_proj.weight")
    specs.append(model_wide("output_norm", (H,), "model.norm.weight", True))
    specs.append(model_wide("output", (H, V), "lm_head.weight"))
    return specs


def hf_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The torch shape of each Hugging Face source tensor of `spec`."""
    ne = spec.ne[:2] if spec.is_expert_stack else spec.ne
    return tuple(reversed(ne))
