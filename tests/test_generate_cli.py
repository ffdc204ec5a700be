"""`tide generate` and the demo model, run in-process through the `tide` dispatcher.

Generation runs with --threads 1: the results do not depend on it, and one thread keeps
these tests quick on a loaded 2-core machine."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tide_local
from tide_local import cli, demo
from tide_local.paths import cache_dir
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.diffusion import BlockEvent
from tide_local.generate_cli import _Streamer

PROMPT = "Hello there"
N = 40  # two blocks of 32 after a short raw prompt, more after the chat template
SUMMARY = re.compile(
    r"^\d+ tokens, [\d.]+ tokens/s, [\d.]+ steps/block, [\d.]+ tokens/step, [\d.]+ s$"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("generate_cli")
    ckpt = make_checkpoint(root / "hf", preset="tiny", seed=0)
    out = root / "tiny-q8_0.gguf"
    convert(ckpt, out, "q8_0", progress=False, log=io.StringIO())
    return str(out)


@pytest.fixture(scope="module")
def engine(model):
    eng = tide_local.load(model, threads=1)
    yield eng
    eng.close()


def run(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def gen(model, capsys, *args) -> tuple[int, str, str]:
    return run(capsys, "-m", model, "--threads", "1", *args)


def test_streamed_text_is_the_engines_chat_answer(model, engine, capsys):
    rc, out, err = gen(model, capsys, "-p", PROMPT, "-n", str(N))
    assert rc == 0
    expected = engine.chat([{"role": "user", "content": PROMPT}], max_new_tokens=N)
    assert out == expected.text + "\n"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), err
    assert lines[0].startswith(f"{expected.stats.tokens} tokens,")


def test_raw_streamed_text_is_the_engines_generate(model, engine, capsys):
    rc, out, _ = gen(model, capsys, "-p", PROMPT, "-n", str(N), "--raw")
    assert rc == 0
    assert out == engine.generate(PROMPT, max_new_tokens=N).text + "\n"


def test_sampling_options_pass_through(model, engine, capsys):
    opts = dict(max_new_tokens=N, temperature=0.9, top_k=20, top_p=0.9, seed=3, threshold=0.5, steps=8)
    rc, out, _ = gen(model, capsys, "-p", PROMPT, "--raw", "-n", str(N), "--temperature", "0.9",
                     "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--threshold", "0.5", "--steps", "8")
    assert rc == 0
    assert out == engine.generate(PROMPT, **opts).text + "\n"


def test_no_cache_gives_the_same_text(model, capsys):
    _, cached, _ = gen(model, capsys, "-p", PROMPT, "-n", "8", "--raw")
    rc, uncached, _ = gen(model, capsys, "-p", PROMPT, "-n", "8", "--raw", "--no-cache")
    assert rc == 0 and uncached == cached


def test_prompt_from_stdin(model, capsys, monkeypatch):
    _, from_flag, _ = gen(model, capsys, "-p", PROMPT, "-n", "8")
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    rc, from_stdin, _ = gen(model, capsys, "-p", "-", "-n", "8")
    assert rc == 0 and from_stdin == from_flag
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    rc, no_flag, _ = gen(model, capsys, "-n", "8")
    assert rc == 0 and no_flag == from_flag


def _json(model, capsys, *args) -> dict:
    rc, out, err = gen(model, capsys, "--json", *args)
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    return json.loads(out)


def test_json_output(model, engine, capsys):
    d = _json(model, capsys, "-p", PROMPT, "-n", "8")
    assert set(d) == {"tokens", "text", "stats"}
    assert all(isinstance(t, int) for t in d["tokens"])
    assert len(d["tokens"]) == d["stats"]["tokens"] <= 8
    assert d["text"] == engine.tokenizer.decode(d["tokens"])
    assert d["stats"]["finish_reason"] in ("stop", "length")
    for key in ("tokens_per_second", "tokens_per_step", "steps_per_block", "seconds", "prompt_tokens", "wall_seconds"):
        assert key in d["stats"]


def test_raw_and_chat_template_prompts(model, engine, capsys):
    raw = _json(model, capsys, "-p", PROMPT, "-n", "8", "--raw")["stats"]["prompt_tokens"]
    chat = _json(model, capsys, "-p", PROMPT, "-n", "8")["stats"]["prompt_tokens"]
    system = _json(model, capsys, "-p", PROMPT, "-n", "8", "--system", "Be brief.")["stats"]["prompt_tokens"]
    assert raw == len(engine.tokenizer.encode(PROMPT))
    assert chat == len(engine.chat_prompt([{"role": "user", "content": PROMPT}]))
    assert system == len(engine.chat_prompt([{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": PROMPT}]))
    assert raw < chat and chat != system


def test_stats_line(model, capsys):
    rc, _, err = gen(model, capsys, "-p", PROMPT, "-n", "8", "--stats")
    lines = err.strip().splitlines()
    assert rc == 0 and len(lines) == 2
    assert SUMMARY.match(lines[0]) and "steps (per block" in lines[1] and "stopped:" in lines[1]


@pytest.mark.parametrize(
    "args, words",
    [
        (["-n", "0"], "-n/--max-new-tokens"),
        (["--threshold", "1.5"], "--threshold"),
        (["--steps", "0"], "--steps"),
        (["--top-p", "0"], "--top-p"),
        (["--threads", "0"], "--threads"),
        (["--raw", "--system", "x"], "--system"),
        (["-n", "100000"], "context"),  # the engine's own check
        (["-p", "   "], "empty"),
    ],
)
def test_bad_arguments(model, capsys, args, words):
    argv = ["-p", PROMPT, *args] if "-p" not in args else args
    rc, out, err = gen(model, capsys, *argv)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("tide generate: error:") and words in err and "Traceback" not in err


def test_missing_and_bad_model_files(tmp_path, capsys):
    rc, _, err = run(capsys, "-m", str(tmp_path / "nope.gguf"), "-p", PROMPT)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "nope.gguf" in err and "Traceback" not in err
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    rc, _, err = run(capsys, "-m", str(bad), "-p", PROMPT)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "bad.gguf" in err and "Traceback" not in err


def test_no_model_says_how_to_get_one(capsys):
    rc, out, err = run(capsys, "-p", PROMPT)
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "models.md" in err and "tide convert" in err and "--demo" in err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("--demo", "Sort:", "--raw", "--json", "--threshold", "examples:", "models.md"):
        assert word in out
    assert "generate" in cli._usage()


def test_demo_answers_from_the_packaged_model(capsys):
    rc, out, err = run(capsys, "--demo", "-p", "Reverse: apple pear fig", "--threads", "1")
    assert rc == 0 and out.strip() == "fig pear apple"
    assert demo.demo_model_path().is_file() and "building" not in err


def test_demo_and_model_together_is_an_error(model, capsys):
    rc, _, err = run(capsys, "--demo", "-m", model, "-p", PROMPT)
    assert rc == 2 and "not both" in err


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TIDE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "tide-local"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "tide-local"
    monkeypatch.setenv("TIDE_CACHE_DIR", str(tmp_path / "t"))
    assert cache_dir() == tmp_path / "t"


def test_streamer_holds_back_partial_characters(engine):
    text = "héllo wörld 日本語 ✓"
    ids = engine.tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # several characters span more than one token
    out = io.StringIO()
    writes = []
    out.write = lambda s, _w=out.write: (writes.append(s), _w(s))[1]
    n_prompt, B = 3, 4
    canvas = [1] * n_prompt + ids
    canvas += [0] * (-len(canvas) % B)
    streamer = _Streamer(engine.tokenizer, out)
    for start in range(0, len(canvas), B):
        if start + B > n_prompt:
            answer = np.array(canvas[max(start, n_prompt):min(start + B, n_prompt + len(ids))])
            streamer.block(BlockEvent(start // B, start, np.array(canvas[start:start + B]), 1, answer))
    streamer.finish(engine.tokenizer.decode(ids))
    assert out.getvalue() == engine.tokenizer.decode(ids) + "\n"
    assert not any("\ufffd" in w for w in writes)
    assert len(writes) > 3  # it streamed


def test_module_entry_point(tmp_path):
    env = dict(os.environ, TIDE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "tide_local", "generate", "--demo", "-n", "8", "-p", "hi", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert SUMMARY.match(proc.stderr.strip().splitlines()[-1])


def test_offload_options_without_a_gpu_warn_once(model, capsys):
    from tide_local import ggml

    if ggml.accelerator_devices():
        pytest.skip("this libggml has a GPU")
    rc, out, err = gen(model, capsys, "-p", PROMPT, "-n", "8", "--policy", "swap", "--gpu-memory", "1GiB")
    assert rc == 0 and out
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "no GPU" in warnings[0] and "tide devices" in warnings[0]
    rc, _, err = gen(model, capsys, "-p", PROMPT, "-n", "8")
    assert rc == 0 and "warning" not in err


def test_devices_lists_the_libggml_devices_and_the_auto_choice(capsys):
    from tide_local import ggml

    assert cli.main(["devices"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("libggml ") and "CPU" in out and "<- --device auto" in out
    if not ggml.accelerator_devices():
        assert "no GPU" in err and "GGML_CUDA=on" in err and "TIDE_GGML_LIB_DIR" in err
    assert cli.main(["devices", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {d["name"] for d in data["devices"]} >= {"CPU"} and data["auto"]
