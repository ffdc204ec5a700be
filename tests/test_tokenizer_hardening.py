"""The tokenizer and chat template from a GGUF are untrusted input: rendering is bounded in
time and size and fails as one ChatTemplateError; the tokenizer JSON's settings, size,
pre-tokenizer and vocabulary are checked at load; a prompt is capped in bytes before it is
tokenized; bad UTF-8 and bad option values are one-line errors on the command line.

The time-limit tests use templates that would run for minutes or hours and a limit of a
fraction of a second: they pass on a slow machine as on a fast one."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import threading
import time

import pytest

import tide_local
from tide_local import cli
from tide_local import chat_template
from tide_local import tokenizer as tokenizer_module
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import CHAT_TEMPLATE, build_tokenizer, make_checkpoint
from tide_local.errors import ChatTemplateError, ContextError, GGUFError
from tide_local.tokenizer import Tokenizer

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    return build_tokenizer().to_str()


def make(tokenizer_json, template=CHAT_TEMPLATE, **kwargs) -> Tokenizer:
    return Tokenizer(tokenizer_json, template, **kwargs)


def render(tokenizer_json, template, **kwargs) -> str:
    return make(tokenizer_json, template).apply_chat_template(HELLO, **kwargs)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("hardening")
    ckpt = make_checkpoint(root / "hf", preset="tiny", seed=0)
    out = root / "tiny-q8_0.gguf"
    convert(ckpt, out, "q8_0", progress=False, log=io.StringIO())
    return str(out)


# -- chat templates: time ---------------------------------------------------------------------
RUNS_FOR_HOURS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    # no call at all in the inner loop: only the line tracer sees it
    "loops over a string": "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "output into a macro's buffer": "{% macro m() %}{% for i in range(100000) %}{% for j in range(100000) %}x"
                                    "{% endfor %}{% endfor %}{% endmacro %}{{ m() }}",
    "arithmetic": "{% set ns = namespace(n=0) %}{% for i in range(100000) %}{% for j in range(100000) %}"
                  "{% set ns.n = ns.n + i * j %}{% endfor %}{% endfor %}{{ ns.n }}",
}


@pytest.mark.parametrize("template", RUNS_FOR_HOURS.values(), ids=RUNS_FOR_HOURS.keys())
def test_a_slow_template_is_stopped_at_its_time_limit(tokenizer_json, template):
    tok = make(tokenizer_json, template, render_seconds=0.3)
    threads, trace = threading.active_count(), sys.gettrace()
    with pytest.raises(ChatTemplateError, match="time limit of 0.3 s"):
        tok.apply_chat_template(HELLO)
    # the render itself stopped, in this thread: nothing left running, the tracer put back
    assert threading.active_count() == threads and sys.gettrace() is trace
    with pytest.raises(ChatTemplateError, match="time limit of 0.2 s"):  # the limit of one call
        tok.apply_chat_template(HELLO, seconds=0.2)


def test_the_limits_leave_real_templates_alone(tokenizer_json):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    messages = [{"role": "system", "content": "Be brief."}]
    messages += [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " * 20} for i in range(200)]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(CHAT_TEMPLATE)
    tok = make(tokenizer_json, max_tokens=32768)
    assert tok.apply_chat_template(messages) == plain.render(messages=messages, add_generation_prompt=True,
                                                             bos_token="", eos_token="")
    # operations within bounds behave as jinja2's
    text = render(tokenizer_json, "{{ 2 ** 10 }} {{ 'ab' * 3 }} {{ '%05.1f' % 3.14159 }} {{ '{:>4}'.format(7) }} "
                  "{{ [1, 2] + [3] }} {{ ['a', 'b']|join('-') }} {{ 'x'|center(5) }}| {{ [1, 2, 3]|sum }} "
                  "{{ messages|tojson }} {{ 'a\nb'|indent(2) }} {{ 'abc'.replace('b', 'B') }} {{ 7 // 2 }}")
    assert text == ('1024 ababab 003.1    7 [1, 2, 3] a-b   x  | 6 [{"content": "Hello there", "role": "user"}] '
                    "a\n  b aBc 3")


# -- chat templates: size ---------------------------------------------------------------------
SIZE_BOMBS = {
    "power": "{{ 7 ** 1000000 }}",
    "power of a power": "{% set n = 100000 %}{{ (7 ** n) ** n }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "repetition": "{{ 'a' * 10 ** 8 }}",
    "list repetition": "{{ ['abc'] * 10 ** 8 }}",
    "a list that repeats a long string": "{% set s = 'a' * 10000 %}{{ [s] * 100000 }}",
    "doubling with ~": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}",
    "doubling with +": "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}",
    "center": "{{ 'x'|center(10 ** 8) }}",
    "str.ljust": "{{ 'x'.ljust(10 ** 8) }}",
    "str.format width": "{{ '{:>100000000}'.format(1) }}",
    "% width": "{{ '%0100000000d' % 1 }}",
    "format filter": "{{ '%*s'|format(100000000, 'x') }}",
    "str.replace": "{% set s = 'a' * 20000 %}{{ s.replace('', s) }}",
    "replace filter": "{% set s = 'a' * 20000 %}{{ s|replace('a', s) }}",
    "join": "{% set s = 'a' * 20000 %}{{ range(20000)|map('string')|join(s) }}",
    "str.join": "{% set s = 'a' * 20000 %}{{ s.join(s) }}",
    "indent": "{% set s = '\n' * 20000 %}{{ s|indent(20000, true, true) }}",
    "batch": "{{ [1]|batch(10 ** 8, 'x')|list }}",
    "many references printed": "{% set s = 'a' * 20000 %}{% set l = [s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s] %}"
                               "{% set l = [l, l, l, l, l, l, l, l, l, l, l, l, l, l, l, l] %}{{ l }}",
    "sum of lists": "{{ ([[0] * 1000] * 1000)|sum(start=[])|length }}",
    # shared references: 2^100 strings as text, and comparing two such lists is 2^100 steps in C
    "nested literals": "{% set a = 'x' %}{% set b = 'x' %}"
                       + "".join("{% set a = [a, a] %}{% set b = [b, b] %}" for _ in range(100))
                       + "{{ a == b }}",
    "nested literals in a namespace": "{% set ns = namespace(l=['x']) %}{% for i in range(100) %}"
                                      "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|pprint }}",
    "output": "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
}


@pytest.mark.parametrize("template", SIZE_BOMBS.values(), ids=SIZE_BOMBS.keys())
def test_a_value_or_output_past_the_budget_is_refused(tokenizer_json, template):
    tok = make(tokenizer_json, template, render_seconds=60)  # sizes, not time, stop these
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="the chat template was stopped: .*(integer|characters)"):
        tok.apply_chat_template(HELLO, max_chars=100_000)
    assert time.monotonic() - started < 30


def test_the_output_budget_defaults_to_what_the_context_holds(tokenizer_json):
    tok = make(tokenizer_json, "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", max_tokens=256)
    with pytest.raises(ChatTemplateError, match=f"output passed {256 * tok.max_token_bytes:,} characters"):
        tok.apply_chat_template(HELLO)
    # messages that cannot fit are a ContextError before any rendering
    with pytest.raises(ContextError, match="a context of 256 tokens"):
        make(tokenizer_json, max_tokens=256).apply_chat_template([{"role": "user", "content": "word " * 10000}])


# -- chat templates: every failure is one ChatTemplateError -----------------------------------
FAILURES = {
    "{{ 1 // 0 }}": "ZeroDivisionError",
    "{{ 10.0 ** 400 }}": "OverflowError",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}": "RecursionError",
    "{% include 'other.jinja' %}": "cannot load other templates",
    "{% import 'macros.jinja' as m %}": "cannot load other templates",
    "{{ 'a long text'|truncate(1) }}": "AssertionError",
    "{{ 'abc'|wordwrap(0) }}": "ValueError",
    "{{ 'x' * 'y' }}": "TypeError",
    "{{ 10 ** 5000 }}": "ValueError",  # str() of more than 4300 digits
    "{{ raise_exception('no tools here') }}": "no tools here",
    "{{ messages.__class__.__name__ }}": "unsafe",
    "{{ messages.append(1) }}": "unsafe",
    "{% for %}": "(line 1)",
    "{{ lipsum(10 ** 8) }}": "'lipsum' is undefined",
}


@pytest.mark.parametrize("template, words", FAILURES.items(), ids=FAILURES.values())
def test_every_render_failure_is_one_chat_template_error(tokenizer_json, template, words):
    with pytest.raises(ChatTemplateError) as err:
        render(tokenizer_json, template)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert err.value.__suppress_context__  # no chained traceback


def test_an_oversized_template_is_refused(tokenizer_json):
    template = "{# padding #}" * (chat_template.MAX_TEMPLATE_CHARS // 13 + 1)
    with pytest.raises(ChatTemplateError, match="characters, more than"):
        render(tokenizer_json, template)


# -- the tokenizer JSON -------------------------------------------------------------------------
def test_padding_and_truncation_settings_are_dropped(tokenizer_json):
    data = json.loads(tokenizer_json)
    data["padding"] = {"strategy": {"Fixed": 1000}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "<|endoftext|>"}
    data["truncation"] = {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0}
    plain, configured = Tokenizer(tokenizer_json), Tokenizer(json.dumps(data))
    text = "The tide comes in twice a day."
    assert configured.encode(text) == plain.encode(text) and len(plain.encode(text)) > 2


def test_the_tokenizer_json_size_is_capped(tokenizer_json, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_TOKENIZER_JSON", len(tokenizer_json) - 1)
    with pytest.raises(GGUFError, match="model.gguf: the stored tokenizer is .* more than"):
        Tokenizer(tokenizer_json, source="model.gguf")


def _with_split(tokenizer_json, pattern: str) -> str:
    data = json.loads(tokenizer_json)
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    return json.dumps(data)


def test_a_backtracking_pre_tokenizer_is_refused_at_load(tokenizer_json):
    # Oniguruma gives up on (a+)+$ over a run of a's: a Rust panic inside `tokenizers`
    with pytest.raises(GGUFError, match="model.gguf: the stored tokenizer failed.*pre-tokenizer"):
        Tokenizer(_with_split(tokenizer_json, r"(a+)+$"), source="model.gguf")


def test_a_pre_tokenizer_panic_on_a_prompt_is_a_gguf_error(tokenizer_json):
    tok = Tokenizer(_with_split(tokenizer_json, r"(q+q+)+y"), source="model.gguf")  # passes the load-time text
    with pytest.raises(GGUFError, match="model.gguf: the stored tokenizer failed"):
        tok.encode("q" * 64)
    assert tok.encode("hello") == Tokenizer(tokenizer_json).encode("hello")  # and it still works


class _FakeGGUF:
    def __init__(self, metadata, path="models/other.gguf"):
        self.metadata, self.path = metadata, path

    def get(self, key):
        return self.metadata.get(key)


def test_a_vocabulary_larger_than_the_models_is_refused_at_load(tokenizer_json):
    gguf = _FakeGGUF({"tokenizer.huggingface.json": tokenizer_json})
    size = Tokenizer(tokenizer_json).size
    assert Tokenizer.from_gguf(gguf, vocab_size=size).size == size
    with pytest.raises(GGUFError, match=f"models/other.gguf: .* {size} token ids but the model's vocabulary has 600"):
        Tokenizer.from_gguf(gguf, vocab_size=600)


# -- prompts ------------------------------------------------------------------------------------
def test_max_token_bytes_bounds_every_token(tokenizer_json):
    tok = Tokenizer(tokenizer_json)
    for i in range(tok.size):
        assert len(tok.decode([i], skip_special=False).encode()) <= tok.max_token_bytes


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(model, monkeypatch):
    with tide_local.load(model, device="cpu", threads=1, n_ctx=64) as eng:
        limit = eng.n_ctx * eng.tokenizer.max_token_bytes

        def no_tokenizing(text):
            raise AssertionError("tokenized")

        monkeypatch.setattr(eng.tokenizer, "_encode", no_tokenizing)
        for prompt in ("x" * (limit + 1), "é" * (limit // 2 + 1), "x" * 48_000_000):
            with pytest.raises(ContextError, match="bytes: more than a context of 64 tokens"):
                eng.generate(prompt, max_new_tokens=8)
        monkeypatch.undo()
        # below the cap the engine's own token count decides
        with pytest.raises(ContextError, match="tokens plus 8 new tokens"):
            eng.generate("tide " * 60, max_new_tokens=8)


def test_text_that_is_not_utf8_is_a_value_error(tokenizer_json):
    with pytest.raises(ValueError, match="byte 0xff, which is not UTF-8, at character 2"):
        Tokenizer(tokenizer_json).encode("ab\udcffcd")


def run_generate(capsys, *args) -> tuple[int, str, str]:
    rc = cli.main(["generate", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("args, words", [
    (["-p", "caf\udce9"], "the prompt (-p) is not valid UTF-8 text: the byte 0xe9 at character 3"),
    (["-p", "Hello", "--system", "\udcff"], "--system is not valid UTF-8 text: the byte 0xff"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
])
def test_command_line_errors_are_one_line(model, capsys, args, words):
    argv = args if "-p" in args else ["-p", "Hello", *args]
    rc, out, err = run_generate(capsys, "-m", model, "--threads", "1", *argv)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert words in err and "None" not in err and "Traceback" not in err


def test_stdin_that_is_not_utf8_is_one_line(model, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hello \xff there\n"), encoding="utf-8"))
    rc, out, err = run_generate(capsys, "-m", model, "--threads", "1", "-n", "8")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "the prompt on stdin is not valid utf-8 text: the byte 0xff at byte 6" in err


def test_a_huge_prompt_on_the_command_line_is_one_line_and_never_tokenized(model, capsys, monkeypatch):
    real = Tokenizer._encode

    def small_only(self, text):
        assert len(text) < 100_000, "a huge text was tokenized"
        return real(self, text)

    monkeypatch.setattr(Tokenizer, "_encode", small_only)
    for raw in ([], ["--raw"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("word " * 2_000_000))  # 10 MB
        rc, out, err = run_generate(capsys, "-m", model, "--threads", "1", "-n", "8", *raw)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "context of" in err, err


# -- tide chat ------------------------------------------------------------------------------------
def test_a_slow_template_in_the_chat_app_is_an_error_and_the_app_goes_on(model):
    from tide_local.tui.app import ChatApp
    from tide_local.tui.widgets import Note, PromptInput

    app = ChatApp(model, load_options={"device": "cpu", "threads": 1}, options={"max_new_tokens": 8})

    async def until(pilot, condition, timeout=60.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting for the app"
            await pilot.pause(0.02)

    async def say(pilot, text):
        app.query_one(PromptInput).text = text
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is None)
        await pilot.pause()

    async def scenario(pilot):
        await until(pilot, lambda: not app.query_one(PromptInput).disabled)
        tok = app.engine.tokenizer
        good, limit = tok.chat_template, tok.render_seconds
        tok.chat_template, tok.render_seconds = RUNS_FOR_HOURS["nested loops"], 0.3
        await say(pilot, "Hello")
        errors = [n.text for n in app.query(Note) if n.has_class("error")]
        assert errors and "time limit" in errors[-1]
        assert app.messages == [] and app.query_one(PromptInput).text == "Hello"
        tok.chat_template, tok.render_seconds = good, limit  # the real limit: a busy machine is no error
        await say(pilot, "Hello")
        assert [m["role"] for m in app.messages] == ["user", "assistant"]

    async def main():
        async with app.run_test(size=(100, 36)) as pilot:
            await scenario(pilot)

    asyncio.run(main())


def test_a_panic_leaves_only_our_line_on_stderr(tokenizer_json, tmp_path):
    """Rust prints a panic's report to fd 2 itself (a backtrace with RUST_BACKTRACE=1)."""
    script = tmp_path / "panic.py"
    script.write_text(
        "import sys\n"
        "from tide_local.tokenizer import Tokenizer\n"
        "from tide_local.errors import GGUFError\n"
        "print('before', file=sys.stderr, flush=True)\n"
        "try:\n"
        f"    Tokenizer({_with_split(tokenizer_json, r'(a+)+$')!r}, source='model.gguf')\n"
        "except GGUFError as err:\n"
        "    print(err, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RUST_BACKTRACE": "1"})
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "before" and len(lines) == 2 and "the stored tokenizer failed" in lines[1], out.stderr


def test_a_tokenizer_of_the_real_size_loads_and_agrees_with_the_library():
    """LLaDA2.0's tokenizer has 157153 ids (generated here: no download). Measured on a 2-core
    Xeon: loading 0.4 s, 100k characters tokenized in 0.06 s (issue targets: 2 s and 0.5 s)."""
    from tokenizers import Tokenizer as HFTokenizer

    from tide_local.converters.testmodel import CHAT_TEMPLATE
    from tide_local.converters.testtokenizer import REAL_SIZE, large_tokenizer_json

    text = large_tokenizer_json()
    tok = Tokenizer(text, CHAT_TEMPLATE, vocab_size=157184)
    assert tok.size == REAL_SIZE
    sample = "the rain in spain stays mainly in the plain 12345 ÿ日本 <|mask|><|endoftext|>" * 50
    assert tok.encode(sample) == HFTokenizer.from_str(text).encode(sample, add_special_tokens=False).ids
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello there"}])
    assert prompt.endswith("<role>ASSISTANT</role>") and tok.encode(prompt)
