"""`tide convert IN.gguf`: re-layout, type changes from unquantized weights, and the requantize rule."""

from __future__ import annotations

import numpy as np
import pytest

import tide_local
from tide_local.cli import main as tide
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.gguf import GGUFFile
from tide_local.modelfile import ModelFile

from test_llamacpp_gguf import llamacpp_style

PROMPT = [5, 17, 99, 3, 250, 7, 41, 12, 600, 2, 8]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-source")
    hf = make_checkpoint(folder / "hf", preset="tiny", seed=23)
    out = {}
    for kind in ("bf16", "q8_0"):
        out[kind] = folder / f"direct-{kind}.gguf"
        convert(hf, out[kind], kind, progress=False)
    out["llamacpp"] = llamacpp_style(out["q8_0"], folder / "llamacpp-q8_0.gguf")
    return out


def tensors(path) -> dict[str, bytes]:
    with GGUFFile(path) as g:
        return {name: (t.ggml_type, bytes(g.tensor_data(name))) for name, t in g.tensors.items()}


def test_from_bf16_makes_what_the_checkpoint_makes(files, tmp_path):
    out = tmp_path / "from-bf16-q8_0.gguf"
    convert(files["bf16"], out, "q8_0", progress=False)
    assert tensors(out) == tensors(files["q8_0"])


def test_a_llamacpp_file_is_laid_out_again_with_its_bytes(files, tmp_path):
    out = tmp_path / "relaid.gguf"
    assert tide(["convert", str(files["llamacpp"]), "-o", str(out)]) == 0  # --type: the file's own (q8_0)
    assert tensors(out) == tensors(files["llamacpp"])
    with ModelFile(files["llamacpp"]) as before, ModelFile(out) as after:
        assert not before.expert_stacks_page_aligned() and not before.has_tide_keys
        assert after.expert_stacks_page_aligned() and after.has_tide_keys
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template"):
            assert after.gguf.get(key) == before.gguf.get(key)
    with tide_local.load(files["q8_0"], device="cpu", threads=1) as a, tide_local.load(out, device="cpu", threads=1) as b:
        assert np.array_equal(np.asarray(a.logits(PROMPT)), np.asarray(b.logits(PROMPT)))


def test_quantized_to_another_type_needs_allow_requantize(files, tmp_path, capsys):
    out = tmp_path / "q4.gguf"
    assert tide(["convert", str(files["q8_0"]), "-o", str(out), "--type", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow-requantize" in err and err.count("\n") == 0 and not out.exists()
    assert tide(["convert", str(files["q8_0"]), "-o", str(out), "--type", "q4_k", "--allow-requantize"]) == 0
    with ModelFile(out) as m:
        assert m.gguf.get("tide.output_type") == "q4_k"
    with tide_local.load(out, device="cpu", threads=1) as eng:
        assert np.isfinite(np.asarray(eng.logits(PROMPT))).all()


def test_the_output_cannot_be_the_input(files, tmp_path, capsys):
    copy = tmp_path / "same.gguf"
    copy.write_bytes(files["q8_0"].read_bytes())
    assert tide(["convert", str(copy), "-o", str(copy)]) == 2
    assert "is the file being converted" in capsys.readouterr().err
    assert tensors(copy) == tensors(files["q8_0"])


def test_default_output_name_beside_a_gguf(files, tmp_path):
    src = tmp_path / "model.gguf"
    src.write_bytes(files["bf16"].read_bytes())
    assert tide(["convert", str(src), "--type", "q8_0"]) == 0
    assert (tmp_path / "model-q8_0.gguf").is_file()
