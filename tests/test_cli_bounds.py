"""Every numeric option is bounded and every output path is checked before any work: a bad
value is one line (exit code 2) naming the flag, before a model is opened or measured."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tide_local.cli import main as tide
from tide_local.generate_cli import max_threads

TOO_MANY = str(max_threads() + 1)
MODEL = "/nonexistent/model.gguf"  # never opened: the options are refused first


@pytest.mark.parametrize("argv,words", [
    (["generate", "-m", MODEL, "-p", "x", "--threads", TOO_MANY], "--threads must be between 1 and"),
    (["generate", "-m", MODEL, "-p", "x", "--threads", "0"], "--threads must be between 1 and"),
    (["generate", "-m", MODEL, "-p", "x", "--ctx", str(10 ** 12)], "--ctx must be between 32 and"),
    (["generate", "-m", MODEL, "-p", "x", "--tau", str(10 ** 9)], "--tau must be an integer between 1 and"),
    (["generate", "-m", MODEL, "-p", "x", "--tau", "²"], "--tau must be an integer"),
    (["generate", "-m", MODEL, "-p", "x", "--trace", "/nonexistent/t.json"], "--trace"),
    (["generate", "-m", MODEL, "-p", "x", "--trace", "/"], "is a directory"),
    (["chat", "-m", MODEL, "--threads", TOO_MANY], "--threads must be between 1 and"),
    (["chat", "-m", MODEL, "--ctx", "1"], "--ctx must be between 32 and"),
    (["info", MODEL, "--ctx", str(10 ** 12)], "--ctx must be between 32 and"),
    (["info", MODEL, "--ctx", "0"], "--ctx must be between 32 and"),
    (["info", MODEL, "--gpu-memory", "1e999GiB"], "--gpu-memory"),
    (["bench", MODEL, "--repeats", str(10 ** 9)], "--repeats must be at most"),
    (["bench", MODEL, "--json", "/dev/null"], "not a regular file"),
    (["profile", "-m", MODEL, "--repeat", str(10 ** 9)], "--repeat must be between 1 and"),
    (["profile", "-m", MODEL, "--threads", TOO_MANY], "--threads must be between 1 and"),
    (["profile", "-m", MODEL, "--ctx", str(10 ** 12)], "--ctx must be between 64 and"),
    (["profile", "-m", MODEL, "-o", "/dev/null"], "not a regular file"),
    (["profile", "-m", MODEL, "-o", "/"], "is a directory"),
    (["plan", "-m", MODEL, "--expert-slots", "4", "--ctx", str(10 ** 12)], "--ctx must be between 32 and"),
    (["plan", "-m", MODEL, "--expert-slots", "4", "--threads", TOO_MANY], "--threads must be between 1 and"),
    (["plan", "-m", MODEL, "--expert-slots", "4", "--taus", "1,2," + str(10 ** 9)], "--taus must be between 1 and"),
    (["plan", "-m", MODEL, "--expert-slots", "4", "--taus", ",".join(map(str, range(1, 100)))], "at most 64"),
    (["convert", "/nonexistent", "-o", "/tmp/x.gguf", "--threads", TOO_MANY], "--threads must be between 1 and"),
    (["convert", "/"], "give the output file with -o"),
])
def test_bad_numbers_and_paths_are_one_line(argv, words, capsys):
    assert tide(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err and words in err, err


def test_bench_lists_are_bounded(capsys):
    for argv, words in [(["--threads", TOO_MANY], "--threads must be at most"),
                        (["--context", ",".join(map(str, range(1, 40)))], "at most 16 values")]:
        with pytest.raises(SystemExit) as stop:
            tide(["bench", MODEL, *argv])
        assert stop.value.code == 2 and words in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tide_local.converters.testmodel import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", preset="tiny", seed=4)


def test_a_full_stdout_is_one_line(checkpoint):
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "tide_local", "convert", str(checkpoint), "--dry-run", "-v"],
                              stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "tide convert: error: cannot write: No space left on device\n", proc.stderr


def test_a_closed_pipe_is_quiet(checkpoint):
    proc = subprocess.Popen([sys.executable, "-m", "tide_local", "convert", str(checkpoint), "--dry-run", "-v"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read()
    proc.wait(timeout=60)
    assert proc.returncode == 141 and err == "", err
