"""`tide pull`: the hub cache's layout (as huggingface_hub writes it) read offline, then converted.
Nothing here touches the network: HF_HUB_OFFLINE=1 is the library's own offline mode."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tide_local.cli import main as tide
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.gguf import GGUFFile

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def pull(args, hf_home, cwd):
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "tide_local", "pull", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("src") / "hf", preset="tiny", seed=31)


@pytest.fixture
def hub(source, tmp_path_factory):
    """A hub cache holding owner/tiny-llada2 at main, laid out as huggingface_hub does."""
    root, hf = tmp_path_factory.mktemp("hf-home"), source
    repo = root / "hub" / "models--owner--tiny-llada2"
    shutil.copytree(hf, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root, hf


def test_pull_converts_the_cached_checkpoint(hub, tmp_path):
    root, hf = hub
    out = pull(["owner/tiny-llada2", "--type", "q8_0"], root, tmp_path)
    assert out.returncode == 0, out.stderr
    made = tmp_path / "tiny-llada2-q8_0.gguf"
    direct = tmp_path / "direct.gguf"
    convert(hf, direct, "q8_0", progress=False)
    with GGUFFile(made) as a, GGUFFile(direct) as b:
        assert {n: bytes(a.tensor_data(n)) for n in a.tensors} == {n: bytes(b.tensor_data(n)) for n in b.tensors}
    assert "tide chat -m" in out.stderr


def test_a_model_not_in_the_cache_offline_is_one_line(hub, tmp_path):
    out = pull(["owner/other-model"], hub[0], tmp_path)
    assert out.returncode == 2
    err = out.stderr.strip().splitlines()
    assert "cannot be downloaded now" in err[-1] and "Traceback" not in out.stderr
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("args, message", [
    (["not-a-repo-id"], "is not a Hugging Face model id"),
    (["owner/name", "-o", "/"], "is a directory"),
    (["owner/name", "--threads", "0"], "--threads must be between 1"),
    (["owner/name:weights.bin"], "after the colon comes a .gguf file"),
])
def test_mistakes_are_one_line_before_any_download(capsys, args, message):
    assert tide(["pull", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_weights_are_dropped_from_the_cache_unless_keep(hub, tmp_path_factory):
    home, hf = hub
    snapshot = home / "hub" / "models--owner--tiny-llada2" / "snapshots" / COMMIT
    work = tmp_path_factory.mktemp("work")
    assert pull(["owner/tiny-llada2", "--keep", "-o", "a.gguf"], home, work).returncode == 0
    assert list(snapshot.glob("*.safetensors"))
    out = pull(["owner/tiny-llada2", "-o", "b.gguf"], home, work)
    assert out.returncode == 0 and "deleted" in out.stderr
    assert not list(snapshot.glob("*.safetensors")) and (snapshot / "config.json").is_file()
    assert (work / "a.gguf").read_bytes() == (work / "b.gguf").read_bytes()


def test_a_gguf_in_the_repository_comes_as_it_is(hub, tmp_path):
    root, hf = hub
    snapshot = root / "hub" / "models--owner--tiny-llada2" / "snapshots" / COMMIT
    convert(hf, snapshot / "tiny-Q8_0.gguf", "q8_0", progress=False)
    out = pull(["owner/tiny-llada2:tiny-Q8_0.gguf", "-o", "mine.gguf"], root, tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "mine.gguf").read_bytes() == (snapshot / "tiny-Q8_0.gguf").read_bytes()


def test_the_disk_check_names_what_is_missing(tmp_path):
    from tide_local.errors import TideError
    from tide_local.pull_cli import check_disk

    check_disk(tmp_path / "not" / "yet", 1, "a file")  # the nearest existing folder is asked
    with pytest.raises(TideError, match="the model needs .* but .* free"):
        check_disk(tmp_path, 1 << 62, "the model")
