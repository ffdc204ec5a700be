"""The LLaDA2.0 model family as data: hyperparameters, GGUF keys, tensor names and shapes.

The converter writes these names, `tide info` validates them and the engine reads them,
so they live in one place. GGUF names follow llama.cpp's ``bailingmoe2`` conventions
under the architecture ``llada2``; shapes are given in ggml ``ne`` order (innermost
first), the reverse of the Hugging Face / torch order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from fractions import Fraction

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as _T

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

# The ggml types a tensor may have, checked before ggml sees the file (ggml itself does not
# check: a matrix it cannot dot segfaults in compute, a norm that is not F32 aborts).
# Matrices go through mul_mat / mul_mat_id (the embedding table through ggml's to_float on
# the host): the float types and the block types ggml's CPU backend has a vec_dot for and
# dequantizes. This is an explicit list (our ggml layer does not expose the CPU backend's
# type traits; tests/test_hostile_files.py checks it against them): I8..I64, F64, Q8_1 and
# Q8_K have no vec_dot; TQ1_0/TQ2_0, MXFP4, NVFP4 and Q1_0 are left out as formats that
# `tide convert` never writes and not every device backend multiplies.
MATRIX_TYPES = frozenset(int(t) for t in (
    _T.F32, _T.F16, _T.BF16,
    _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1, _T.Q8_0,
    _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
    _T.IQ2_XXS, _T.IQ2_XS, _T.IQ2_S, _T.IQ3_XXS, _T.IQ3_S, _T.IQ1_S, _T.IQ1_M, _T.IQ4_NL, _T.IQ4_XS,
))
# Norm weights (a binary mul with F32 activations), the router and the expert bias (read on the host).
F32_TYPES = frozenset({int(_T.F32)})
# The fewest bytes a matrix value can take in a file (IQ1_S: 50 bytes per 256 values).
MIN_MATRIX_BYTES_PER_VALUE = min(Fraction(GGML_QUANT_SIZES[_T(t)][1], GGML_QUANT_SIZES[_T(t)][0])
                                 for t in MATRIX_TYPES)


def type_names(types) -> str:
    """'F32, F16, ...' for messages."""
    return ", ".join(_T(t).name for t in sorted(types))


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

    def check(self, names: dict[str, str] | None = None) -> list[str]:
        """Inconsistencies that make the model unrunnable (empty when fine). `names` maps a
        field to what the source calls it (a config.json field, a GGUF key) for the messages."""
        def name(field: str) -> str:
            return (names or {}).get(field, field)

        problems = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _FLOAT_FIELDS:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problems.append(f"{name(f.name)} must be a finite number (got {value!r})")
                continue
            low = 0 if f.name in _MAY_BE_ZERO else 1
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name(f.name)} must be an integer (got {value!r})")
            elif not low <= value <= MAX_DIMENSION:
                what = "at least 0" if low == 0 else "positive"
                problems.append(f"{name(f.name)} must be {what} and at most {MAX_DIMENSION:,} (got {value:,})")
        if problems:
            return problems
        for field, low, high, rule in _FLOAT_RANGES:
            value = getattr(self, field)
            if not (low < value and (high is None or value < high)):
                problems.append(f"{name(field)} must be {rule} (got {value!r})")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"{name('n_heads')} {self.n_heads} is not a multiple of "
                            f"{name('n_kv_heads')} {self.n_kv_heads}")
        if self.n_experts % self.n_groups:
            problems.append(f"{name('n_experts')} {self.n_experts} is not a multiple of {name('n_groups')} {self.n_groups}")
        if not self.n_groups_used <= self.n_groups:
            problems.append(f"{name('n_groups_used')} {self.n_groups_used} exceeds {name('n_groups')} {self.n_groups}")
        if self.n_experts_used > self.n_groups_used * (self.n_experts // self.n_groups):
            problems.append(f"{name('n_experts_used')} {self.n_experts_used} exceeds the experts of the kept groups")
        if self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            problems.append(f"{name('rotary_dim')} {self.rotary_dim} must be even and at most "
                            f"{name('head_dim')} {self.head_dim}")
        if self.n_dense_layers > self.n_layers:
            problems.append(f"{name('n_dense_layers')} {self.n_dense_layers} exceeds {name('n_layers')} {self.n_layers}")
        return problems

    # -- what the tensors of this model add up to (no tensor list needed) -------------------
    @property
    def n_tensors(self) -> int:
        """How many tensors the GGUF has: len(tensor_specs(self)), without building them."""
        moe = self.n_layers - self.n_dense_layers
        per_moe = 6 + 2 + len(EXPERT_PROJECTIONS) + (3 if self.n_shared_experts else 0)
        return len(MODEL_TENSORS) + self.n_dense_layers * (6 + 3) + moe * per_moe

    def n_values(self) -> tuple[int, int]:
        """(values of the F32-only tensors, values of the matrices) of the whole model, without
        building its tensor list: what a file of it must hold at the least."""
        H, V, hd = self.hidden_size, self.vocab_size, self.head_dim
        E, M, S = self.n_experts, self.expert_ffn_dim, self.expert_ffn_dim * self.n_shared_experts
        moe = self.n_layers - self.n_dense_layers
        attention = H * self.qkv_dim + self.n_heads * hd * H
        vectors = H + self.n_layers * (2 * H + 2 * hd) + moe * (H * E + E)
        matrices = 2 * H * V + self.n_layers * attention + self.n_dense_layers * 3 * H * self.ffn_dim
        matrices += moe * (3 * H * M * E + 3 * H * S)
        return vectors, matrices

    def min_gguf_bytes(self) -> int:
        """The fewest bytes of tensor data a GGUF of this model can have: F32 vectors, and
        matrices in the smallest type a matrix may have."""
        vectors, matrices = self.n_values()
        return 4 * vectors + math.floor(matrices * MIN_MATRIX_BYTES_PER_VALUE)

    # -- Hugging Face config.json ---------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict) -> "LLaDA2Config":
        """From a LLaDA2.0 config.json; raises KeyError naming a missing field, ValueError
        naming a field of the wrong type (a string, a bool, 12.5 for a count). Ranges are
        `check(HF_NAMES)`'s business."""
        def get(key, kind, default=_REQUIRED, *, falsy_default=False):
            if default is _REQUIRED:
                value = cfg[key]
            else:
                value = cfg.get(key, default)
                if falsy_default and not value and not isinstance(value, bool):
                    value = default  # null / 0: the field's default (as transformers reads it)
            return _typed(key, value, kind)

        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        head_dim = get("head_dim", int, 0, falsy_default=True) or (hidden // heads if heads > 0 else 0)
        if cfg.get("rotary_dim"):
            rotary_dim = get("rotary_dim", int)
        else:
            factor = get("partial_rotary_factor", float, 1.0)
            if not (math.isfinite(factor) and 0.0 < factor <= 1.0):
                raise ValueError(f"partial_rotary_factor must be in (0, 1] (got {factor!r})")
            rotary_dim = int(head_dim * factor)
        return cls(
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            n_layers=get("num_hidden_layers", int),
            n_heads=heads,
            n_kv_heads=get("num_key_value_heads", int, heads, falsy_default=True),
            head_dim=head_dim,
            ffn_dim=get("intermediate_size", int),
            expert_ffn_dim=get("moe_intermediate_size", int),
            n_experts=get("num_experts", int),
            n_experts_used=get("num_experts_per_tok", int),
            n_shared_experts=get("num_shared_experts", int, 0, falsy_default=True),
            n_groups=get("n_group", int, 1, falsy_default=True),
            n_groups_used=get("topk_group", int, 1, falsy_default=True),
            routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
            rope_theta=get("rope_theta", float, 10000.0),
            rotary_dim=rotary_dim,
            rms_eps=get("rms_norm_eps", float, 1e-6),
            context_length=get("max_position_embeddings", int, 4096),
            n_dense_layers=get("first_k_dense_replace", int, 0),
        )

    # -- GGUF metadata ----------------------------------------------------------------
    def gguf_metadata(self) -> dict[str, object]:
        """The arch keys (llama.cpp bailingmoe2 names under `llada2.`) with their values, the
        derived ones llama.cpp's loader also reads included."""
        values = asdict(self)
        meta = {f"{ARCH}.{key}": cast(values[attr]) for key, attr, cast in _GGUF_KEYS}
        meta.update(self.derived_gguf_metadata())
        return meta

    def derived_gguf_metadata(self) -> dict[str, int]:
        """Keys llama.cpp's loader reads whose values follow from the fields: the value head
        size (ours is the key head size) and the shared experts' FFN width. Our converter
        writes them; a file that has them must agree (ModelFile checks, when the model has
        shared experts for the second)."""
        return {VALUE_LENGTH_KEY: self.head_dim, SHARED_FFN_KEY: self.expert_ffn_dim * self.n_shared_experts}

    @classmethod
    def from_gguf(cls, metadata: dict) -> "LLaDA2Config":
        """From GGUF metadata; raises KeyError naming the missing key, ValueError naming a key
        of the wrong type (integer keys take GGUF integers only, float keys any number).
        Ranges are `check(GGUF_NAMES)`'s business."""
        values = {}
        for key, attr, cast in _GGUF_KEYS:
            full = f"{ARCH}.{key}"
            if full not in metadata:
                raise KeyError(full)
            values[attr] = _typed(full, metadata[full], cast, integral_floats=False)
        return cls(**values)


_REQUIRED = object()
# Fields that are numbers (the rest are counts), those that may be 0, and the ranges of the numbers.
_FLOAT_FIELDS = frozenset({"routed_scaling_factor", "rope_theta", "rms_eps"})
_MAY_BE_ZERO = frozenset({"n_dense_layers", "n_shared_experts"})
_F32_MAX = 3.4028234663852886e38  # the GGUF stores these as float32
_FLOAT_RANGES = (  # (field, exclusive low, exclusive high or None, the rule in words)
    ("rms_eps", 0.0, 1.0, "in (0, 1)"),
    ("rope_theta", 1.0, _F32_MAX, "greater than 1 and a float32 (below 3.4e38)"),
    ("routed_scaling_factor", 0.0, _F32_MAX, "positive and a float32 (below 3.4e38)"),
)
# No dimension or count of a model may exceed this: ggml indexes rows and positions with int32.
MAX_DIMENSION = 2**31 - 1


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if value is None:
        return "null"
    try:
        return f"an array of {len(value)} items"
    except TypeError:
        return f"a {type(value).__name__}"


def _typed(key: str, value, kind: type, *, integral_floats: bool = True):
    """`value` as `kind` (int or float), or ValueError naming `key`. A count must be an
    integer (a JSON 4096.0 too, unless `integral_floats` is False); a float field any
    number. Never a bool, a string or an array."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        expected = "an integer" if kind is int else "a number"
        raise ValueError(f"{key} is {_describe(value)}, expected {expected}")
    if kind is int:
        if isinstance(value, float) and not (integral_floats and value.is_integer()):
            raise ValueError(f"{key} is {_describe(value)}, expected an integer")
        return int(value)
    return float(value)


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

# How each source names each field: for messages that say what to fix.
GGUF_NAMES = {attr: f"{ARCH}.{key}" for key, attr, _ in _GGUF_KEYS}
HF_NAMES = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "ffn_dim": "intermediate_size", "expert_ffn_dim": "moe_intermediate_size", "n_experts": "num_experts",
    "n_experts_used": "num_experts_per_tok", "n_shared_experts": "num_shared_experts", "n_groups": "n_group",
    "n_groups_used": "topk_group", "routed_scaling_factor": "routed_scaling_factor", "rope_theta": "rope_theta",
    "rotary_dim": "rotary_dim", "rms_eps": "rms_norm_eps", "context_length": "max_position_embeddings",
    "n_dense_layers": "first_k_dense_replace",
}

# Keys llama.cpp's loader reads whose values follow from LLaDA2Config's fields (derived_gguf_metadata).
VALUE_LENGTH_KEY = f"{ARCH}.attention.value_length"
SHARED_FFN_KEY = f"{ARCH}.expert_shared_feed_forward_length"

# Keys llama.cpp expects that carry no information of ours (constant for the family).
# llama.cpp's own LLaDA2 converter does not write `attention.causal`: it is not required on read.
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
    hf_names: Sequence[str]  # one source, or one per expert (stacked expert-major; PerExpertNames)
    layer: int | None = None
    always_f32: bool = False  # norms, router, expert bias
    role: str = ""  # key of MODEL_TENSORS (layer None) or LAYER_TENSORS

    @property
    def is_expert_stack(self) -> bool:
        return len(self.ne) == 3

    @property
    def allowed_types(self) -> frozenset[int]:
        """The ggml types this tensor may have in a file (F32 for norms, router, expert bias)."""
        return F32_TYPES if self.always_f32 else MATRIX_TYPES

    @property
    def read_in_part(self) -> bool:
        return self.role in PARTLY_READ_ROLES

    @property
    def n_per_row(self) -> int:
        return self.ne[0]

    @property
    def n_rows(self) -> int:
        return math.prod(self.ne[1:])


class PerExpertNames(Sequence):
    """The Hugging Face names of one projection of every expert of a layer, made on demand:
    a file claiming millions of experts costs nothing here before its size is checked."""

    __slots__ = ("prefix", "suffix", "n")

    def __init__(self, prefix: str, suffix: str, n: int):
        self.prefix, self.suffix, self.n = prefix, suffix, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(self.n)))
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(i)
        return f"{self.prefix}{i}{self.suffix}"

    def __eq__(self, other) -> bool:
        if isinstance(other, PerExpertNames):
            return (self.prefix, self.suffix, self.n) == (other.prefix, other.suffix, other.n)
        return isinstance(other, (tuple, list)) and len(other) == self.n and all(a == b for a, b in zip(self, other))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PerExpertNames({self.prefix!r}, {self.suffix!r}, {self.n})"


def tensor_specs(cfg: LLaDA2Config) -> list[TensorSpec]:
    """Every tensor of the GGUF, in file order, with its Hugging Face source(s)."""
    H, V = cfg.hidden_size, cfg.vocab_size

    def model_wide(role, ne, source, f32=False):
        return TensorSpec(tensor_name(role), ne, (source,), always_f32=f32, role=role)

    specs = [model_wide("token_embd", (H, V), "model.word_embeddings.weight")]
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}."

        def add(role, ne, source, f32=False):
            sources = source if isinstance(source, PerExpertNames) else (hf + source,)
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
            add(f"expert_{proj}", ne, PerExpertNames(f"{hf}mlp.experts.", f".{proj}_proj.weight", E))
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
