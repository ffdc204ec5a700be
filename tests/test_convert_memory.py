"""The converter's memory bound: peak RSS under 3 GB on a checkpoint that cannot be held in 3 GB.

The synthetic checkpoint is ~3.4 GB of bf16 with a 1.6 GB embedding and LM head each (3.2 GB
each once widened to float32), so converting any tensor whole, or keeping the output in
memory, breaks the bound.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors import safe_open

from tide_local.converters.testmodel import make_checkpoint
from tide_local.modelfile import ModelFile

RSS_BOUND = 3 * 1024**3

BIG = {
    "vocab_size": 393216,
    "hidden_size": 2048,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_hidden_layers": 3,
    "intermediate_size": 1024,
    "moe_intermediate_size": 512,
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
}

_MEASURE = """
import json, resource, sys
from tide_local.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_rss_stays_under_bound(tmp_path):
    ckpt = make_checkpoint(tmp_path / "big", BIG, preset="tiny", seed=5, shard_size="1GB")
    total = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert total > RSS_BOUND, "the checkpoint must be larger than the bound"
    out = tmp_path / "big.gguf"
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, "convert", str(ckpt), "-o", str(out), "--type", "q8_0"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = report["maxrss_kib"] * 1024
    print(f"checkpoint {total / 1e9:.2f} GB, converter peak RSS {peak / 1e9:.3f} GB")
    assert peak < RSS_BOUND

    # and the result is right: spot-check rows at both ends of the largest tensors
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with ModelFile(out) as model:
        for gguf_name, hf_name in (("token_embd.weight", "model.word_embeddings.weight"), ("output.weight", "lm_head.weight")):
            info = model.tensor(gguf_name)
            assert T(info.ggml_type) == T.Q8_0
            data = model.gguf.tensor_data(gguf_name).reshape(info.n_rows, info.row_bytes)
            with safe_open(ckpt / index[hf_name], framework="pt") as f:
                src = f.get_slice(hf_name)
                for rows in (slice(0, 4), slice(info.n_rows - 4, info.n_rows)):
                    want = src[rows].float().numpy()
                    got = dequantize(np.ascontiguousarray(data[rows]), T.Q8_0).reshape(want.shape)
                    np.testing.assert_allclose(got, want, atol=0.02 * np.abs(want).max())
