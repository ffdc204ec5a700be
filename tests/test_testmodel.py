"""The random LLaDA2.0 checkpoint generator: layout, values, tokenizer, chat template."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open
from tokenizers import Tokenizer

from tide_local.converters import testmodel as tm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tm.make_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)


def _load_all(directory):
    """name → (tensor, file name) over every safetensors file of a checkpoint."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} appears twice"
                tensors[name] = (f.get_tensor(name), path.name)
    return tensors


def _expected_shapes(c):
    """Spec §2, written out independently of the generator."""
    V, H, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
    nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    F, m, E = c["intermediate_size"], c["moe_intermediate_size"], c["num_experts"]
    shapes = {
        "model.word_embeddings.weight": (V, H),
        "model.norm.weight": (H,),
        "lm_head.weight": (V, H),
    }
    for layer in range(L):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "attention.query_key_value.weight"] = ((nh + 2 * nkv) * hd, H)
        shapes[p + "attention.query_layernorm.weight"] = (hd,)
        shapes[p + "attention.key_layernorm.weight"] = (hd,)
        shapes[p + "attention.dense.weight"] = (H, nh * hd)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if layer < c["first_k_dense_replace"]:
            shapes[p + "mlp.gate_proj.weight"] = (F, H)
            shapes[p + "mlp.up_proj.weight"] = (F, H)
            shapes[p + "mlp.down_proj.weight"] = (H, F)
            continue
        shapes[p + "mlp.gate.weight"] = (E, H)
        shapes[p + "mlp.gate.expert_bias"] = (E,)
        for e in range(E):
            shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (m, H)
            shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (m, H)
            shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (H, m)
        for proj, shape in (("gate_proj", (m, H)), ("up_proj", (m, H)), ("down_proj", (H, m))):
            shapes[p + f"mlp.shared_experts.{proj}.weight"] = shape
    return shapes


def _bf16(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16)


# --- config ------------------------------------------------------------------------------


def test_config_has_the_48_keys_of_the_real_model(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert len(config) == 48
    assert config["architectures"] == ["LLaDA2MoeModelLM"]
    assert config["model_type"] == "llada2_moe"
    assert config["rotary_dim"] == config["head_dim"] * config["partial_rotary_factor"] == 32
    assert config["pad_token_id"] == tm.special_token_ids()["<|endoftext|>"]
    assert config["num_experts"] % config["n_group"] == 0
    assert config["vocab_size"] % 64 == 0
    assert config["vocab_size"] > Tokenizer.from_file(str(tiny / "tokenizer.json")).get_vocab_size()
    assert config == tm.build_config("tiny")


def test_mini_and_flash_presets_match_the_spec():
    mini = tm.build_config("mini")
    assert len(mini) == 48
    expected_mini = dict(
        vocab_size=157184, hidden_size=2048, num_hidden_layers=20, num_attention_heads=16,
        num_key_value_heads=4, head_dim=128, intermediate_size=5120, moe_intermediate_size=512,
        num_experts=256, num_experts_per_tok=8, num_shared_experts=1, n_group=8, topk_group=4,
        routed_scaling_factor=2.5, first_k_dense_replace=1, rotary_dim=64, rope_theta=600000,
        max_position_embeddings=32768, rms_norm_eps=1e-6, score_function="sigmoid",
    )
    assert {k: mini[k] for k in expected_mini} == expected_mini
    flash = tm.build_config("flash")
    assert (flash["hidden_size"], flash["num_hidden_layers"], flash["num_attention_heads"]) == (4096, 32, 32)
    assert (flash["intermediate_size"], flash["moe_intermediate_size"]) == (9216, 1024)
    for name, preset, count, gb in (("mini", mini, 14813, 32.5), ("flash", flash, 24161, 206)):
        assert len(tm.tensor_specs(preset)) == count, name
        assert tm.checkpoint_nbytes(preset) / 1e9 == pytest.approx(gb, rel=0.02), name
    # Parameter counts of spec §1.3.
    assert tm.checkpoint_nbytes(mini) / 2 / 1e9 == pytest.approx(16.256, abs=0.001)
    assert tm.checkpoint_nbytes(flash) / 2 / 1e9 == pytest.approx(102.89, abs=0.01)


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_experts": 18},  # not divisible by n_group 4
        {"topk_group": 5},
        {"num_experts_per_tok": 9},  # more than 2 groups of 4 experts
        {"num_key_value_heads": 3},
        {"head_dim": 48, "partial_rotary_factor": 0.5, "rotary_dim": 16},
        {"vocab_size": 600},  # below the tokenizer
        {"hidden_size": 0},
        {"first_k_dense_replace": 5},
    ],
)
def test_inconsistent_configs_are_refused(overrides):
    with pytest.raises(ValueError):
        tm.build_config("tiny", overrides)


def test_unknown_preset_and_bad_bias_dtype():
    with pytest.raises(ValueError, match="preset"):
        tm.build_config("huge")
    with pytest.raises(ValueError, match="expert_bias_dtype"):
        tm.tensor_specs(tm.build_config(), "f16")


# --- tensors -----------------------------------------------------------------------------


def test_every_tensor_has_the_spec_name_shape_dtype_and_value(tiny):
    config = tm.build_config("tiny")
    tensors = _load_all(tiny)
    L, E = config["num_hidden_layers"], config["num_experts"]
    assert len(tensors) == 3 + 9 + (L - 1) * (6 + 2 + 3 * E + 3) == 189
    expected = _expected_shapes(config)
    assert set(tensors) == set(expected)
    assert [p.name for p in tiny.glob("*.safetensors")] == ["model.safetensors"]
    assert not (tiny / "model.safetensors.index.json").exists()
    for name, (tensor, _) in tensors.items():
        assert tuple(tensor.shape) == expected[name], name
        assert tensor.dtype == torch.bfloat16, name
        source = tm.tensor_values(config, name, seed=3)
        assert source.dtype == np.float32 and source.shape == expected[name]
        assert torch.equal(tensor, _bf16(source)), name


def test_values_have_the_intended_scales(tiny):
    tensors = {name: t.float() for name, (t, _) in _load_all(tiny).items()}
    for name, t in tensors.items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert abs(t.mean().item() - 1) < 0.05 and 0.05 < t.std().item() < 0.15, name
        elif name.endswith("expert_bias"):
            assert abs(t.mean().item()) < 0.1 and 0.03 < t.std().item() < 0.2, name
        elif name == "model.word_embeddings.weight":
            assert 0.9 < t.std().item() < 1.1
        else:
            assert t.std().item() * math.sqrt(t.shape[1]) == pytest.approx(1, abs=0.1), name
    # Different tensors get different values, not copies.
    e0 = tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
    e1 = tensors["model.layers.1.mlp.experts.1.gate_proj.weight"]
    assert not torch.equal(e0, e1)


def _rms_norm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_a_forward_pass_gives_sane_varied_logits(tiny):
    """A plain fp32 forward (spec §3, full attention over 32 tokens): activations must
    neither vanish nor explode, and different positions must predict different tokens."""
    c = tm.build_config("tiny")
    w = {name: t.float() for name, (t, _) in _load_all(tiny).items()}
    nh, nkv, hd, r = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rotary_dim"]
    E, k, groups, top_groups = c["num_experts"], c["num_experts_per_tok"], c["n_group"], c["topk_group"]
    T = 32
    ids = torch.tensor(Tokenizer.from_file(str(tiny / "tokenizer.json")).encode(
        "The tide comes in twice a day, and the fishermen know the hours by heart.").ids[:T])
    T = len(ids)
    h = w["model.word_embeddings.weight"][ids]
    pos = torch.arange(T, dtype=torch.float32)
    inv_freq = c["rope_theta"] ** (-torch.arange(0, r, 2, dtype=torch.float32) / r)
    angle = pos[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(angle), torch.sin(angle)

    def rope(x):  # [heads, T, hd]
        a, b, rest = x[..., : r // 2], x[..., r // 2 : r], x[..., r:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], -1)

    def swiglu(x, gate, up, down):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        x = _rms_norm(h, w[p + "input_layernorm.weight"])
        qkv = (x @ w[p + "attention.query_key_value.weight"].T).view(T, nh + 2 * nkv, hd).transpose(0, 1)
        q, kk, v = qkv[:nh], qkv[nh : nh + nkv], qkv[nh + nkv :]
        q = rope(_rms_norm(q, w[p + "attention.query_layernorm.weight"]))
        kk = rope(_rms_norm(kk, w[p + "attention.key_layernorm.weight"]))
        kk, v = kk.repeat_interleave(nh // nkv, 0), v.repeat_interleave(nh // nkv, 0)
        att = torch.softmax(q @ kk.transpose(1, 2) / math.sqrt(hd), -1) @ v
        h = h + att.transpose(0, 1).reshape(T, nh * hd) @ w[p + "attention.dense.weight"].T
        x = _rms_norm(h, w[p + "post_attention_layernorm.weight"])
        if layer < c["first_k_dense_replace"]:
            h = h + swiglu(x, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
            continue
        s = torch.sigmoid(x @ w[p + "mlp.gate.weight"].T)
        choice = s + w[p + "mlp.gate.expert_bias"]
        group_score = choice.view(T, groups, -1).topk(2, -1).values.sum(-1)
        keep = torch.zeros(T, groups).scatter_(1, group_score.topk(top_groups, -1).indices, 1)
        choice = choice.masked_fill(~keep.repeat_interleave(E // groups, 1).bool(), -math.inf)
        experts = choice.topk(k, -1).indices
        weights = s.gather(1, experts)
        weights = weights / weights.sum(-1, keepdim=True) * c["routed_scaling_factor"]
        dense_weights = torch.zeros(T, E).scatter_(1, experts, weights)
        out = torch.zeros_like(h)
        for e in range(E):
            q_ = f"{p}mlp.experts.{e}."
            y = swiglu(x, w[q_ + "gate_proj.weight"], w[q_ + "up_proj.weight"], w[q_ + "down_proj.weight"])
            out += dense_weights[:, e : e + 1] * y
        shared = p + "mlp.shared_experts."
        h = h + out + swiglu(x, w[shared + "gate_proj.weight"], w[shared + "up_proj.weight"], w[shared + "down_proj.weight"])
        assert h.abs().max() < 100, f"layer {layer} explodes"
    logits = _rms_norm(h, w["model.norm.weight"]) @ w["lm_head.weight"].T
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std().item() < 10
    assert len(set(logits.argmax(-1).tolist())) >= T // 4


# --- files ------------------------------------------------------------------------------


def test_sharded_checkpoint_has_a_consistent_index(tmp_path, tiny):
    out = tm.make_checkpoint(tmp_path / "sharded", seed=3, shard_size="1MB")
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = _load_all(out)
    assert index["weight_map"] == {name: file for name, (_, file) in tensors.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t, _ in tensors.values())
    assert index["metadata"]["total_size"] == tm.checkpoint_nbytes(tm.build_config("tiny"))
    for shard in shards:
        data = sum(t.numel() * 2 for name, (t, f) in tensors.items() if f == shard)
        assert data <= 1_000_000 or sum(1 for _, f in tensors.values() if f == shard) == 1
    single = _load_all(tiny)
    assert all(torch.equal(t, single[name][0]) for name, (t, _) in tensors.items())
    # Regenerating unsharded into the same directory leaves no stale shard behind.
    tm.make_checkpoint(out, seed=3)
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


def test_safetensors_header_is_aligned_and_minimal(tiny):
    raw = (tiny / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    assert header.pop("__metadata__") == {"format": "pt"}
    ends = sorted(entry["data_offsets"] for entry in header.values())
    assert ends[0][0] == 0 and ends[-1][1] == len(raw) - 8 - header_len
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:]))


def test_same_seed_gives_identical_bytes(tmp_path, tiny, monkeypatch):
    # A smaller write chunk must not change a byte either: values are a per-tensor stream.
    monkeypatch.setattr(tm, "_CHUNK_ELEMENTS", 1000)
    again = tm.make_checkpoint(tmp_path / "again", seed=3)
    files = sorted(p.name for p in tiny.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny / name).read_bytes() == (again / name).read_bytes(), name
    other = tm.make_checkpoint(tmp_path / "other", seed=4)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_f32_expert_bias_variant(tmp_path, tiny):
    out = tm.make_checkpoint(tmp_path / "f32", seed=3, expert_bias_dtype="f32",
                             config={"num_hidden_layers": 2})
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    tensors = _load_all(out)
    assert len(tensors) == 3 + 9 + 1 * (6 + 2 + 3 * 16 + 3)
    bias = tensors["model.layers.1.mlp.gate.expert_bias"][0]
    assert bias.dtype == torch.float32 and bias.shape == (16,)
    source = tm.tensor_values(config, "model.layers.1.mlp.gate.expert_bias", seed=3, expert_bias_dtype="f32")
    assert torch.equal(bias, torch.from_numpy(source))
    # Same draw as the bf16 variant, only stored wider.
    assert torch.equal(bias.to(torch.bfloat16), _load_all(tiny)["model.layers.1.mlp.gate.expert_bias"][0])
    others = [t.dtype for name, (t, _) in tensors.items() if not name.endswith("expert_bias")]
    assert set(others) == {torch.bfloat16}


def test_fast_mode_is_deterministic_and_matches_tensor_values(tmp_path):
    config = {"num_hidden_layers": 2}
    out = tm.make_checkpoint(tmp_path / "fast", config, seed=1, fast=True)
    full = tm.build_config("tiny", config)
    tensors = _load_all(out)
    for name in ("model.word_embeddings.weight", "model.layers.1.mlp.experts.7.down_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.gate.expert_bias"):
        source = tm.tensor_values(full, name, seed=1, fast=True)
        assert torch.equal(tensors[name][0], _bf16(source)), name
    a = tensors["model.layers.1.mlp.experts.0.up_proj.weight"][0]
    b = tensors["model.layers.1.mlp.experts.1.up_proj.weight"][0]
    assert not torch.equal(a, b)
    again = tm.make_checkpoint(tmp_path / "fast2", config, seed=1, fast=True)
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def test_progress_reports_every_byte(tmp_path):
    calls = []
    tm.make_checkpoint(tmp_path / "p", {"num_hidden_layers": 1}, progress=lambda d, t: calls.append((d, t)))
    total = tm.checkpoint_nbytes(tm.build_config("tiny", {"num_hidden_layers": 1}))
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


# --- tokenizer and chat template ---------------------------------------------------------


def test_tokenizer_round_trips_and_has_single_token_specials(tiny):
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    assert 400 <= tok.get_vocab_size() <= 1000
    for text in ["Hello, world!", "The tide comes in twice a day.\n\n  indented\tand 12345 digits",
                 "ünïcödé – 漢字 🙂 and <b>tags</b>", ""]:
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
    ids = tm.special_token_ids()
    contents = [content for content, _ in tm.SPECIAL_TOKENS]
    assert contents[:6] == ["<|startoftext|>", "<|endoftext|>", "<|mask|>", "<|role_end|>", "<role>", "</role>"]
    first = tok.get_vocab_size() - len(contents)
    assert [ids[c] for c in contents] == list(range(first, first + len(contents)))
    for content in contents:
        assert tok.id_to_token(ids[content]) == content
        assert tok.encode(f"a{content}b").tokens == ["a", content, "b"]
    text = "<role>HUMAN</role>Hi<|role_end|><|mask|><|mask|><|endoftext|>"
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == "HUMANHi"


def test_tokenizer_config_and_generation_config(tiny):
    cfg = json.loads((tiny / "tokenizer_config.json").read_text())
    ids = tm.special_token_ids()
    assert cfg["bos_token"] == "<|startoftext|>"
    assert cfg["eos_token"] == cfg["pad_token"] == "<|endoftext|>"
    assert cfg["mask_token"] == "<|mask|>"
    assert cfg["add_bos_token"] is False and cfg["add_eos_token"] is False
    decoder = {int(i): entry for i, entry in cfg["added_tokens_decoder"].items()}
    assert {entry["content"]: i for i, entry in decoder.items()} == ids
    assert decoder[ids["<|mask|>"]]["special"] is True
    assert decoder[ids["<think>"]]["special"] is False
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == ids["<|endoftext|>"] and gen["bos_token_id"] == ids["<|startoftext|>"]


def _render(template, messages, add_generation_prompt=True):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_chat_template_renders_the_canonical_prompt(tiny):
    template = json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"]
    assert _render(template, [{"role": "user", "content": "What is 2+2?"}]) == (
        "<role>SYSTEM</role>detailed thinking off<|role_end|>"
        "<role>HUMAN</role>What is 2+2?<|role_end|><role>ASSISTANT</role>"
    )
    conversation = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "How are you?"},
    ]
    assert _render(template, conversation) == (
        "<role>SYSTEM</role>You are a helpful assistant\ndetailed thinking off<|role_end|>"
        "<role>HUMAN</role>Hello<|role_end|><role>ASSISTANT</role>Hi there<|role_end|>"
        "<role>HUMAN</role>How are you?<|role_end|><role>ASSISTANT</role>"
    )
    assert _render(template, conversation[:3], add_generation_prompt=False).endswith("Hi there<|role_end|>")
    # The rendered prompt tokenizes with every marker as one token.
    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    tokens = tok.encode(_render(template, conversation)).tokens
    assert tokens.count("<role>") == 5 and tokens.count("<|role_end|>") == 4


# --- command line ----------------------------------------------------------------------


def test_parse_size():
    assert tm.parse_size("5GB") == 5 * 10**9
    assert tm.parse_size("512MiB") == 512 * 2**20
    assert tm.parse_size(1234) == 1234
    assert tm.parse_size("1.5kb") == 1500
    for bad in ("five", "10XB", 0, "-1GB"):
        with pytest.raises(ValueError):
            tm.parse_size(bad)


def test_command_line(tmp_path, capsys):
    assert tm.main([str(tmp_path / "cli"), "--layers", "2", "--seed", "5",
                    "--expert-bias-dtype", "f32", "--shard-size", "2MB"]) == 0
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (tmp_path / "cli" / "model.safetensors.index.json").exists()
    assert "100.0%" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tm.main([str(tmp_path / "bad"), "--layers", "0"])
