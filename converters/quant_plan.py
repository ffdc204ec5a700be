"""Which ggml type each tensor gets for a requested output type.

Plain types apply to every matrix. The mixes follow llama.cpp's Q4_K_M / Q5_K_M: the
LM head at Q6_K, the fused QKV (which holds V) one step up, and `ffn_down` (dense,
shared and expert) at Q6_K on the layers llama.cpp gives more bits (the first and last
eighth and every third layer between). Norms, router weights and expert bias stay F32.
A tensor whose rows do not divide into its type's blocks falls back to the nearest type
that fits, as llama.cpp does; the fallbacks are recorded in the file.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType

from tide_local.architecture import TensorSpec

# name → (base type, file type recorded in general.file_type)
OUTPUT_TYPES: dict[str, tuple[T, LlamaFileType]] = {
    "f32": (T.F32, LlamaFileType.ALL_F32),
    "f16": (T.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_k": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "q5_k": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "q6_k": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
    "q4_k_m": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
}

# Where llama.cpp goes when rows do not divide into 256-value super-blocks.
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q8_0: T.F16, T.Q4_0: T.F16, T.Q5_0: T.F16, T.Q5_1: T.F16}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


_DOWN_ROLES = ("ffn_down", "expert_down", "shared_down")  # dense, routed and shared experts


def _mix_type(spec: TensorSpec, mix: str, base: T, n_layers: int) -> T:
    if mix not in ("q4_k_m", "q5_k_m"):
        return base
    if spec.role == "output":
        return T.Q6_K
    if spec.role == "attn_qkv":
        return T.Q5_K if mix == "q4_k_m" else T.Q6_K
    if spec.role in _DOWN_ROLES and _more_bits(spec.layer, n_layers):
        return T.Q6_K
    return base


def fits(ggml_type: T, n_per_row: int) -> bool:
    return n_per_row % GGML_QUANT_SIZES[ggml_type][0] == 0


@dataclass(frozen=True)
class TensorPlan:
    spec: TensorSpec
    ggml_type: T
    wanted: T  # the type before any fallback

    @property
    def fallback(self) -> bool:
        return self.ggml_type != self.wanted

    def fallback_note(self) -> str:
        return (
            f"{self.spec.name}: {self.wanted.name} -> {self.ggml_type.name} "
            f"(rows of {self.spec.n_per_row} do not divide into blocks of {GGML_QUANT_SIZES[self.wanted][0]})"
        )


def plan_types(specs: list[TensorSpec], output_type: str, n_layers: int) -> list[TensorPlan]:
    base, _ = OUTPUT_TYPES[output_type]
    plans = []
    for spec in specs:
        if spec.always_f32 or len(spec.ne) == 1:
            plans.append(TensorPlan(spec, T.F32, T.F32))
            continue
        wanted = _mix_type(spec, output_type, base, n_layers)
        chosen = wanted
        while not fits(chosen, spec.n_per_row):
            chosen = _FALLBACK[chosen]
        plans.append(TensorPlan(spec, chosen, wanted))
    return plans
