"""Hostile model files: every class of file that once crashed libggml, ran with garbage or cost
memory before its refusal is refused up front with a TideError (GGUFError / CheckpointError), and
on the command line with exit code 2 and one line, before ggml sees anything.

The classes: a tensor type its op cannot take (matrix weights ggml cannot dot, norms that are not
F32), non-finite or out-of-range hyperparameters (in the GGUF and in config.json), counts the file
cannot hold (experts, layers, tensors, metadata keys: refused before memory is spent on them), and
metadata values of the wrong GGUF type.
"""

from __future__ import annotations

import ctypes
import json
import math
import shutil
import struct
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from gguf_copy import rewrite_gguf as rewrite
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, GGUFValueType as V

import tide_local
from tide_local import architecture, ggml
from tide_local.cli import main as tide
from tide_local.converters.convert import convert
from tide_local.converters.hf_checkpoint import HFCheckpoint
from tide_local.converters.testmodel import build_config, make_checkpoint
from tide_local.errors import BudgetError, CheckpointError, GGUFError
from tide_local.gguf import GGUFFile, GGUFStreamWriter
from tide_local.modelfile import ModelFile

QKV = "blk.1.attn_qkv.weight"  # a matrix of a MoE layer: ne (256, 512)
EXPERTS = "blk.1.ffn_gate_exps.weight"  # a stack for mul_mat_id: ne (256, 64, 16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=5)


@pytest.fixture(scope="module")
def model_path(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf"
    convert(checkpoint, path, "f16", progress=False)
    return path


def _one_line_error(capsys, verb: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tide {verb}: error:") and "\n" not in err, err
    assert "Traceback" not in err
    return err


def _refused_everywhere(path, capsys, match: str) -> None:
    """GGUFError from ModelFile and from tide_local.load, exit 2 and one line from `tide info` and
    `tide generate`."""
    with pytest.raises(GGUFError, match=match):
        ModelFile(path)
    with pytest.raises(GGUFError, match=match):
        tide_local.load(path, device="cpu", threads=1)
    capsys.readouterr()
    assert tide(["info", str(path)]) == 2
    _one_line_error(capsys, "info")
    assert tide(["generate", "-m", str(path), "-p", "hi", "--raw", "-n", "4", "--device", "cpu"]) == 2
    _one_line_error(capsys, "generate")


# -- tensor types against what their op accepts ---------------------------------------------------
def _cpu_type_traits():
    """ggml's CPU type traits (vec_dot, its vec_dot_type) via libggml-cpu, or None if unavailable."""
    lib_dir = ggml.lib().lib_dir
    names = [p for p in lib_dir.iterdir() if p.name.startswith("libggml-cpu.") or p.name == "ggml-cpu.dll"]
    if not names:
        return None
    cpu = ctypes.CDLL(str(names[0]))

    class Traits(ctypes.Structure):  # struct ggml_type_traits_cpu of the pinned ggml
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                    ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]

    fn = getattr(cpu, "ggml_get_type_traits_cpu", None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.POINTER(Traits), [ctypes.c_int]
    return lambda t: fn(t).contents


def test_matrix_types_are_those_ggml_cpu_can_dot():
    traits = _cpu_type_traits()
    if traits is None:
        pytest.skip("libggml-cpu's type traits are not reachable")
    base = ggml.lib().ggml_get_type_traits
    for t in T:
        if ggml.lib().ggml_blck_size(int(t)) == 0:
            continue  # a removed type
        tr = traits(int(t))
        can_dot = bool(tr.vec_dot) and bool(traits(tr.vec_dot_type).from_float)
        if int(t) in architecture.MATRIX_TYPES:
            assert can_dot, t.name
            assert t == T.F32 or base(int(t)).contents.to_float, t.name  # the embedding rows dequantize
        elif not can_dot:
            assert int(t) not in architecture.MATRIX_TYPES
    assert architecture.F32_TYPES == {int(T.F32)}


def test_a_forward_runs_on_allowed_quant_types(model_path, tmp_path):
    """IQ4_NL and Q4_1 (types `tide convert` never writes) pass validation and run: the logits
    are near those of the same weights dequantized to F32."""
    with GGUFFile(model_path) as g:
        matrices = [n for n, t in g.tensors.items() if len(t.ne) > 1 and "ffn_gate_inp" not in n]
    path = rewrite(model_path, tmp_path / "q.gguf", retype={n: (T.IQ4_NL if i % 2 else T.Q4_1)
                                                           for i, n in enumerate(matrices)})
    same = rewrite(path, tmp_path / "f32.gguf", retype={n: T.F32 for n in matrices})
    ids = [5, 17, 300, 41]
    with tide_local.load(same, device="cpu", threads=1) as eng:
        want = eng.logits(ids)
    with tide_local.load(path, device="cpu", threads=1) as eng:
        assert {eng.file.tensor(n).type_name for n in matrices} == {"IQ4_NL", "Q4_1"}
        got = eng.logits(ids)
    assert np.isfinite(got).all()
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    # close; not equal: ggml rounds the activations to 8 bits, which can flip a token's expert choice
    assert np.median(cos) > 0.99 and cos.min() > 0.8, cos


_REFUSED_MATRIX_TYPES = [t for t in T if int(t) not in architecture.MATRIX_TYPES
                         and T(t) in GGML_QUANT_SIZES and 256 % GGML_QUANT_SIZES[T(t)][0] == 0]


@pytest.mark.parametrize("ggml_type", _REFUSED_MATRIX_TYPES, ids=lambda t: t.name)
def test_matrix_of_a_type_ggml_cannot_dot_is_refused(model_path, tmp_path, ggml_type):
    # I8/I16/I32/I64/F64/Q8_1/Q8_K segfaulted in backend.compute (mul_mat and mul_mat_id)
    for name in (QKV, EXPERTS):
        path = rewrite(model_path, tmp_path / "t.gguf", retype={name: ggml_type})
        with pytest.raises(GGUFError, match=f"tensor {name} has type {ggml_type.name}, which the model cannot use"):
            ModelFile(path)


@pytest.mark.parametrize("name, ggml_type", [
    ("blk.1.attn_norm.weight", T.F16), ("blk.1.attn_norm.weight", T.BF16), ("blk.1.attn_norm.weight", T.Q8_0),
    ("blk.0.attn_q_norm.weight", T.F16), ("output_norm.weight", T.BF16), ("blk.1.ffn_gate_inp.weight", T.F16),
    ("blk.1.exp_probs_b.bias", T.F16), ("output.weight", T.I32), ("token_embd.weight", T.I8),
], ids=lambda v: getattr(v, "name", v))
def test_norms_router_and_bias_must_be_f32(model_path, tmp_path, capsys, name, ggml_type):
    # a F16/BF16/Q8_0 norm aborted in ggml (binary_op: unsupported types)
    path = rewrite(model_path, tmp_path / "n.gguf", retype={name: ggml_type})
    _refused_everywhere(path, capsys, f"tensor {name} has type {ggml_type.name}")


def test_refused_types_end_the_cli_with_code_2_not_a_signal(model_path, tmp_path):
    path = rewrite(model_path, tmp_path / "i8.gguf", retype={QKV: T.I8})
    out = subprocess.run([sys.executable, "-m", "tide_local", "generate", "-m", str(path), "-p", "hi", "--raw",
                          "-n", "4", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out
    err = out.stderr.strip()
    assert err.startswith("tide generate: error:") and "\n" not in err and "I8" in err


# -- hyperparameters: finite, in range, of the right type -------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("attention.layer_norm_rms_epsilon", float("nan")), ("attention.layer_norm_rms_epsilon", float("inf")),
    ("attention.layer_norm_rms_epsilon", -1e-6), ("attention.layer_norm_rms_epsilon", 0.0),
    ("rope.freq_base", float("nan")), ("rope.freq_base", float("inf")), ("rope.freq_base", 0.5),
    ("expert_weights_scale", float("nan")), ("expert_weights_scale", float("-inf")), ("expert_weights_scale", 0.0),
])
def test_non_finite_or_out_of_range_numbers(model_path, tmp_path, capsys, key, value):
    # NaN eps aborted at GGML_ASSERT(eps >= 0.0f); NaN/Inf theta and scale ran with garbage
    path = rewrite(model_path, tmp_path / "f.gguf", metadata={f"llada2.{key}": value})
    _refused_everywhere(path, capsys, f"llada2.{key} must be")


@pytest.mark.parametrize("key, value, expected", [
    ("llada2.block_count", ("4", V.STRING), "an integer"),
    ("llada2.block_count", (4.0, V.FLOAT32), "an integer"),
    ("llada2.expert_count", (True, V.BOOL), "an integer"),
    ("llada2.rope.freq_base", ([1.0, 2.0], None), "a number"),
    ("tokenizer.ggml.mask_token_id", ("x", V.STRING), "an integer"),
    ("tokenizer.ggml.eos_token_id", (2.5, V.FLOAT32), "an integer"),
    ("tide.block_length", ("32", V.STRING), "an integer"),
    ("tide.threshold", ("high", V.STRING), "a number"),
    ("tide.type_fallbacks", (7, V.UINT32), "an array of strings"),
    ("tide.output_type", ([1, 2], None), "a string"),
    ("tokenizer.ggml.tokens", ([1, 2, 3], None), "an array of strings"),
    ("tokenizer.chat_template", (3, V.UINT32), "a string"),
    ("general.architecture", (7, V.UINT32), "a string"),
])
def test_a_key_of_the_wrong_type_names_file_and_key(model_path, tmp_path, capsys, key, value, expected):
    # was: "invalid literal for int()" without the file or the key, or a crash later
    path = rewrite(model_path, tmp_path / "k.gguf", metadata={key: value})
    with pytest.raises(GGUFError) as err:
        ModelFile(path)
    assert str(path) in str(err.value) and key in str(err.value) and expected in str(err.value)
    assert tide(["info", str(path)]) == 2
    _one_line_error(capsys, "info")


def test_alignment_of_the_wrong_type(tmp_path):
    path = tmp_path / "a.gguf"
    with GGUFStreamWriter(path) as w:
        w.add("general.architecture", "llada2")
        w.add("general.alignment", "4096", V.STRING)
        w.begin_data()
        w.finish()
    with pytest.raises(GGUFError, match="general.alignment is the string '4096', expected an integer"):
        GGUFFile(path)


@pytest.mark.parametrize("key, value, match", [
    ("tide.block_length", 0, "tide.block_length = 0 must be in 1..4096"),
    ("tide.block_length", 1 << 40, "must be in 1..4096"),
    ("tide.steps", 0, "tide.steps = 0 must be"),
    ("tide.threshold", float("nan"), "tide.threshold = nan must be in"),
    ("tide.threshold", 1.5, "tide.threshold = 1.5 must be in"),
    ("tokenizer.ggml.mask_token_id", 10**9, "outside the vocabulary"),
])
def test_decoding_defaults_and_ids_in_range(model_path, tmp_path, capsys, key, value, match):
    path = rewrite(model_path, tmp_path / "d.gguf", metadata={key: value})
    _refused_everywhere(path, capsys, match)


def test_no_shared_expert_is_a_valid_model(model_path, tmp_path):
    """expert_shared_count = 0 (no shared expert tensors) opens and runs."""
    with GGUFFile(model_path) as g:
        shexp = {n for n in g.tensors if "_shexp." in n}
    assert shexp
    path = rewrite(model_path, tmp_path / "noshared.gguf", metadata={"llada2.expert_shared_count": 0}, drop=shexp)
    with tide_local.load(path, device="cpu", threads=1) as eng:
        assert eng.config.n_shared_experts == 0
        assert np.isfinite(eng.logits([1, 2, 3])).all()


def test_counts_the_hyperparameters_imply_match_the_tensor_list():
    for overrides in ({}, {"n_shared_experts": 0}, {"n_dense_layers": 0}, {"n_dense_layers": 4}):
        base = architecture.LLaDA2Config.from_hf(build_config("tiny"))
        cfg = architecture.LLaDA2Config(**{**base.__dict__, **overrides})
        specs = architecture.tensor_specs(cfg)
        assert cfg.n_tensors == len(specs)
        f32 = sum(math.prod(s.ne) for s in specs if s.always_f32)
        assert cfg.n_values() == (f32, sum(math.prod(s.ne) for s in specs) - f32)


# -- counts the file cannot hold: refused before memory is spent on them ----------------------------
def _peak_while(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("key, value", [("llada2.expert_count", 2_000_000), ("llada2.block_count", 50_000_000)])
def test_huge_counts_in_a_small_gguf_cost_nothing(model_path, tmp_path, capsys, key, value):
    # was: 2.1 GB of per-expert names before the shape check; 50M layers: MemoryError
    path = rewrite(model_path, tmp_path / "c.gguf", metadata={key: value})

    def open_it():
        with pytest.raises(GGUFError, match="need at least .* of tensors but the file is only"):
            ModelFile(path)

    assert _peak_while(open_it) < path.stat().st_size  # less than the file itself
    assert tide(["info", str(path)]) == 2
    _one_line_error(capsys, "info")


def test_more_tensors_than_the_model_has(model_path, tmp_path):
    path = rewrite(model_path, tmp_path / "x.gguf", extra=[("blk.0.extra.weight", (32,), T.F32)])
    with pytest.raises(GGUFError, match="has 55 tensors but a LLaDA2 model with its hyperparameters has 54"):
        ModelFile(path)


def _raw_gguf(path, metadata: dict, n_tensors: int, tmp_path) -> None:
    """A GGUF with `metadata` and `n_tensors` one-value F32 tensor infos ('t0000000', ...), all at
    offset 0: written fast, as raw bytes."""
    head = tmp_path / "head.gguf"
    with GGUFStreamWriter(head) as w:
        for k, v in metadata.items():
            w.add(k, v)
        size = w.header_size()
        w.begin_data()
        w.finish()
    raw = bytearray(head.read_bytes()[:size])
    struct.pack_into("<Q", raw, 8, n_tensors)
    info = np.zeros(n_tensors, dtype=[("len", "<u8"), ("name", "S8"), ("n_dims", "<u4"), ("ne", "<u8"),
                                      ("type", "<u4"), ("offset", "<u8")])
    info["len"], info["n_dims"], info["ne"], info["type"] = 8, 1, 1, int(T.F32)
    if n_tensors:
        info["name"] = np.char.add(b"t", np.char.zfill(np.arange(n_tensors).astype("S7"), 7))
    with open(path, "wb") as f:
        f.write(raw)
        f.write(info.tobytes())
        f.write(b"\0" * 64)


@pytest.mark.parametrize("arch", ["llama", "llada2"])
def test_a_million_tiny_tensors_are_refused_before_they_are_parsed(model_path, tmp_path, arch):
    # was: ~10x the file in memory to parse the tensor infos, before the architecture check
    with GGUFFile(model_path) as g:
        metadata = {k: v for k, v in g.metadata.items() if k != "general.alignment"}
    metadata["general.architecture"] = arch
    path = tmp_path / "many.gguf"
    _raw_gguf(path, metadata, 1_000_000, tmp_path)
    match = "architecture is 'llama'" if arch == "llama" else "has 1,000,000 tensors but"

    def open_it():
        with pytest.raises(GGUFError, match=match):
            ModelFile(path)

    assert _peak_while(open_it) < path.stat().st_size // 4


def test_a_hundred_thousand_metadata_keys_are_refused_up_front(tmp_path):
    path = tmp_path / "keys.gguf"
    _raw_gguf(path, {f"k{i:06d}": 1 for i in range(100_000)}, 0, tmp_path)

    def open_it():
        with pytest.raises(GGUFError, match="metadata count 100,000 is implausible"):
            GGUFFile(path)

    assert _peak_while(open_it) < path.stat().st_size // 4


def test_counts_that_cannot_fit_in_the_file(tmp_path):
    path = tmp_path / "arr.gguf"
    with GGUFStreamWriter(path) as w:
        w.add("general.architecture", "llada2")
        w.add("a", ["x", "y"])
        w.begin_data()
        w.finish()
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x01\x00\x00\x00\x00\x00\x00\x00a") + 9 + 4 + 4  # key 'a', ARRAY, item type STRING
    struct.pack_into("<Q", raw, at, 3_000_000)
    path.write_bytes(raw)
    with pytest.raises(GGUFError, match="string array item count 3,000,000 .* cannot fit"):
        GGUFFile(path)


def test_overlapping_tensors_are_refused(tmp_path):
    path = tmp_path / "o.gguf"
    with GGUFStreamWriter(path) as w:
        w.add("general.architecture", "x")
        w.add_tensor("a", (64,), T.F32)
        w.add_tensor("b", (64,), T.F32)
        w.begin_data()
        w.write("a", np.zeros(64, np.float32))
        w.write("b", np.zeros(64, np.float32))
        w.finish()
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\x01\x00\x00\x00\x00\x00\x00\x00b") + 9 + 4 + 8 + 4  # b's offset
    struct.pack_into("<Q", raw, at, 128)  # b starts inside a (a is 256 bytes at 0)
    raw += b"\0" * 256
    path.write_bytes(raw)
    with pytest.raises(GGUFError, match="tensor b overlaps tensor a"):
        GGUFFile(path)


# -- config.json in `tide convert` ----------------------------------------------------------------
def _with_config(checkpoint, tmp_path, **changes):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg))  # NaN / Infinity as Python's json writes them
    return ckpt


@pytest.mark.parametrize("changes, match", [
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
    ({"routed_scaling_factor": float("nan")}, "routed_scaling_factor must be a finite number"),
    ({"num_experts": "16"}, "num_experts is the string '16', expected an integer"),
    ({"num_hidden_layers": 4.5}, "num_hidden_layers is the number 4.5, expected an integer"),
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads must be positive"),
    ({"partial_rotary_factor": float("inf"), "rotary_dim": None}, "partial_rotary_factor must be in"),
    ({"num_shared_experts": -1}, "num_shared_experts must be at least 0"),
])
def test_bad_config_json_values(checkpoint, tmp_path, capsys, changes, match):
    ckpt = _with_config(checkpoint, tmp_path, **changes)
    with pytest.raises(CheckpointError, match=match):
        HFCheckpoint(ckpt)
    assert tide(["convert", str(ckpt), "-o", str(tmp_path / "out.gguf")]) == 2
    _one_line_error(capsys, "convert")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("key, value", [("num_experts", 2_000_000), ("num_hidden_layers", 50_000_000)])
def test_huge_counts_in_config_json_cost_nothing(checkpoint, tmp_path, key, value):
    ckpt = _with_config(checkpoint, tmp_path, **{key: value})

    def open_it():
        with pytest.raises(CheckpointError, match="need at least .* of weights but the checkpoint's"):
            HFCheckpoint(ckpt)

    assert _peak_while(open_it) < 16 << 20


# -- messages -------------------------------------------------------------------------------------
def test_a_resident_budget_below_a_gib_is_shown_in_mib(model_path):
    from tide_local.experts.memory import budget_for_slots

    with ModelFile(model_path) as m:
        budget = budget_for_slots(m, 1, 512)
    with pytest.raises(BudgetError) as err:
        tide_local.load(model_path, device="emulated", gpu_memory=budget, policy="resident", n_ctx=512, threads=2)
    message = str(err.value)  # was "it needs 0.04 GiB (the budget is 0.04 GiB)"
    assert "MiB" in message and "GiB" not in message, message


def test_every_arch_key_corrupted_is_refused(model_path, tmp_path):
    """A sweep of single-key corruptions (0, -1, NaN, a string) of every `llada2.` key: each one is
    refused with a GGUFError naming the file (0 is valid for the dense-layer and shared-expert
    counts, but then the file's tensors are not the model's)."""
    for key, _, _ in architecture._GGUF_KEYS:
        for value in (0, -1, float("nan"), "x"):
            path = rewrite(model_path, tmp_path / "s.gguf", metadata={f"llada2.{key}": value})
            with pytest.raises(GGUFError, match=str(path)):
                ModelFile(path).close()


@pytest.mark.parametrize("entry", [
    {"dtype": "BF16", "shape": [2**32, 2**32], "data_offsets": [0, 0]},  # int64 product wraps to 0
    {"dtype": "BF16", "shape": [4], "data_offsets": ["0", "8"]},
    {"dtype": ["BF16"], "shape": [4], "data_offsets": [0, 8]},
    {"dtype": "BF16", "shape": [2.5], "data_offsets": [0, 4]},
    {"dtype": "BF16", "shape": [4], "data_offsets": [8, 0]},
])
def test_hostile_safetensors_header_entries(checkpoint, tmp_path, entry):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    shard = ckpt / "model.safetensors"
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["hostile"] = entry
    text = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(CheckpointError, match="hostile"):
        HFCheckpoint(ckpt)


@pytest.mark.parametrize("command", [
    ["info", "{path}"], ["generate", "-m", "{path}", "-p", "hi", "-n", "4"], ["chat", "-m", "{path}"],
    ["plan", "-m", "{path}", "--expert-slots", "4"], ["profile", "-m", "{path}", "--repeat", "1"],
    ["bench", "{path}", "--no-llama-cpp"], ["serve", "-m", "{path}", "--port", "0"],
    ["convert", "{path}", "-o", "{out}"],
])
def test_a_hostile_file_is_one_line_in_every_command(model_path, tmp_path, capsys, command):
    path = rewrite(model_path, tmp_path / "i8.gguf", retype={QKV: T.I8})
    argv = [a.format(path=path, out=tmp_path / "out.gguf") for a in command]
    assert tide(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "I8" in err and "Traceback" not in err, err
    assert not (tmp_path / "out.gguf").exists()
