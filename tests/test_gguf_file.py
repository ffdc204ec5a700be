"""The GGUF reader and `ModelFile` refuse malformed, truncated and foreign files cleanly."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
from gguf_copy import rewrite_gguf

from tide_local.cli import main as tide
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.errors import GGUFError
from tide_local.gguf import GGUFFile
from tide_local.modelfile import ModelFile


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    base = tmp_path_factory.mktemp("gguf")
    ckpt = make_checkpoint(base / "hf", preset="tiny", seed=3)
    return convert(ckpt, base / "tiny.gguf", "f16", progress=False) and base / "tiny.gguf"


def test_valid_file_opens(model_path):
    with ModelFile(model_path) as m:
        assert m.config.n_experts == 16
        assert m.special_ids["mask"] != m.special_ids["eos"]
        emb = m.gguf.tensor_array("token_embd.weight")
        assert emb.shape == (m.config.vocab_size, m.config.hidden_size) and emb.dtype == np.float16


def test_wrong_architecture(model_path, tmp_path):
    bad = rewrite_gguf(model_path, tmp_path / "a.gguf", metadata={"general.architecture": "llama"})
    with pytest.raises(GGUFError, match="architecture is 'llama'"):
        ModelFile(bad)


def test_missing_tensor(model_path, tmp_path):
    bad = rewrite_gguf(model_path, tmp_path / "m.gguf", drop={"blk.2.ffn_up_exps.weight"})
    with pytest.raises(GGUFError, match="blk.2.ffn_up_exps.weight is missing"):
        ModelFile(bad)


def test_missing_key(model_path, tmp_path):
    bad = rewrite_gguf(model_path, tmp_path / "k.gguf", metadata={"llada2.expert_count": None})
    with pytest.raises(GGUFError, match="llada2.expert_count"):
        ModelFile(bad)


def test_truncated(model_path, tmp_path):
    bad = tmp_path / "t.gguf"
    shutil.copy(model_path, bad)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size - 1000)
    with pytest.raises(GGUFError, match="truncated"):
        GGUFFile(bad)


def test_not_gguf(tmp_path):
    bad = tmp_path / "n.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="bad magic"):
        GGUFFile(bad)
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "absent.gguf")


def test_header_corruption_never_escapes_as_another_error(model_path, tmp_path):
    path = tmp_path / "c.gguf"
    shutil.copy(model_path, path)
    with GGUFFile(model_path) as g:
        header_end = g.data_offset
    rng = random.Random(0)
    outcomes = {"ok": 0, "refused": 0}
    with open(path, "r+b") as f:
        for _ in range(150):
            spots = [rng.randrange(4, header_end) for _ in range(rng.randint(1, 3))]
            saved = []
            for pos in spots:
                f.seek(pos)
                saved.append(f.read(1))
                f.seek(pos)
                f.write(bytes([rng.randrange(256)]))
            f.flush()
            try:
                ModelFile(path).close()
                outcomes["ok"] += 1
            except GGUFError:
                outcomes["refused"] += 1
            for pos, byte in zip(reversed(spots), reversed(saved)):
                f.seek(pos)
                f.write(byte)
    assert outcomes["refused"] > 0


def test_info_cli_errors_are_one_line(model_path, tmp_path, capsys):
    bad = tmp_path / "t.gguf"
    shutil.copy(model_path, bad)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    assert tide(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tide info: error:") and "\n" not in err
