"""K-quant models and batch-invariance: with ggml's tiled CPU K-quant matmul switched off
(`GGML_CPU_TILED_MM=0`, read once per process, hence the subprocess), a row's result no longer
depends on how many rows share a matmul, and the block KV cache gives the full recompute's
logits bit for bit on a q4_k_m model, as it does for f32 and q8_0 with the defaults.

With the defaults ggml takes the tiled kernel for a matrix (or an expert) with 8 rows or more
and the per-row kernel below that; the two round differently, so the cached block (32 rows)
and the recompute (64 rows) differ in the last bits (the README's exactness note)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from tide_local.converters.convert import convert
from tide_local.converters.testmodel import build_config, make_checkpoint

# hidden 512 and expert width 256: every matrix is a whole number of Q4_K super-blocks
CONFIG = {"hidden_size": 512, "moe_intermediate_size": 256, "intermediate_size": 1024, "num_hidden_layers": 3,
          "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64}

PROBE = """
import json, sys
import numpy as np
import tide_local
from tide_local.engine import CachedBlockModel
ids = np.random.default_rng(1).integers(0, 600, 64).astype(np.int32)
with tide_local.load(sys.argv[1], device="cpu", threads=1) as eng:
    full = eng.logits(ids)[32:]
    cached = CachedBlockModel(eng.model, 32)
    cached.prefill(ids[:32])
    block = cached.block_logits(ids[32:], 32, np.arange(32))
print(json.dumps({"max_diff": float(np.abs(full - block).max()), "scale": float(np.abs(full).max())}))
"""


@pytest.fixture(scope="module")
def kquant_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquant")
    ckpt = make_checkpoint(root / "hf", config=build_config("tiny", CONFIG), seed=5)
    out = root / "q4_k_m.gguf"
    convert(ckpt, out, "q4_k_m", progress=False, log=io.StringIO())
    return out


def _cache_vs_recompute(model, **env) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, str(model)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kv_cache_is_bitwise_the_recompute_with_batch_invariant_kernels(kquant_model):
    assert _cache_vs_recompute(kquant_model, GGML_CPU_TILED_MM="0")["max_diff"] == 0.0


def test_kv_cache_matches_the_recompute_to_rounding_with_the_defaults(kquant_model):
    r = _cache_vs_recompute(kquant_model)
    assert r["max_diff"] <= 1e-5 * r["scale"]
