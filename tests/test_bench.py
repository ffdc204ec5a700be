"""`tide bench`: the bandwidth probe, the bailingmoe2 copy for llama.cpp, llama.cpp itself on
our weights (its logits against our engine's), the weight bytes a forward reads, the CLI.

Every model here is the tiny preset; ggml and llama.cpp run with one thread."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

import tide_local
from tide_local import cli
from tide_local.bench.bandwidth import read_bandwidth
from tide_local.bench.llamacpp import (LlamaCppError, LlamaCppProcess, LlamaCppRunner, view_path,
                                       write_bailingmoe2_copy)
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.engine import CachedBlockModel
from tide_local.gguf import GGUFFile
from tide_local.modelfile import ModelFile


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = make_checkpoint(root / "hf", preset="tiny", seed=3)
    out = {}
    for t in ("f32", "q8_0"):
        out[t] = root / f"tiny-{t}.gguf"
        convert(ckpt, out[t], t, progress=False, log=io.StringIO())
    return out


@pytest.fixture(scope="module")
def copy_f32(models):
    return write_bailingmoe2_copy(models["f32"], view_path(models["f32"]), progress=False)


def test_read_bandwidth_is_a_rate():
    buf = np.ones(1 << 20, np.float32)
    bw = read_bandwidth(2, buffer=buf, repeats=2)
    assert 1e6 < bw < 1e13  # bytes per second, not seconds
    with pytest.raises(ValueError):
        read_bandwidth(0, buffer=buf)


def test_copy_renames_keys_and_keeps_every_tensor_byte(models, copy_f32):
    src, dst = GGUFFile(models["f32"]), GGUFFile(copy_f32)
    try:
        assert copy_f32.name == "tiny-f32.bailingmoe2.gguf"
        assert dst.metadata["general.architecture"] == "bailingmoe2"
        assert not any(k.startswith(("llada2.", "tide.")) for k in dst.metadata)
        for key, value in src.metadata.items():
            if key.startswith("llada2."):
                renamed = "bailingmoe2." + key[len("llada2."):]
                assert dst.metadata[renamed] == value
                assert dst.value_types[renamed] == src.value_types[key]  # llama.cpp checks types
        assert dst.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
        assert list(dst.tensors) == list(src.tensors)
        for name, t in src.tensors.items():
            assert dst.tensors[name].ne == t.ne and dst.tensors[name].ggml_type == t.ggml_type
            assert np.array_equal(dst.tensor_data(name), src.tensor_data(name)), name
    finally:
        src.close()
        dst.close()
    mtime = copy_f32.stat().st_mtime_ns
    write_bailingmoe2_copy(models["f32"], copy_f32, progress=False)  # up to date: reused
    assert copy_f32.stat().st_mtime_ns == mtime


def test_copy_refuses_a_file_that_is_not_llada2(copy_f32, tmp_path):
    out = tmp_path / "x.gguf"
    with pytest.raises(LlamaCppError, match="not a LLaDA2 GGUF"):
        write_bailingmoe2_copy(copy_f32, out, progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_llama_cpp_computes_our_logits_on_the_copy(models, copy_f32):
    """The copy keeps `attention.causal = false`, so llama.cpp's bailingmoe2 graph is our
    forward: a batch attends to the cache and to itself both ways, with the same routing
    (sigmoid, groups, bias, scale). An independent implementation agreeing with the engine,
    on a first block and on a block over a cached one (our KV-cache path)."""
    ids = np.random.default_rng(0).integers(0, 600, 64).astype(np.int32)
    rows = np.arange(32)
    with tide_local.load(models["f32"], device="cpu", threads=1) as eng:
        first = eng.logits(ids[:32])
        cached = CachedBlockModel(eng.model, 32)
        cached.prefill(ids[:32])
        second = cached.block_logits(ids[32:], 32, rows)
    with LlamaCppRunner(copy_f32, threads=1, n_ctx=256, f32_attention=True) as runner:
        runner.prefill(ids[:0])
        runner.time_batch(ids[:32])
        theirs_first = runner.logits(32)
        runner.prefill(ids[:32])
        runner.time_batch(ids[32:])
        theirs_second = runner.logits(32)
    for ours, theirs in ((first, theirs_first), (second, theirs_second)):
        assert np.abs(ours - theirs).max() < 1e-5 * np.abs(ours).max()  # measured: 1.2e-6 on 4.7
        assert np.array_equal(ours.argmax(-1), theirs.argmax(-1))
    assert np.abs(first - second).max() > 0.1  # the two blocks really differ


def test_llama_cpp_process_times_batches_and_reports_failures(copy_f32, tmp_path):
    with LlamaCppProcess(copy_f32, threads=1, n_ctx=128) as proc:
        proc.prefill(np.arange(32))
        proc.set_threads(1)
        assert 0 < proc.time_batch(np.arange(32)) < 60
        with pytest.raises(LlamaCppError, match="exceed the context"):
            proc.prefill(np.arange(160))
    with LlamaCppRunner(copy_f32, threads=1, n_ctx=2048) as runner:
        with pytest.raises(LlamaCppError, match="exceed the batch"):
            runner.time_batch(np.zeros(600, np.int32))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(LlamaCppError, match="could not load"):
        LlamaCppProcess(bad, threads=1, n_ctx=128)


def test_bytes_read_per_forward(models):
    with ModelFile(models["q8_0"]) as f:
        cfg = f.config
        embd = f.tensor("token_embd.weight").nbytes
        none = f.bytes_read_per_forward({})
        assert none == f.non_expert_bytes() - embd
        every = f.bytes_read_per_forward({layer: cfg.n_experts for layer in cfg.moe_layers})
        assert every == sum(t.nbytes for t in f.gguf.tensors.values()) - embd
        one = f.bytes_read_per_forward({cfg.moe_layers[0]: 1})
        assert one - none == f.one_expert_bytes(cfg.moe_layers[0]) > 0


def bench(capsys, *args):
    """`tide bench ARGS` in-process: (exit code, stdout, stderr); argparse's exits included."""
    try:
        rc = cli.main(["bench", *args])
    except SystemExit as exit_:
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_tide_bench_reports_a_row_per_context_and_thread_count(models, capsys, tmp_path):
    out_json = tmp_path / "b.json"
    rc, out, err = bench(capsys, str(models["q8_0"]), "--context", "64,96", "--threads", "1", "--repeats", "2",
                         "--generate", "8", "--llama-cpp-copy", str(tmp_path / "copy.gguf"), "--json", str(out_json))
    assert rc == 0, err
    steps = [line for line in out.splitlines() if line.startswith(("| 64 | 1 | **", "| 96 | 1 | **"))]
    assert len(steps) == 2
    assert "| prompt (tokens) |" in out
    assert "llama.cpp ms" in out and "tokens/s" in out and "peak RSS" in out
    report = json.loads(out_json.read_text())
    for row in report["rows"]:
        assert row["ms_per_step"] > 0 and row["llama_cpp_ms"] > 0
        assert row["x_floor"] == pytest.approx(row["ms_per_step"] / row["floor_ms"])
        assert 0 < row["distinct_experts_per_layer"] <= 16
        assert row["ops_ms"]["routed_experts"] > 0 and row["ops_ms"]["lm_head"] > 0
        assert row["x_kernels"] == pytest.approx(row["ms_per_step"] / row["kernels_ms"])
    assert report["generate"]["tokens"] == 8
    assert [p["context"] for p in report["prefill"]] == [64, 96]
    assert all(p["seconds"] > 0 and p["llama_cpp_seconds"] > 0 for p in report["prefill"])


@pytest.mark.parametrize("args,message", [
    (["--context", "0"], "--context must be >= 1"),
    (["--threads", "two"], "--threads must be comma-separated integers"),
    (["--context", "999999"], "leaves no room"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--json", "/nonexistent-dir/b.json"], "--json: cannot write to /nonexistent-dir"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--batch", "65"], "--batch must be at most 64"),
])
def test_tide_bench_mistakes_are_one_line(models, capsys, args, message):
    rc, out, err = bench(capsys, str(models["q8_0"]), "--no-llama-cpp", *args)
    assert rc == 2
    assert message in err and "Traceback" not in err


def test_tide_bench_on_a_missing_file_is_one_line(capsys, tmp_path):
    rc, out, err = bench(capsys, str(tmp_path / "nope.gguf"))
    assert rc != 0 and "no such file" in err and len(err.strip().splitlines()) == 1


def test_tide_bench_demo(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("TIDE_CACHE_DIR", str(tmp_path / "cache"))
    rc, out, err = bench(capsys, "--demo", "--no-llama-cpp", "--context", "64", "--threads", "1", "--repeats", "1",
                         "--generate", "8", "--batch", "2,3")
    assert rc == 0, err
    assert "demo-llada2-q8_0.gguf" in err and "| 64 | 1 | **" in out
    batched = [line for line in out.splitlines() if line.startswith(("| 1 | ", "| 2 | ", "| 3 | ")) and "×" in line]
    assert len(batched) == 3 and all(line.endswith("| yes |") for line in batched)  # q8_0: the same tokens
    rc, _, err = bench(capsys, "--no-llama-cpp")
    assert rc == 2 and "give MODEL.gguf or --demo" in err
