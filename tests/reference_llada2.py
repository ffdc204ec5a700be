"""Independent torch reference for LLaDA2.0 (llada2_moe): the forward pass and the block-diffusion decoder.

This is the yardstick the engine is tested against, so it shares no code with `tide_local`. It is written
straight from the spec (shared/research/llada2_spec.md §3 forward, §3.1 mask, §3.2 router, §4.2 decoder,
§8 A1) and reads a Hugging Face checkpoint directory directly (`config.json` + `*.safetensors`). It holds
every weight in memory and recomputes everything at every step: meant for tiny test models only.

Numerics: with `dtype=torch.float32` (default) every op runs in fp32 (bf16 weights upcast exactly). With
`dtype=torch.bfloat16` it mirrors the HF reference's casts (§3.3): bf16 activations and matmuls, RMSNorm
statistics, router, attention softmax and MoE weighting in fp32, cos/sin cast to bf16, logits cast to fp32.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from safetensors import safe_open

BLOCK_LENGTH = 32
MASK_ID = 156895
EOS_ID = 156892


# ----------------------------------------------------------------------------------------------------------
# §1 config.json
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LLaDA2Config:
    """The config.json fields the forward pass uses. Missing keys take the HF config-class defaults."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    first_k_dense_replace: int
    partial_rotary_factor: float
    rope_theta: float
    rms_norm_eps: float
    use_qk_norm: bool

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_dict(cls, c: dict) -> "LLaDA2Config":
        if c.get("rope_scaling") is not None:
            raise NotImplementedError(f"rope_scaling {c['rope_scaling']!r} is not part of the reference")
        if c.get("expert_capacity", 0):
            raise NotImplementedError("block routing (expert_capacity > 0, LLaDA2.2) is a different model")
        if c.get("score_function", "sigmoid") != "sigmoid":
            raise NotImplementedError(f"score_function {c['score_function']!r}")
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"],
            num_key_value_heads=c["num_key_value_heads"],
            head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            moe_intermediate_size=c["moe_intermediate_size"],
            num_experts=c["num_experts"],
            num_experts_per_tok=c["num_experts_per_tok"],
            num_shared_experts=c.get("num_shared_experts") or 0,
            n_group=c.get("n_group", 8),
            topk_group=c.get("topk_group", 4),
            routed_scaling_factor=float(c.get("routed_scaling_factor", 2.5)),
            first_k_dense_replace=c.get("first_k_dense_replace", 0),
            partial_rotary_factor=float(c.get("partial_rotary_factor", 0.5)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            use_qk_norm=bool(c.get("use_qk_norm", True)),
        )


def load_hf_config(hf_dir: str | Path) -> LLaDA2Config:
    with open(Path(hf_dir) / "config.json", encoding="utf-8") as f:
        return LLaDA2Config.from_dict(json.load(f))


def load_hf_tensors(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every `*.safetensors` file in the directory (sharded or not), in its stored dtype."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {hf_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in tensors:
                    raise ValueError(f"tensor {name} appears in more than one shard")
                tensors[name] = f.get_tensor(name)
    return tensors


# ----------------------------------------------------------------------------------------------------------
# §3 forward-pass building blocks
# ----------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Statistics in fp32, normalised value cast back to x's dtype, then multiplied by the weight."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/rotary_dim), i = 0 .. rotary_dim/2 - 1 (denominator is the rotary dim)."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of shape [T, rotary_dim] (each half repeated), computed in fp32 then cast to `dtype`."""
    angles = positions.float()[:, None] * rope_inv_freq(rotary_dim, theta)[None, :]  # [T, r/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX (rotate-half) RoPE on the first cos.shape[-1] dims of x [..., T, head_dim]; the rest pass through.

    For i < r/2: y[i] = x[i]·cos − x[i+r/2]·sin and y[i+r/2] = x[i+r/2]·cos + x[i]·sin.
    """
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    first, second = rot[..., : r // 2], rot[..., r // 2 :]
    rotated_half = torch.cat([-second, first], dim=-1)
    return torch.cat([rot * cos + rotated_half * sin, rest], dim=-1)


def block_causal_mask(positions: torch.Tensor, block_length: int = BLOCK_LENGTH) -> torch.Tensor:
    """Boolean [T, T]: query i may see key j iff block(j) <= block(i), blocks aligned to absolute position 0."""
    block = positions // block_length
    return block[None, :] <= block[:, None]


def attention(q, k, v, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """GQA attention. q [nh, T, hd], k/v [nkv, T, hd]; query head j uses KV head j // (nh/nkv).

    Scores are formed in q's dtype, the additive 0/−inf mask applied, softmax in fp32, probabilities cast
    back to q's dtype before multiplying V. Returns [T, nh·hd] with heads concatenated in head order.
    """
    nh, nkv = q.shape[0], k.shape[0]
    k = k.repeat_interleave(nh // nkv, dim=0)
    v = v.repeat_interleave(nh // nkv, dim=0)
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [nh, T, hd]
    return out.transpose(0, 1).reshape(q.shape[1], nh * q.shape[2])


def swiglu(x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """down( silu(gate(x)) ⊙ up(x) ), no biases."""
    return F.linear(F.silu(F.linear(x, gate_w)) * F.linear(x, up_w), down_w)


def route(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    expert_bias: torch.Tensor,
    *,
    n_group: int,
    topk_group: int,
    top_k: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """§3.2 router for tokens x [T, H]; all in fp32. Returns (expert ids [T, top_k], weights [T, top_k]).

    Experts are returned in descending order of their selection score c = sigmoid(x·Wg^T) + expert_bias.
    """
    scores = torch.sigmoid(F.linear(x.float(), gate_w.float()))  # s, [T, E]
    choice = scores + expert_bias.float()  # c: used only to choose experts
    num_tokens, num_experts = choice.shape

    grouped = choice.view(num_tokens, n_group, num_experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, n_group]
    kept_groups = group_scores.topk(topk_group, dim=-1).indices
    group_keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    expert_keep = group_keep.repeat_interleave(num_experts // n_group, dim=1)
    masked_choice = choice.masked_fill(~expert_keep, float("-inf"))

    expert_ids = masked_choice.topk(top_k, dim=-1).indices
    chosen = scores.gather(1, expert_ids)  # bias-free
    weights = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20) * routed_scaling_factor
    return expert_ids, weights


@dataclass
class LayerRouting:
    """Routing of one MoE layer: expert ids and weights per token, [T, top_k], in descending score order."""

    experts: torch.Tensor
    weights: torch.Tensor


# ----------------------------------------------------------------------------------------------------------
# §3 the model
# ----------------------------------------------------------------------------------------------------------


class ReferenceLLaDA2:
    """Whole-model reference forward over a HF checkpoint directory. Call `forward` (or the object)."""

    def __init__(self, hf_dir: str | Path, dtype: torch.dtype = torch.float32):
        self.config = load_hf_config(hf_dir)
        self.dtype = dtype
        raw = load_hf_tensors(hf_dir)
        biases = [n for n in raw if n.endswith(".bias")]
        if biases:
            raise NotImplementedError(f"LLaDA2 has no biases, checkpoint has {biases[:3]}")
        # The router (gate weight + expert bias) stays fp32; everything else in the compute dtype.
        self.weights = {
            name: t.float() if name.endswith(("mlp.gate.weight", "mlp.gate.expert_bias")) else t.to(dtype)
            for name, t in raw.items()
        }

    def w(self, name: str) -> torch.Tensor:
        return self.weights[name]

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.config.first_k_dense_replace

    @torch.no_grad()
    def forward(
        self,
        ids: Sequence[int] | torch.Tensor,
        positions: Sequence[int] | torch.Tensor | None = None,
        *,
        block_length: int = BLOCK_LENGTH,
        return_routing: bool = False,
    ):
        """Logits [T, vocab] (fp32) for the tokens `ids` at absolute `positions` (default 0..T−1).

        Every token attends with the block-causal mask of §3.1 computed from the absolute positions. Logit t
        predicts the token at position t (no shift). With `return_routing=True` returns (logits, routing),
        routing[l] a LayerRouting for MoE layers and None for dense layers.
        """
        cfg = self.config
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        if positions is None:
            positions = torch.arange(ids.numel())
        positions = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        if positions.numel() != ids.numel():
            raise ValueError("ids and positions differ in length")

        allowed = block_causal_mask(positions, block_length)
        cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, self.dtype)

        h = self.w("model.word_embeddings.weight")[ids]  # 1. embedding, no scaling
        routing: list[LayerRouting | None] = []
        for layer in range(cfg.num_hidden_layers):
            p = f"model.layers.{layer}."
            x = rms_norm(h, self.w(p + "input_layernorm.weight"), cfg.rms_norm_eps)
            h = h + self.self_attention(layer, x, cos, sin, allowed)
            x = rms_norm(h, self.w(p + "post_attention_layernorm.weight"), cfg.rms_norm_eps)
            if self.is_moe_layer(layer):
                ffn_out, layer_routing = self.moe_ffn(layer, x)
            else:
                ffn_out, layer_routing = self.dense_ffn(layer, x), None
            h = h + ffn_out
            routing.append(layer_routing)

        h = rms_norm(h, self.w("model.norm.weight"), cfg.rms_norm_eps)
        logits = F.linear(h, self.w("lm_head.weight")).float()
        return (logits, routing) if return_routing else logits

    __call__ = forward

    def self_attention(self, layer, x, cos, sin, allowed) -> torch.Tensor:
        """Fused QKV → per-head QK-norm → partial RoPE → block-causal GQA attention → output projection."""
        cfg = self.config
        p = f"model.layers.{layer}.attention."
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        num_tokens = x.shape[0]

        qkv = F.linear(x, self.w(p + "query_key_value.weight"))
        qkv = qkv.view(num_tokens, nh + 2 * nkv, hd).transpose(0, 1)  # [heads, T, hd]; rows: Q, then K, then V
        q, k, v = qkv[:nh], qkv[nh : nh + nkv], qkv[nh + nkv :]

        if cfg.use_qk_norm:  # before RoPE; V is not normalised
            q = rms_norm(q, self.w(p + "query_layernorm.weight"), cfg.rms_norm_eps)
            k = rms_norm(k, self.w(p + "key_layernorm.weight"), cfg.rms_norm_eps)
        q = apply_partial_rope(q, cos, sin)
        k = apply_partial_rope(k, cos, sin)

        out = attention(q, k, v, allowed, scale=1.0 / math.sqrt(hd))
        return F.linear(out, self.w(p + "dense.weight"))

    def dense_ffn(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp."
        return swiglu(x, self.w(p + "gate_proj.weight"), self.w(p + "up_proj.weight"), self.w(p + "down_proj.weight"))

    def expert(self, layer: int, e: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp.experts.{e}."
        return swiglu(x, self.w(p + "gate_proj.weight"), self.w(p + "up_proj.weight"), self.w(p + "down_proj.weight"))

    def shared_expert(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        p = f"model.layers.{layer}.mlp.shared_experts."
        return swiglu(x, self.w(p + "gate_proj.weight"), self.w(p + "up_proj.weight"), self.w(p + "down_proj.weight"))

    def route(self, layer: int, x: torch.Tensor) -> LayerRouting:
        cfg = self.config
        p = f"model.layers.{layer}.mlp.gate."
        experts, weights = route(
            x,
            self.w(p + "weight"),
            self.w(p + "expert_bias"),
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            top_k=cfg.num_experts_per_tok,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        return LayerRouting(experts, weights)

    def moe_ffn(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        """Σ_k w_k·Expert_{e_k}(x) (expert outputs weighted and summed in fp32) + shared expert on the same x."""
        routing = self.route(layer, x)
        num_tokens, top_k = routing.experts.shape
        expert_out = torch.zeros(num_tokens, top_k, x.shape[-1], dtype=torch.float32)  # [T, k, H]
        for e in routing.experts.unique().tolist():
            token_idx, slot = (routing.experts == e).nonzero(as_tuple=True)
            expert_out[token_idx, slot] = self.expert(layer, e, x[token_idx]).float()
        y = (expert_out * routing.weights[:, :, None]).sum(dim=1).to(x.dtype)
        if self.config.num_shared_experts:
            y = y + self.shared_expert(layer, x)
        return y, routing


# ----------------------------------------------------------------------------------------------------------
# §4.2 block-diffusion decoding, no KV cache
# ----------------------------------------------------------------------------------------------------------


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Per-step commit quota: block_length split over steps, the first (block_length mod steps) get one more."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if i < extra else 0) for i in range(steps)]


def pick_tokens(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and its probability per row of logits [N, V].

    temperature 0: argmax over the full row (ids past the tokenizer size included) and its fp32 softmax
    probability (spec §8 A1: the 2.1 / SGLang / dInfer greedy rule). temperature > 0: the HF sampler —
    scale by 1/T (unless T == 1), top-k, top-p, softmax, one multinomial draw and its probability.
    """
    logits = logits.float()
    if temperature == 0:
        probs = torch.softmax(logits, dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative > top_p
        drop_sorted[:, 1:] = drop_sorted[:, :-1].clone()  # keep the token that crosses top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def positions_to_commit(confidence: torch.Tensor, masked: torch.Tensor, threshold: float, quota: int) -> torch.Tensor:
    """Boolean over the block: which masked positions to commit this step.

    All masked positions with confidence strictly > threshold if there are at least `quota` of them, else the
    top-min(quota, #masked) by confidence (ties: lower position first).
    """
    confidence = torch.where(masked, confidence, torch.tensor(float("-inf")))
    above = confidence > threshold
    if int(above.sum()) >= quota:
        return above
    k = min(quota, int(masked.sum()))
    order = torch.sort(confidence, descending=True, stable=True).indices[:k]
    return torch.zeros_like(masked).index_fill_(0, order, True)


@dataclass
class StepRecord:
    """One denoising step: absolute positions committed, their tokens and confidences."""

    block: int
    step: int
    positions: list[int]
    tokens: list[int]
    confidences: list[float]


@dataclass
class GenerationStats:
    forwards: int = 0
    steps_per_block: dict[int, int] = field(default_factory=dict)  # block index -> forwards in that block
    trace: list[StepRecord] = field(default_factory=list)
    canvas: list[int] = field(default_factory=list)  # the final canvas (prompt + every decoded position)


@torch.no_grad()
def reference_generate(
    model: ReferenceLLaDA2,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    threshold: float = 0.95,
    steps: int = 32,
    block_length: int = BLOCK_LENGTH,
    mask_id: int = MASK_ID,
    eos_ids: int | Iterable[int] | None = (EOS_ID,),
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    minimal_topk: int = 1,
    generator: torch.Generator | None = None,
    return_stats: bool = False,
):
    """Block-diffusion generation exactly as spec §4.2, recomputing the whole window at every step.

    Returns the generated ids (positions P.. of the canvas), truncated right after the first eos (inclusive)
    and capped at max_new_tokens; with `return_stats=True` returns (ids, GenerationStats).
    Note §4.2 step 1: steps = min(steps, max_new_tokens // minimal_topk), so for max_new_tokens < block_length
    the per-step quota exceeds 1.
    """
    prompt = [int(t) for t in prompt_ids]
    eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or ())
    if mask_id >= model.config.vocab_size:
        raise ValueError(f"mask_id {mask_id} outside the vocabulary ({model.config.vocab_size})")
    stats = GenerationStats()
    if max_new_tokens <= 0:
        return ([], stats) if return_stats else []

    # 1. steps and per-step quota
    steps = min(steps, max_new_tokens // minimal_topk)
    quota = transfer_schedule(block_length, steps) if steps > 0 else []

    # 2. canvas of whole blocks covering prompt + max_new_tokens, masks after the prompt
    P = len(prompt)
    num_blocks = -(-(P + max_new_tokens) // block_length)
    canvas = torch.full((num_blocks * block_length,), mask_id, dtype=torch.long)
    canvas[:P] = torch.tensor(prompt, dtype=torch.long)

    # 3-4. denoise blocks P//B .. nb−1; the prompt tail in block P//B is never a candidate
    for block in range(P // block_length, num_blocks):
        start, end = block * block_length, (block + 1) * block_length
        stats.steps_per_block[block] = 0
        for step in range(steps):
            masked = canvas[start:end] == mask_id
            if not masked.any():
                break
            logits = model.forward(canvas[:end], torch.arange(end), block_length=block_length)[start:end]
            stats.forwards += 1
            stats.steps_per_block[block] += 1
            tokens, confidence = pick_tokens(logits, temperature, top_k, top_p, generator)
            commit = positions_to_commit(confidence, masked, threshold, quota[step])
            canvas[start:end][commit] = tokens[commit]
            idx = commit.nonzero().squeeze(-1)
            stats.trace.append(
                StepRecord(block, step, (idx + start).tolist(), tokens[idx].tolist(), confidence[idx].tolist())
            )
        # stop after a block once the generated region holds an eos
        if eos and any(t in eos for t in canvas[P:end].tolist()):
            break

    # 5. generated region, cut right after the first eos
    generated = canvas[P : P + max_new_tokens].tolist()
    for i, t in enumerate(generated):
        if t in eos:
            generated = generated[: i + 1]
            break
    stats.canvas = canvas.tolist()
    return (generated, stats) if return_stats else generated
