"""The converter: every type round-trips, experts sit at their byte ranges, bad input fails cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, GGUFReader
from gguf.quants import dequantize
from safetensors import safe_open

from tide_local.cli import main as tide
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.gguf import GGUFFile
from tide_local.architecture import tensor_specs
from tide_local.modelfile import ModelFile

# Relative RMS error allowed per stored type (random gaussian weights).
TOLERANCE = {
    T.F32: 0.0, T.BF16: 0.0, T.F16: 1e-3,
    T.Q8_0: 0.01, T.Q6_K: 0.03, T.Q5_K: 0.05, T.Q5_0: 0.06, T.Q5_1: 0.06, T.Q4_K: 0.10, T.Q4_0: 0.12,
}
ALL_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # small shards so the sharded layout with an index is what gets converted
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=1, shard_size="3MB")


@pytest.fixture(scope="module")
def sources(checkpoint):
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(checkpoint / shard, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).float().numpy()
    return out


def _source_array(spec, sources) -> np.ndarray:
    """The HF tensor(s) of a spec in GGUF numpy order (experts stacked on axis 0)."""
    arrays = [sources[n] for n in spec.hf_names]
    return np.stack(arrays) if spec.is_expert_stack else arrays[0]


def _rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b**2)) + 1e-12))


@pytest.mark.parametrize("output_type", ALL_TYPES)
def test_every_type_round_trips(checkpoint, sources, tmp_path, output_type):
    out = tmp_path / f"tiny-{output_type}.gguf"
    convert(checkpoint, out, output_type, progress=False)
    with ModelFile(out) as model:
        g = model.gguf
        assert g.get("tide.output_type") == output_type
        seen_types = set()
        for spec in tensor_specs(model.config):
            info = g.tensors[spec.name]
            qtype = T(info.ggml_type)
            seen_types.add(qtype)
            got = dequantize(g.tensor_data(spec.name), qtype).reshape(info.shape)
            want = _source_array(spec, sources)
            if spec.always_f32:
                assert qtype == T.F32
            if TOLERANCE[qtype] == 0.0:
                np.testing.assert_array_equal(got, want, err_msg=spec.name)
            else:
                err = _rel_rms(got, want)
                assert err <= TOLERANCE[qtype], f"{spec.name} {qtype.name}: {err:.4f}"
        if output_type not in ("f32", "f16", "bf16"):
            assert len(seen_types) > 1  # matrices quantized, norms f32


def test_mixes_raise_precision_where_llama_cpp_does(checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    convert(checkpoint, out, "q4_k_m", progress=False)
    with GGUFFile(out) as g:
        types = {n: T(t.ggml_type) for n, t in g.tensors.items()}
        assert types["output.weight"] == T.Q6_K
        assert types["blk.1.attn_qkv.weight"] == T.Q5_K
        assert types["blk.1.attn_output.weight"] == T.Q4_K
        # the expert down projection has rows of 64: it falls back, and the file says so
        assert types["blk.1.ffn_down_exps.weight"] == T.Q5_0
        notes = g.get("tide.type_fallbacks")
        assert any(n.startswith("blk.1.ffn_down_exps.weight: Q4_K -> Q5_0") for n in notes)


def test_expert_slices_at_their_byte_ranges(checkpoint, sources, tmp_path):
    out = tmp_path / "e.gguf"
    convert(checkpoint, out, "q8_0", progress=False)
    with ModelFile(out) as model:
        cfg = model.config
        slice_meta = model.gguf.get("tide.expert_slice_bytes.gate")
        for layer in cfg.moe_layers:
            for proj in ("gate", "up", "down"):
                layout = model.experts(layer, proj)
                assert int(model.gguf.get(f"tide.expert_slice_bytes.{proj}")[layer]) == layout.slice_bytes
                qtype = T(layout.tensor.ggml_type)
                for e in (0, 5, cfg.n_experts - 1):
                    start = layout.slice_offset(e)
                    raw = np.frombuffer(model.gguf._mmap, np.uint8, layout.slice_bytes, start)
                    want = sources[f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight"]
                    got = dequantize(raw, qtype).reshape(want.shape)
                    assert _rel_rms(got, want) <= TOLERANCE[qtype]
                    if layout.slice_bytes % 4096 == 0:
                        assert start % 4096 == 0
        assert list(slice_meta[: cfg.n_dense_layers]) == [0] * cfg.n_dense_layers


def test_metadata_and_tokenizer(checkpoint, tmp_path):
    out = tmp_path / "t.gguf"
    convert(checkpoint, out, "bf16", progress=False)
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    by_content = {t["content"]: t["id"] for t in tok["added_tokens"]}
    with GGUFFile(out) as g:
        md = g.metadata
        assert md["general.architecture"] == "llada2"
        assert md["llada2.expert_gating_func"] == 2 and md["llada2.attention.causal"] is False
        assert md["tokenizer.ggml.mask_token_id"] == by_content["<|mask|>"]
        assert md["tokenizer.ggml.eos_token_id"] == by_content["<|endoftext|>"]
        assert md["tokenizer.ggml.eot_token_id"] == by_content["<|role_end|>"]
        assert md["tokenizer.ggml.bos_token_id"] == by_content["<|startoftext|>"]
        assert md["tokenizer.huggingface.json"] == (checkpoint / "tokenizer.json").read_text()
        cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
        assert md["tokenizer.chat_template"] == cfg["chat_template"]
        vocab = md["llada2.vocab_size"]
        assert len(md["tokenizer.ggml.tokens"]) == vocab == len(md["tokenizer.ggml.token_type"])
        assert md["tokenizer.ggml.tokens"][-1].startswith("[PAD")
    # the gguf package (llama.cpp's own reader) reads our file
    reader = GGUFReader(out)
    assert len(reader.tensors) == len(tensor_specs(ModelFile(out).config))


def test_info_shows_the_model(checkpoint, tmp_path, capsys):
    out = tmp_path / "i.gguf"
    convert(checkpoint, out, "q4_k_m", progress=False)
    assert tide(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llada2" in text and "bytes per expert slice" in text and "fallback" in text and "mask" in text
    assert tide(["info", str(out), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["n_experts"] == 16 and d["expert_bytes"] > 0


def test_dry_run_writes_nothing(checkpoint, tmp_path, capsys):
    out = tmp_path / "dry.gguf"
    assert tide(["convert", str(checkpoint), "-o", str(out), "--type", "q4_k", "--dry-run"]) == 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    text = capsys.readouterr().out
    assert "Q4_K" in text and "output" in text


def test_failure_midway_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    from tide_local.converters import convert as convert_module

    calls = {"n": 0}
    real = convert_module.encode_rows

    def failing(rows, ggml_type):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk on fire")
        return real(rows, ggml_type)

    monkeypatch.setattr(convert_module, "encode_rows", failing)
    with pytest.raises(OSError):
        convert(checkpoint, tmp_path / "x.gguf", "q8_0", progress=False, threads=1)
    assert list(tmp_path.iterdir()) == []


# -- bad input: one line, exit code 2, no traceback -------------------------------------------------


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(checkpoint, dst)
    return dst


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _run_bad(args, capsys) -> str:
    assert tide(["convert", *map(str, args)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_bad_not_a_directory(tmp_path, capsys):
    err = _run_bad([tmp_path / "nope", "-o", tmp_path / "o.gguf"], capsys)
    assert "not a directory" in err


def test_bad_no_config(tmp_path, capsys):
    err = _run_bad([tmp_path, "-o", tmp_path / "o.gguf"], capsys)
    assert "no config.json" in err


def test_bad_model_type(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    _edit_json(ckpt / "config.json", model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    err = _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert "qwen3_moe" in err and "config.json" in err


def test_bad_block_routing(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    _edit_json(ckpt / "config.json", expert_capacity=48)
    assert "LLaDA2.2" in _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)


def _rewrite_shard_header(shard: Path, edit):
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (n - len(new))
    assert len(new) == n
    shard.write_bytes(raw[:8] + new + raw[8 + n:])


def _shard_of(ckpt: Path, tensor: str) -> Path:
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][tensor]


def test_bad_missing_tensor(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    name = "model.layers.2.mlp.experts.3.up_proj.weight"
    shard = _shard_of(ckpt, name)
    _rewrite_shard_header(shard, lambda h: h.__setitem__(name.replace("up_proj", "upx_proj"), h.pop(name)))
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][name.replace("up_proj", "upx_proj")] = data["weight_map"].pop(name)
    index.write_text(json.dumps(data))
    err = _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert name in err and "missing" in err


def test_bad_tensor_in_two_shards(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    first = _shard_of(ckpt, "lm_head.weight")
    other = next(name for name, shard in index.items() if ckpt / shard != first and name.endswith(".weight"))
    _rewrite_shard_header(_shard_of(ckpt, other), lambda h: h.__setitem__("lm_head.weight", h.pop(other)))
    err = _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert "lm_head.weight" in err and "two shards" in err and "missing" not in err


def test_bad_shape(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    name = "model.layers.1.attention.dense.weight"

    def transpose(h):
        h[name]["shape"] = list(reversed(h[name]["shape"])) if len(set(h[name]["shape"])) > 1 else [h[name]["shape"][0] // 2, h[name]["shape"][1] * 2]

    _rewrite_shard_header(_shard_of(ckpt, name), transpose)
    err = _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert name in err and "shape" in err


def test_bad_missing_shard(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    shard = _shard_of(ckpt, "lm_head.weight")
    shard.unlink()
    err = _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert shard.name in err and "missing" in err


def test_bad_truncated_shard(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    shard = _shard_of(ckpt, "lm_head.weight")
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    err = _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)
    assert shard.name in err and "truncated" in err


def test_bad_no_tokenizer(checkpoint, tmp_path, capsys):
    ckpt = _copy(checkpoint, tmp_path)
    (ckpt / "tokenizer.json").unlink()
    assert "tokenizer.json" in _run_bad([ckpt, "-o", tmp_path / "o.gguf"], capsys)


def test_bad_output_not_writable(checkpoint, tmp_path, capsys):
    # /proc accepts no new files, even for root
    err = _run_bad([checkpoint, "-o", "/proc/tide-test.gguf"], capsys)
    assert "/proc" in err and ("not writable" in err or "cannot write" in err)
    assert not list(Path("/proc").glob(".tide-test*"))


def test_bad_output_path(checkpoint, tmp_path, capsys):
    assert "does not exist" in _run_bad([checkpoint, "-o", tmp_path / "no" / "dir" / "o.gguf"], capsys)
    assert "is a directory" in _run_bad([checkpoint, "-o", tmp_path], capsys)


def test_cli_error_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tide_local", "convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o.gguf")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("tide convert: error:") and "Traceback" not in proc.stderr


def test_help_teaches():
    proc = subprocess.run([sys.executable, "-m", "tide_local", "convert", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "q4_k_m" in proc.stdout and "--dry-run" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "tide_local", "info", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "expert slice" in proc.stdout
