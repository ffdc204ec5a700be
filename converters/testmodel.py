"""Random LLaDA2.0 checkpoints in the exact Hugging Face layout, for tests and benchmarks.

No model hub is reachable from the test machines, so every test that needs a LLaDA2.0
checkpoint makes one here: ``config.json`` with the 48 keys of the real LLaDA2.0-mini
config, BF16 safetensors (sharded with ``model.safetensors.index.json`` when larger than
one shard), a small byte-level BPE ``tokenizer.json`` trained on the spot with the
LLaDA2 special tokens, and ``tokenizer_config.json`` with the Ling-2.0 chat template.

Weights are written one tensor at a time, big tensors in row chunks, so memory stays
bounded whatever the checkpoint size (the full LLaDA2.0-mini shape is 32 GB).

Values. Every tensor is random and deterministic in ``(seed, tensor name)`` alone:
matrices ~ N(0, 1/fan_in), embeddings ~ N(0, 1), RMSNorm weights ~ 1 + 0.1·N(0, 1),
router expert biases ~ 0.1·N(0, 1). BF16 tensors hold the float32 value rounded to
nearest even; :func:`tensor_values` returns the float32 source of any tensor.

Fast mode (``fast=True``, the default above :data:`FAST_THRESHOLD_BYTES`): drawing
normal numbers runs at a few tens of millions per second per core, so for checkpoints
of many GB each matrix is instead a cyclic window, at an offset derived from its name,
of one pre-drawn pool of 4 Mi values per weight scale. Tensors then share values (not
shapes or names), which is fine for converter, memory and speed tests but makes the
model meaningless; norms and biases stay fully random in both modes.

Command line::

    python -m tide_local.converters.testmodel OUT_DIR [--preset tiny|mini|flash] [--seed N]
        [--layers N] [--expert-bias-dtype bf16|f32] [--shard-size 5GB] [--fast|--no-fast]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from tide_local.units import parse_size

from .testtokenizer import (CHAT_TEMPLATE, SPECIAL_TOKENS, bpe_tokenizer_json, build_tokenizer,  # noqa: F401 (re-exported)
                            special_token_ids, tokenizer_config)

__all__ = [
    "PRESETS",
    "SPECIAL_TOKENS",
    "CHAT_TEMPLATE",
    "FAST_THRESHOLD_BYTES",
    "HFTensor",
    "build_config",
    "tensor_specs",
    "tensor_values",
    "checkpoint_nbytes",
    "build_tokenizer",
    "special_token_ids",
    "make_checkpoint",
    "parse_size",
    "write_metadata",
    "bpe_tokenizer_json",
    "main",
]

# ---------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------

# The 48 keys of the LLaDA2.0-mini config.json, in the file's (alphabetical) order, with
# its values. pad_token_id is replaced by our tokenizer's <|endoftext|> id.
_MINI_CONFIG: dict[str, Any] = {
    "architectures": ["LLaDA2MoeModelLM"],
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
        "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
        "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
    },
    "dtype": "bfloat16",
    "embedding_dropout": 0.0,
    "first_k_dense_replace": 1,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "llada2_moe",
    "moe_intermediate_size": 512,
    "moe_router_enable_expert_bias": True,
    "n_group": 8,
    "norm_head": False,
    "norm_softmax": False,
    "norm_topk_prob": True,
    "num_attention_heads": 16,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 20,
    "num_key_value_heads": 4,
    "num_shared_experts": 1,
    "output_dropout": 0.0,
    "output_router_logits": False,
    "pad_token_id": 156892,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 600000,
    "rotary_dim": 64,
    "routed_scaling_factor": 2.5,
    "router_dtype": "fp32",
    "score_function": "sigmoid",
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "transformers_version": "4.57.1",
    "use_bias": False,
    "use_cache": False,
    "use_qkv_bias": False,
    "use_rmsnorm": True,
    "use_sliding_window": False,
    "using_split_qkv_in_self_attention": False,
    "vocab_size": 157184,
}

# Shape keys each preset sets; everything else comes from the mini config.
PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for unit tests (about 8 MB). hidden/intermediate are multiples of 256,
    # moe_intermediate (64) and head_dim (64) are not, so K-quant fallbacks get exercised.
    # vocab_size is padded above the tokenizer's 648 ids, like the real 157153 → 157184.
    "tiny": {
        "vocab_size": 704,
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "partial_rotary_factor": 0.5,
        "intermediate_size": 512,
        "moe_intermediate_size": 64,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "n_group": 4,
        "topk_group": 2,
        "num_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "rope_theta": 600000,
        "max_position_embeddings": 4096,
    },
    "mini": {},
    "flash": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "intermediate_size": 9216,
        "moe_intermediate_size": 1024,
    },
}

_POSITIVE_INT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "moe_intermediate_size",
    "num_experts", "num_experts_per_tok", "n_group", "topk_group", "num_shared_experts",
    "max_position_embeddings",
)


def build_config(preset: str = "tiny", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json dict for ``preset`` with ``overrides`` merged over it, validated.

    ``rotary_dim`` follows ``head_dim * partial_rotary_factor`` unless overridden, and
    ``pad_token_id`` is the test tokenizer's ``<|endoftext|>`` id unless overridden. Keys
    the real config does not have may be added (e.g. ``expert_capacity`` to test that a
    converter refuses LLaDA2.2); they are written as given. Raises ``ValueError`` for an
    unknown preset or an inconsistent shape.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    overrides = dict(overrides or {})
    config = dict(_MINI_CONFIG)
    config["auto_map"] = dict(config["auto_map"])
    config.update(PRESETS[preset])
    config.update(overrides)
    if "rotary_dim" not in overrides:
        config["rotary_dim"] = int(config["head_dim"] * config["partial_rotary_factor"])
    if "pad_token_id" not in overrides:
        config["pad_token_id"] = special_token_ids()["<|endoftext|>"]
    _validate(config)
    return config


def _validate(c: Mapping[str, Any]) -> None:
    for key in _POSITIVE_INT_KEYS:
        value = c.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config {key} must be a positive integer, got {value!r}")
    layers, dense = c["num_hidden_layers"], c["first_k_dense_replace"]
    if not isinstance(dense, int) or not 0 <= dense <= layers:
        raise ValueError(f"first_k_dense_replace ({dense!r}) must be in 0..num_hidden_layers ({layers})")
    if c["num_attention_heads"] % c["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    experts, groups = c["num_experts"], c["n_group"]
    if experts % groups:
        raise ValueError(f"num_experts ({experts}) must be divisible by n_group ({groups})")
    if c["topk_group"] > groups:
        raise ValueError(f"topk_group ({c['topk_group']}) exceeds n_group ({groups})")
    selectable = c["topk_group"] * (experts // groups)
    if c["num_experts_per_tok"] > selectable:
        raise ValueError(
            f"num_experts_per_tok ({c['num_experts_per_tok']}) exceeds the experts in "
            f"topk_group groups ({selectable})"
        )
    rotary = c["rotary_dim"]
    if not isinstance(rotary, int) or rotary <= 0 or rotary % 2 or rotary > c["head_dim"]:
        raise ValueError(f"rotary_dim ({rotary!r}) must be even and in 2..head_dim ({c['head_dim']})")
    if rotary != int(c["head_dim"] * c["partial_rotary_factor"]):
        raise ValueError("rotary_dim must equal head_dim * partial_rotary_factor")
    n_tokens = build_tokenizer().get_vocab_size(with_added_tokens=True)
    if c["vocab_size"] < n_tokens:
        raise ValueError(f"vocab_size ({c['vocab_size']}) is below the tokenizer's {n_tokens} ids")


# ---------------------------------------------------------------------------------------
# Tensors (spec §2)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTensor:
    """One tensor of the Hugging Face checkpoint (not a GGUF one: that is
    ``architecture.TensorSpec``): HF name, shape ([out, in] for matrices), safetensors dtype
    ("BF16" or "F32"), and how its values are drawn (``kind``: "matrix", "embedding",
    "norm" or "bias"; matrices have std ``1/sqrt(shape[-1])``)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * (4 if self.dtype == "F32" else 2)


def tensor_specs(config: Mapping[str, Any], expert_bias_dtype: str = "bf16") -> list[HFTensor]:
    """Every tensor of the checkpoint in file order (layer by layer, spec §2 order).

    Count: ``3 + 9·k + (L − k)·(6 + 2 + 3·E + 3)`` for k dense layers.
    """
    bias_dtype = _dtype_name(expert_bias_dtype)
    V, H = config["vocab_size"], config["hidden_size"]
    nh, nkv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    F, m = config["intermediate_size"], config["moe_intermediate_size"]
    E = config["num_experts"]
    shared = m * config["num_shared_experts"]

    def mat(name: str, shape: tuple[int, ...]) -> HFTensor:
        return HFTensor(name, shape, "BF16", "matrix")

    def norm(name: str, size: int) -> HFTensor:
        return HFTensor(name, (size,), "BF16", "norm")

    specs = [HFTensor("model.word_embeddings.weight", (V, H), "BF16", "embedding")]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs += [
            norm(p + "input_layernorm.weight", H),
            mat(p + "attention.query_key_value.weight", ((nh + 2 * nkv) * hd, H)),
            norm(p + "attention.query_layernorm.weight", hd),
            norm(p + "attention.key_layernorm.weight", hd),
            mat(p + "attention.dense.weight", (H, nh * hd)),
            norm(p + "post_attention_layernorm.weight", H),
        ]
        if layer < config["first_k_dense_replace"]:
            specs += [
                mat(p + "mlp.gate_proj.weight", (F, H)),
                mat(p + "mlp.up_proj.weight", (F, H)),
                mat(p + "mlp.down_proj.weight", (H, F)),
            ]
            continue
        specs += [
            mat(p + "mlp.gate.weight", (E, H)),
            HFTensor(p + "mlp.gate.expert_bias", (E,), bias_dtype, "bias"),
        ]
        for e in range(E):
            specs += [
                mat(p + f"mlp.experts.{e}.gate_proj.weight", (m, H)),
                mat(p + f"mlp.experts.{e}.up_proj.weight", (m, H)),
                mat(p + f"mlp.experts.{e}.down_proj.weight", (H, m)),
            ]
        specs += [
            mat(p + "mlp.shared_experts.gate_proj.weight", (shared, H)),
            mat(p + "mlp.shared_experts.up_proj.weight", (shared, H)),
            mat(p + "mlp.shared_experts.down_proj.weight", (H, shared)),
        ]
    specs += [
        norm("model.norm.weight", H),
        mat("lm_head.weight", (V, H)),
    ]
    return specs


def checkpoint_nbytes(config: Mapping[str, Any], expert_bias_dtype: str = "bf16") -> int:
    """Total tensor bytes of the checkpoint (``metadata.total_size`` of the index)."""
    return sum(s.nbytes for s in tensor_specs(config, expert_bias_dtype))


def _dtype_name(expert_bias_dtype: str) -> str:
    name = expert_bias_dtype.lower()
    if name not in ("bf16", "f32"):
        raise ValueError(f"expert_bias_dtype must be 'bf16' or 'f32', got {expert_bias_dtype!r}")
    return name.upper()


# ---------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------

FAST_THRESHOLD_BYTES = 1 << 30  # fast=None turns fast mode on above this checkpoint size
_CHUNK_ELEMENTS = 1 << 22  # values drawn and written at a time (16 MB of float32)
_POOL_ELEMENTS = (1 << 22) + 1021  # fast mode pool; odd length so windows do not align


def _name_key(name: str) -> list[int]:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    value = int.from_bytes(digest, "little")
    return [value & 0xFFFFFFFF, value >> 32]


def _scale(spec: HFTensor) -> float:
    if spec.kind == "matrix":
        return 1.0 / math.sqrt(spec.shape[-1])
    if spec.kind == "embedding":
        return 1.0
    return 0.1  # norm (around 1) and bias (around 0)


class _Values:
    """Draws the float32 source values of tensors, chunk by chunk."""

    def __init__(self, seed: int, fast: bool):
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = seed
        self.fast = fast
        self._pools: dict[float, np.ndarray] = {}

    def chunks(self, spec: HFTensor) -> Iterator[np.ndarray]:
        """1-D float32 chunks that concatenate to the flattened tensor (row-major)."""
        if self._pooled(spec):
            for bits in self._pool_chunks(spec):
                yield _bf16_to_f32(bits)
            return
        rng = np.random.default_rng([self.seed, *_name_key(spec.name)])
        scale = np.float32(_scale(spec))
        n = spec.numel
        for start in range(0, n, _CHUNK_ELEMENTS):
            chunk = rng.standard_normal(min(_CHUNK_ELEMENTS, n - start), dtype=np.float32)
            chunk *= scale
            if spec.kind == "norm":
                chunk += np.float32(1.0)
            yield chunk

    def stored_chunks(self, spec: HFTensor) -> Iterator[np.ndarray]:
        """The tensor's bytes as stored: bf16 bit patterns (uint16) or float32 chunks."""
        if self._pooled(spec):
            yield from self._pool_chunks(spec)
        elif spec.dtype == "F32":
            yield from self.chunks(spec)
        else:
            for chunk in self.chunks(spec):
                yield _f32_to_bf16(chunk)

    def _pooled(self, spec: HFTensor) -> bool:
        return self.fast and spec.dtype == "BF16" and spec.kind in ("matrix", "embedding")

    def _pool_chunks(self, spec: HFTensor) -> Iterator[np.ndarray]:
        """Windows (bf16 bits) of the pool for the tensor's scale, cyclic from a
        name-derived offset; slices of the pool, never copies."""
        scale = _scale(spec)
        pool = self._pools.get(scale)
        if pool is None:
            rng = np.random.default_rng([self.seed, *_name_key(f"pool:{scale!r}")])
            values = rng.standard_normal(_POOL_ELEMENTS, dtype=np.float32)
            values *= np.float32(scale)
            pool = self._pools[scale] = _f32_to_bf16(values)
        key = _name_key(spec.name)
        pos = (key[0] | key[1] << 32) % _POOL_ELEMENTS
        remaining = spec.numel
        while remaining:
            take = min(remaining, _POOL_ELEMENTS - pos, _CHUNK_ELEMENTS)
            yield pool[pos : pos + take]
            remaining -= take
            pos = (pos + take) % _POOL_ELEMENTS


def _f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 → bf16 bit patterns (uint16), rounding to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return rounded.astype(np.uint16)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _resolve_fast(fast: bool | None, config: Mapping[str, Any], expert_bias_dtype: str) -> bool:
    if fast is None:
        return checkpoint_nbytes(config, expert_bias_dtype) > FAST_THRESHOLD_BYTES
    return bool(fast)


def tensor_values(
    config: Mapping[str, Any],
    name: str,
    *,
    seed: int = 0,
    fast: bool | None = None,
    expert_bias_dtype: str = "bf16",
) -> np.ndarray:
    """The float32 source of tensor ``name`` as :func:`make_checkpoint` draws it with the
    same arguments; a BF16 tensor in the file is this rounded to nearest even. Meant for
    small tensors (it materialises the whole tensor)."""
    for spec in tensor_specs(config, expert_bias_dtype):
        if spec.name == name:
            values = _Values(seed, _resolve_fast(fast, config, expert_bias_dtype))
            return np.concatenate(list(values.chunks(spec))).reshape(spec.shape)
    raise KeyError(name)


# ---------------------------------------------------------------------------------------
# Safetensors
# ---------------------------------------------------------------------------------------

_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


def _plan_shards(specs: list[HFTensor], shard_size: int) -> list[list[HFTensor]]:
    """Greedy packing in file order, as transformers does: a tensor larger than a shard
    gets a shard of its own."""
    shards: list[list[HFTensor]] = [[]]
    used = 0
    for spec in specs:
        if shards[-1] and used + spec.nbytes > shard_size:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def _header(specs: list[HFTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": spec.dtype,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def _write_shard(path: Path, specs: list[HFTensor], values: _Values, on_bytes: Callable[[int], None]) -> None:
    with open(path, "wb") as f:
        f.write(_header(specs))
        for spec in specs:
            for data in values.stored_chunks(spec):
                f.write(memoryview(data).cast("B"))
                on_bytes(data.nbytes)


# ---------------------------------------------------------------------------------------
# make_checkpoint
# ---------------------------------------------------------------------------------------


def write_metadata(out_dir: str | Path, cfg: Mapping[str, Any], tokenizer=None) -> None:
    """Write every file of the Hugging Face layout but the weights into ``out_dir``: config.json
    (``cfg``, e.g. from :func:`build_config`), generation_config.json, the tokenizer (default: the
    test tokenizer; one with the added tokens of :data:`SPECIAL_TOKENS`) and its configuration
    with the chat template. Used for random and for trained checkpoints."""
    out = Path(out_dir)
    tokenizer = tokenizer or build_tokenizer()
    ids = {content: tokenizer.token_to_id(content) for content, _ in SPECIAL_TOKENS}
    _write_json(out / "config.json", cfg)
    _write_json(
        out / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": ids["<|startoftext|>"],
            "eos_token_id": ids["<|endoftext|>"],
            "pad_token_id": cfg["pad_token_id"],
            "transformers_version": cfg.get("transformers_version", "4.57.1"),
        },
    )
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(cfg, tokenizer))
    _write_json(
        out / "special_tokens_map.json",
        {
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "mask_token": "<|mask|>",
            "pad_token": "<|endoftext|>",
        },
    )


def make_checkpoint(
    out_dir: str | Path,
    config: Mapping[str, Any] | None = None,
    *,
    preset: str = "tiny",
    seed: int = 0,
    shard_size: int | str = "5GB",
    expert_bias_dtype: str = "bf16",
    fast: bool | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a random LLaDA2.0 checkpoint into ``out_dir`` (created if needed) and return it.

    ``config`` overrides keys of the ``preset`` (see :func:`build_config`). Weights are
    BF16; ``mlp.gate.expert_bias`` is BF16 or F32 (``expert_bias_dtype``, as in LLaDA2.0
    and LLaDA2.1 respectively). Tensors are split into shards of at most ``shard_size``
    bytes (int, or a string like "5GB"); one shard is written as ``model.safetensors``,
    several as ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    Safetensors files from an earlier run in ``out_dir`` are removed first.

    The same arguments always give byte-identical files. ``fast=None`` uses fast mode
    (tiled random pools, see the module docstring) only above 1 GiB of weights.
    ``progress(done_bytes, total_bytes)`` is called as weight data is written.
    """
    out = Path(out_dir)
    cfg = build_config(preset, config)
    specs = tensor_specs(cfg, expert_bias_dtype)
    limit = parse_size(shard_size, what="shard size")
    values = _Values(seed, _resolve_fast(fast, cfg, expert_bias_dtype))
    total = sum(s.nbytes for s in specs)
    shards = _plan_shards(specs, limit)

    out.mkdir(parents=True, exist_ok=True)
    stale = [out / "model.safetensors", out / "model.safetensors.index.json"]
    stale += out.glob("model-?????-of-?????.safetensors")
    for path in stale:
        if path.is_file():
            path.unlink()

    write_metadata(out, cfg)

    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    if progress is not None:
        progress(0, total)
    if len(shards) == 1:
        _write_shard(out / "model.safetensors", shards[0], values, on_bytes)
        return out
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = _SHARD_NAME.format(index=index, count=len(shards))
        _write_shard(out / file_name, shard, values, on_bytes)
        weight_map.update({spec.name: file_name for spec in shard})
    _write_json(
        out / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": weight_map},
    )
    return out


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def _progress_printer(stream=None) -> Callable[[int, int], None]:
    start = time.monotonic()
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < 0.25:
            return
        last[0] = now
        unit, scale = ("GB", 1e9) if total >= 1e9 else ("MB", 1e6)
        rate = done / max(now - start, 1e-9) / 1e6
        pct = 100.0 * done / total if total else 100.0
        out = stream or sys.stderr
        out.write(f"\r  {done / scale:8.2f} / {total / scale:.2f} {unit}  {pct:5.1f}%  {rate:7.1f} MB/s")
        if done >= total:
            out.write("\n")
        out.flush()

    return report


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m tide_local.converters.testmodel",
        description="Write a random LLaDA2.0 checkpoint (Hugging Face layout) for tests and benchmarks.",
    )
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, help="override num_hidden_layers")
    parser.add_argument("--expert-bias-dtype", choices=["bf16", "f32"], default="bf16")
    parser.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB (default 5GB)")
    fast = parser.add_mutually_exclusive_group()
    fast.add_argument("--fast", dest="fast", action="store_true", default=None,
                      help="tile pre-drawn random pools (default above 1 GiB of weights)")
    fast.add_argument("--no-fast", dest="fast", action="store_false", help="draw every value")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    args = parser.parse_args(argv)

    overrides = {}
    if args.layers is not None:
        overrides["num_hidden_layers"] = args.layers
    try:
        cfg = build_config(args.preset, overrides)
        total = checkpoint_nbytes(cfg, args.expert_bias_dtype)
        n_tensors = len(tensor_specs(cfg, args.expert_bias_dtype))
        print(
            f"{args.preset}: {cfg['num_hidden_layers']} layers, {cfg['num_experts']} experts, "
            f"{n_tensors} tensors, {total / 1e6:.1f} MB → {args.out_dir}",
            file=sys.stderr,
        )
        make_checkpoint(
            args.out_dir,
            overrides,
            preset=args.preset,
            seed=args.seed,
            shard_size=args.shard_size,
            expert_bias_dtype=args.expert_bias_dtype,
            fast=args.fast,
            progress=None if args.quiet else _progress_printer(),
        )
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
