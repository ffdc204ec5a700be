"""Sanity tests of the independent LLaDA2 reference (tests/reference_llada2.py) on a tiny random checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from reference_llada2 import (
    LLaDA2Config,
    ReferenceLLaDA2,
    apply_partial_rope,
    attention,
    block_causal_mask,
    pick_tokens,
    positions_to_commit,
    reference_generate,
    rope_cos_sin,
    rope_inv_freq,
    route,
    swiglu,
    transfer_schedule,
)

# ----------------------------------------------------------------------------------------------------------
# A tiny HF-layout checkpoint (same keys and tensor names as LLaDA2.0-mini, small shapes)
# ----------------------------------------------------------------------------------------------------------

VOCAB = 160
MASK = 159
EOS = 150

TINY_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "num_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "score_function": "sigmoid",
    "norm_topk_prob": True,
    "moe_router_enable_expert_bias": True,
    "router_dtype": "fp32",
    "first_k_dense_replace": 1,
    "partial_rotary_factor": 0.5,
    "rotary_dim": 8,
    "rope_theta": 600000,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "use_bias": False,
    "use_qkv_bias": False,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "pad_token_id": EOS,
    "dtype": "bfloat16",
}


def _linear(gen, out_features, in_features, gain=1.0):
    return torch.randn(out_features, in_features, generator=gen) * (gain / math.sqrt(in_features))


def _norm_weight(gen, n):
    return 1.0 + 0.1 * torch.randn(n, generator=gen)


def write_tiny_checkpoint(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Random bf16 weights, layer 0 dense, unfused experts, two shards + index (like the real checkpoints)."""
    cfg = {**TINY_CONFIG, **overrides}
    gen = torch.Generator().manual_seed(seed)
    H, hd = cfg["hidden_size"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    m, E = cfg["moe_intermediate_size"], cfg["num_experts"]

    lm_head = _linear(gen, cfg["vocab_size"], H, gain=3.0)
    lm_head[MASK] = 0.0  # keeps the mask id out of the argmax, as a trained model would
    first = {
        "model.word_embeddings.weight": torch.randn(cfg["vocab_size"], H, generator=gen),
        "model.norm.weight": _norm_weight(gen, H),
        "lm_head.weight": lm_head,
    }
    rest = {}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t = first if layer == 0 else rest
        t[p + "input_layernorm.weight"] = _norm_weight(gen, H)
        t[p + "post_attention_layernorm.weight"] = _norm_weight(gen, H)
        t[p + "attention.query_key_value.weight"] = _linear(gen, (nh + 2 * nkv) * hd, H)
        t[p + "attention.query_layernorm.weight"] = _norm_weight(gen, hd)
        t[p + "attention.key_layernorm.weight"] = _norm_weight(gen, hd)
        t[p + "attention.dense.weight"] = _linear(gen, H, nh * hd)
        if layer < cfg["first_k_dense_replace"]:
            F_ = cfg["intermediate_size"]
            t[p + "mlp.gate_proj.weight"] = _linear(gen, F_, H)
            t[p + "mlp.up_proj.weight"] = _linear(gen, F_, H)
            t[p + "mlp.down_proj.weight"] = _linear(gen, H, F_)
            continue
        t[p + "mlp.gate.weight"] = _linear(gen, E, H, gain=2.0)
        t[p + "mlp.gate.expert_bias"] = 0.1 * torch.randn(E, generator=gen)
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = _linear(gen, m, H)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = _linear(gen, m, H)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = _linear(gen, H, m)
        t[p + "mlp.shared_experts.gate_proj.weight"] = _linear(gen, m, H)
        t[p + "mlp.shared_experts.up_proj.weight"] = _linear(gen, m, H)
        t[p + "mlp.shared_experts.down_proj.weight"] = _linear(gen, H, m)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = {"model-00001-of-00002.safetensors": first, "model-00002-of-00002.safetensors": rest}
    weight_map = {}
    for fname, tensors in shards.items():
        tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in tensors})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    return out_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llada2"))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return ReferenceLLaDA2(tiny_dir)


def random_ids(n, seed=1, high=VOCAB - 10):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# Loading and the forward pass
# ----------------------------------------------------------------------------------------------------------


def test_loads_sharded_checkpoint(model):
    cfg = model.config
    assert cfg.rotary_dim == 8 and cfg.head_dim == 16 and cfg.rms_norm_eps == 1e-6
    assert not model.is_moe_layer(0) and model.is_moe_layer(1) and model.is_moe_layer(2)
    assert model.w("lm_head.weight").dtype == torch.float32
    assert model.w("model.layers.1.mlp.gate.expert_bias").dtype == torch.float32
    logits = model.forward([1, 2, 3, 4, 5])
    assert logits.shape == (5, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_config_refuses_block_routing():
    with pytest.raises(NotImplementedError):
        LLaDA2Config.from_dict({**TINY_CONFIG, "expert_capacity": 48})


def test_block_causal_mask_values():
    allowed = block_causal_mask(torch.arange(10), block_length=4)
    for i in range(10):
        for j in range(10):
            assert bool(allowed[i, j]) == (j // 4 <= i // 4)
    # positions are absolute: a window starting at 2 splits at 4 and 8, not at 2+4
    shifted = block_causal_mask(torch.arange(2, 10), block_length=4)
    assert shifted[0, 1] and not shifted[1, 2] and shifted[2, 5]


def test_block_causal_property(model):
    ids = random_ids(96)
    base = model.forward(ids)
    changed_ids = ids.clone()
    changed_ids[70] = (ids[70] + 1) % (VOCAB - 10)  # a token in block 2
    changed = model.forward(changed_ids)
    torch.testing.assert_close(changed[:64], base[:64], atol=1e-5, rtol=0)
    assert (changed[64:96] - base[64:96]).abs().amax(dim=-1).min() > 1e-3  # every row of block 2 moves

    # bidirectional inside a block: a later token of block 1 changes an earlier position of block 1
    changed_ids = ids.clone()
    changed_ids[60] = (ids[60] + 1) % (VOCAB - 10)
    changed = model.forward(changed_ids)
    torch.testing.assert_close(changed[:32], base[:32], atol=1e-5, rtol=0)
    assert (changed[33] - base[33]).abs().max() > 1e-3


def test_prefix_window_matches_longer_window(model):
    """Logits of the first blocks do not depend on whether later blocks are in the window."""
    ids = random_ids(96, seed=3)
    torch.testing.assert_close(model.forward(ids[:64]), model.forward(ids)[:64], atol=1e-5, rtol=0)


def test_shift_by_whole_blocks_keeps_logits(model):
    """RoPE is relative and the mask depends on block indices only: shifting all positions by 2 blocks is a no-op."""
    ids = random_ids(40, seed=4)
    base = model.forward(ids)
    shifted = model.forward(ids, positions=torch.arange(40) + 64)
    torch.testing.assert_close(shifted, base, atol=2e-4, rtol=1e-4)


def test_rope_matches_complex_formulation():
    rotary_dim, theta, head_dim = 8, 600000.0, 16
    positions = torch.tensor([0, 1, 5, 31, 32, 77, 300])
    x = torch.randn(3, len(positions), head_dim, generator=torch.Generator().manual_seed(5))
    cos, sin = rope_cos_sin(positions, rotary_dim, theta, torch.float32)
    y = apply_partial_rope(x, cos, sin)

    half = rotary_dim // 2
    inv_freq = torch.tensor([theta ** (-2.0 * i / rotary_dim) for i in range(half)], dtype=torch.float64)
    torch.testing.assert_close(rope_inv_freq(rotary_dim, theta).double(), inv_freq, rtol=1e-6, atol=0)
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double())
    z = z * torch.polar(torch.ones((), dtype=torch.float64), positions[:, None].double() * inv_freq[None, :])
    expected = torch.cat([z.real, z.imag, x[..., rotary_dim:].double()], dim=-1)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(y[..., rotary_dim:], x[..., rotary_dim:])  # dims past rotary_dim pass through


def test_rope_scores_depend_on_relative_position_only():
    rotary_dim, theta = 8, 600000.0
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)

    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), rotary_dim, theta, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([pk]), rotary_dim, theta, torch.float32)
        return float((apply_partial_rope(q, cq, sq) * apply_partial_rope(k, ck, sk)).sum())

    for d in (0, 1, 7, 40):
        ref = score(d, 0)
        for p in (3, 50, 333):
            assert score(p + d, p) == pytest.approx(ref, abs=1e-4)
    assert abs(score(5, 0) - score(0, 0)) > 1e-3


def test_attention_gqa_head_mapping():
    g = torch.Generator().manual_seed(7)
    nh, nkv, T, hd = 6, 2, 10, 8
    q, k, v = (torch.randn(n, T, hd, generator=g) for n in (nh, nkv, nkv))
    allowed = block_causal_mask(torch.arange(T), block_length=4)
    out = attention(q, k, v, allowed, scale=1 / math.sqrt(hd))
    for j in range(nh):
        kv = j // (nh // nkv)
        scores = (q[j] @ k[kv].T) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        expected = torch.softmax(scores, dim=-1) @ v[kv]
        torch.testing.assert_close(out[:, j * hd : (j + 1) * hd], expected, atol=1e-6, rtol=1e-5)


def test_qkv_row_layout_and_qk_norm(tiny_dir, model):
    """Rows are [Q heads | K heads | V heads]: QK-norm makes Q and K row scales irrelevant, V's are not."""
    cfg = model.config
    q_rows, k_rows = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    ids = random_ids(48, seed=13)
    base = model.forward(ids)

    scaled = ReferenceLLaDA2(tiny_dir)
    for layer in range(cfg.num_hidden_layers):
        w = scaled.weights[f"model.layers.{layer}.attention.query_key_value.weight"]
        w[:q_rows] *= 3.0
        w[q_rows : q_rows + k_rows] *= 0.5
    torch.testing.assert_close(scaled.forward(ids), base, atol=1e-4, rtol=1e-4)
    w = scaled.weights["model.layers.1.attention.query_key_value.weight"]
    w[q_rows + k_rows :] *= 2.0
    assert (scaled.forward(ids) - base).abs().max() > 1e-2

    # zero Q rows: every query attends uniformly to what the block-causal mask lets it see
    zeroed = ReferenceLLaDA2(tiny_dir)
    wqkv = zeroed.weights["model.layers.0.attention.query_key_value.weight"]
    wqkv[:q_rows] = 0.0
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(14))
    positions = torch.arange(40)
    allowed = block_causal_mask(positions)
    cos, sin = rope_cos_sin(positions, cfg.rotary_dim, cfg.rope_theta, torch.float32)
    out = zeroed.self_attention(0, x, cos, sin, allowed)
    v = (x @ wqkv[q_rows + k_rows :].T).view(40, cfg.num_key_value_heads, cfg.head_dim)
    uniform = allowed.float() / allowed.float().sum(-1, keepdim=True)
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    heads = [uniform @ v[:, j // group] for j in range(cfg.num_attention_heads)]
    expected = torch.cat(heads, dim=-1) @ zeroed.w("model.layers.0.attention.dense.weight").T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bf16_numerics_close_to_fp32(tiny_dir, model):
    bf16 = ReferenceLLaDA2(tiny_dir, dtype=torch.bfloat16)
    ids = random_ids(48, seed=8)
    a, b = model.forward(ids), bf16.forward(ids)
    assert b.dtype == torch.float32
    assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99


# ----------------------------------------------------------------------------------------------------------
# Router and MoE
# ----------------------------------------------------------------------------------------------------------


def _route_scores(probs, bias=None, **kw):
    """Route one token whose sigmoid scores are exactly `probs` (gate = diag(logit(probs)), x = ones)."""
    probs = torch.tensor(probs, dtype=torch.float64)
    gate = torch.diag(torch.log(probs / (1 - probs))).float()
    bias = torch.zeros(len(probs)) if bias is None else torch.tensor(bias, dtype=torch.float32)
    ids, w = route(torch.ones(1, len(probs)), gate, bias, **kw)
    return ids[0].tolist(), w[0]


ROUTER_KW = dict(n_group=4, topk_group=2, top_k=2, routed_scaling_factor=2.5)


def test_router_drops_groups_by_top2_sum():
    # group 0 holds the single best expert but its top-2 sum (0.99+0.01) loses to groups 1 and 2 (0.7+0.7)
    probs = [0.99, 0.01, 0.7, 0.7, 0.7, 0.69, 0.2, 0.2]
    ids, w = _route_scores(probs, **ROUTER_KW)
    assert 0 not in ids
    assert sorted(ids) == [2, 3] or sorted(ids) == [2, 4] or sorted(ids) == [3, 4]
    assert float(w.sum()) == pytest.approx(2.5)


def test_router_bias_selects_but_does_not_weight():
    probs = [0.3, 0.1, 0.6, 0.5, 0.2, 0.2, 0.1, 0.1]
    ids, w = _route_scores(probs, **ROUTER_KW)
    assert sorted(ids) == [2, 3]
    bias = [0.0, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # lifts expert 1 (and its group) into the choice
    ids, w = _route_scores(probs, bias=bias, **ROUTER_KW)
    assert ids[0] == 1 and sorted(ids) == [1, 2]
    expected = torch.tensor([0.1, 0.6]) / 0.7 * 2.5  # bias-free sigmoid scores of the chosen experts
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=1e-6)
    # a bias common to all experts changes nothing
    ids_shift, w_shift = _route_scores(probs, bias=[0.3] * 8, **ROUTER_KW)
    ids_plain, w_plain = _route_scores(probs, **ROUTER_KW)
    assert ids_shift == ids_plain
    torch.testing.assert_close(w_shift, w_plain)


def test_router_never_picks_dropped_groups(model):
    cfg = model.config
    x = torch.randn(200, cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    gate_w, bias = model.w("model.layers.1.mlp.gate.weight"), model.w("model.layers.1.mlp.gate.expert_bias")
    routing = model.route(1, x)
    size = cfg.num_experts // cfg.n_group
    c = torch.sigmoid(x @ gate_w.T) + bias
    for t in range(x.shape[0]):
        group_scores = [sum(sorted(c[t, g * size : (g + 1) * size].tolist())[-2:]) for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: -group_scores[g])[: cfg.topk_group]
        assert {e // size for e in routing.experts[t].tolist()} <= set(kept)
    torch.testing.assert_close(routing.weights.sum(-1), torch.full((200,), 2.5), atol=1e-5, rtol=0)


def test_moe_matches_per_token_loop(model):
    cfg, layer = model.config, 2
    p = f"model.layers.{layer}.mlp."
    x = torch.randn(24, cfg.hidden_size, generator=torch.Generator().manual_seed(10))
    out, routing = model.moe_ffn(layer, x)

    gate_w, bias = model.w(p + "gate.weight").double(), model.w(p + "gate.expert_bias").double()
    size = cfg.num_experts // cfg.n_group

    def ffn(prefix, v):
        w = lambda n: model.w(prefix + n).double()  # noqa: E731
        return w("down_proj.weight") @ (F.silu(w("gate_proj.weight") @ v) * (w("up_proj.weight") @ v))

    for t in range(x.shape[0]):
        v = x[t].double()
        s = torch.sigmoid(gate_w @ v).tolist()
        c = [s[e] + float(bias[e]) for e in range(cfg.num_experts)]
        group_score = [sum(sorted(c[g * size : (g + 1) * size])[-2:]) for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[: cfg.topk_group]
        candidates = [e for e in range(cfg.num_experts) if e // size in kept]
        chosen = sorted(candidates, key=lambda e: -c[e])[: cfg.num_experts_per_tok]
        assert routing.experts[t].tolist() == chosen
        total = sum(s[e] for e in chosen)
        expected = sum(s[e] / total * cfg.routed_scaling_factor * ffn(p + f"experts.{e}.", v) for e in chosen)
        expected = expected + ffn(p + "shared_experts.", v)
        torch.testing.assert_close(out[t].double(), expected, atol=1e-5, rtol=1e-5)


def test_forward_returns_routing(model):
    logits, routing = model.forward(random_ids(40, seed=11), return_routing=True)
    assert routing[0] is None
    for r in routing[1:]:
        assert r.experts.shape == (40, 4) and r.weights.shape == (40, 4)


def test_dense_ffn_is_swiglu(model):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(12))
    p = "model.layers.0.mlp."
    gate, up, down = (model.w(p + n + ".weight") for n in ("gate_proj", "up_proj", "down_proj"))
    expected = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(model.dense_ffn(0, x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(swiglu(x, gate, up, down), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Decoding helpers and generation
# ----------------------------------------------------------------------------------------------------------


def test_transfer_schedule():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 8) == [4] * 8
    assert transfer_schedule(32, 10) == [4, 4, 3, 3, 3, 3, 3, 3, 3, 3]


def test_positions_to_commit():
    conf = torch.tensor([0.99, 0.5, 0.97, 0.2, 0.96])
    masked = torch.tensor([False, True, True, True, True])
    assert positions_to_commit(conf, masked, 0.95, 1).tolist() == [False, False, True, False, True]
    assert positions_to_commit(conf, masked, 0.97, 1).tolist() == [False, False, True, False, False]  # top-1
    exact = torch.tensor([0.75, 0.5, 0.25])  # strict >: a confidence equal to the threshold does not pass
    assert positions_to_commit(exact, torch.ones(3, dtype=torch.bool), 0.5, 1).tolist() == [True, False, False]
    assert positions_to_commit(conf, masked, 0.99, 1).tolist() == [False, False, True, False, False]
    assert positions_to_commit(conf, masked, 0.95, 3).tolist() == [False, True, True, False, True]
    assert positions_to_commit(conf, masked, 0.95, 9).sum() == 4  # quota capped at the number of masks


def test_pick_tokens_greedy_keeps_padded_ids():
    logits = torch.zeros(2, 10)
    logits[0, 9] = 5.0  # an id past a (hypothetical) tokenizer size is still a valid pick
    logits[1, 3] = 1.0
    tokens, p = pick_tokens(logits)
    assert tokens.tolist() == [9, 3]
    torch.testing.assert_close(p, torch.softmax(logits, -1)[[0, 1], [9, 3]])


PROMPT = random_ids(40, seed=20).tolist()  # 40 tokens: block 1 holds the prompt tail + 24 masks


def test_generate_is_deterministic_and_bounded(model):
    a, sa = reference_generate(model, PROMPT, 50, mask_id=MASK, eos_ids=(), return_stats=True)
    b = reference_generate(model, PROMPT, 50, mask_id=MASK, eos_ids=())
    assert a == b and len(a) == 50
    assert MASK not in a
    # canvas = ceil((40+50)/32) = 3 blocks; the tail past max_new_tokens is decoded too; prompt untouched
    assert len(sa.canvas) == 96 and MASK not in sa.canvas and sa.canvas[:40] == PROMPT
    assert list(sa.steps_per_block) == [1, 2]


def test_threshold_one_commits_one_per_step(model):
    _, stats = reference_generate(model, PROMPT, 50, threshold=1.0, mask_id=MASK, eos_ids=(), return_stats=True)
    assert all(len(r.positions) == 1 for r in stats.trace)
    assert stats.steps_per_block == {1: 24, 2: 32}
    assert stats.forwards == 56


def test_threshold_zero_commits_whole_block_per_step(model):
    out, stats = reference_generate(model, PROMPT, 50, threshold=0.0, mask_id=MASK, eos_ids=(), return_stats=True)
    assert stats.steps_per_block == {1: 1, 2: 1}
    assert [len(r.positions) for r in stats.trace] == [24, 32]
    assert len(out) == 50


def test_first_step_commits_most_confident_argmax(model):
    _, stats = reference_generate(model, PROMPT, 50, threshold=1.0, mask_id=MASK, eos_ids=(), return_stats=True)
    canvas = torch.tensor(PROMPT + [MASK] * 24)
    logits = model.forward(canvas)[32:64]
    probs = torch.softmax(logits, -1)
    conf, tok = probs.max(-1)
    conf[:8] = -1  # prompt tail positions are not candidates
    best = int(conf.argmax())
    first = stats.trace[0]
    assert first.positions == [32 + best] and first.tokens == [int(tok[best])]


def test_steps_below_block_length_use_quota(model):
    _, stats = reference_generate(
        model, PROMPT, 50, threshold=1.0, steps=8, mask_id=MASK, eos_ids=(), return_stats=True
    )
    assert [len(r.positions) for r in stats.trace if r.block == 2] == [4] * 8
    assert stats.steps_per_block == {1: 6, 2: 8}


def test_short_generation_caps_steps_like_hf(model):
    # §4.2 step 1: steps = min(steps, max_new_tokens) -> 8 steps, quota 4 per step
    out, stats = reference_generate(
        model, PROMPT[:32], 8, threshold=1.0, mask_id=MASK, eos_ids=(), return_stats=True
    )
    assert len(out) == 8
    assert stats.steps_per_block == {1: 8} and all(len(r.positions) == 4 for r in stats.trace)


def test_output_ends_at_first_eos(model):
    full = reference_generate(model, PROMPT, 80, mask_id=MASK, eos_ids=())
    eos = full[37]  # pretend this token is the end-of-sequence id
    first = full.index(eos)
    out, stats = reference_generate(model, PROMPT, 80, mask_id=MASK, eos_ids=(eos, 10_000), return_stats=True)
    assert out == full[: first + 1]
    # decoding stops after the block that holds the first eos
    assert max(stats.steps_per_block) == (len(PROMPT) + first) // 32
    # an int eos id works the same
    assert reference_generate(model, PROMPT, 80, mask_id=MASK, eos_ids=eos) == out


def test_sampling_is_reproducible_with_a_generator(model):
    def run(seed):
        return reference_generate(
            model, PROMPT, 20, temperature=0.8, top_k=20, top_p=0.9, mask_id=MASK, eos_ids=(),
            generator=torch.Generator().manual_seed(seed),
        )

    assert run(1) == run(1)
    assert len(run(2)) == 20


def test_loads_testmodel_checkpoint_if_available(tmp_path):
    testmodel = pytest.importorskip("tide_local.converters.testmodel")
    out_dir = tmp_path / "tm"
    testmodel.make_checkpoint(out_dir)
    ref = ReferenceLLaDA2(out_dir)
    logits = ref.forward(list(range(40)))
    assert logits.shape == (40, ref.config.vocab_size) and torch.isfinite(logits).all()
