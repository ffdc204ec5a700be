"""`tide chat`: the Textual app driven by Pilot.

The app runs the random tiny test model (its answers never stop early, so every test can reach
a second block), in a temporary cache directory; one test loads the packaged demo model.
Generation runs with one thread and short answers: the app's behaviour does not depend on
either, and they keep these tests quick on a loaded 2-core machine."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import tide_local
from tide_local import cli
from tide_local.converters.convert import convert
from tide_local.converters.testmodel import make_checkpoint
from tide_local.diffusion import BlockEvent, StepEvent
from tide_local.tui.app import ChatApp
from tide_local.tui.commands import CommandError, GenerationSettings, message_text, parse_command
from tide_local.tui.format import offload_text
from tide_local.tui.live import MASK, LiveAnswer, TokenText, printable, render_answer, render_map
from tide_local.tui.widgets import AssistantMessage, HelpScreen, LoadingView, Note, PromptInput, UserMessage

N = 24  # answer tokens: one block after the chat prompt
MODEL = {}  # "path": the random tiny model


@pytest.fixture(scope="module", autouse=True)
def tiny_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-model")
    MODEL["path"] = folder / "tiny-q8_0.gguf"
    convert(make_checkpoint(folder / "hf", preset="tiny", seed=2025), MODEL["path"], "q8_0", progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIDE_CACHE_DIR", str(tmp_path_factory.mktemp("tide-cache")))
        yield MODEL["path"]


@pytest.fixture(scope="module")
def engine(tiny_model):
    eng = tide_local.load(tiny_model, device="cpu", threads=1)
    yield eng
    eng.close()


def make_app(device: str = "cpu", **options) -> ChatApp:
    return ChatApp(str(MODEL["path"]), load_options={"device": device, "threads": 1},
                   options={"max_new_tokens": N, **options})


def run(app: ChatApp, scenario, size=(100, 36)) -> None:
    """Run `scenario(pilot)` in the app and close it."""

    async def main():
        async with app.run_test(size=size) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the app")
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    await until(pilot, lambda: not pilot.app.query_one(PromptInput).disabled)


async def say(pilot, text: str, wait: bool = True) -> None:
    """Type `text` (as a paste would put it) and press Enter; wait for the answer."""
    pilot.app.query_one(PromptInput).text = text
    await pilot.press("enter")
    if wait:
        await until(pilot, lambda: pilot.app.turn is None)
        await pilot.pause()


def notes(app: ChatApp, kind: str | None = None) -> list[str]:
    return [n.text for n in app.query(Note) if kind is None or n.has_class(kind)]


def gate_stream(app: ChatApp, after_steps: int | None = None):
    """Record the keyword arguments of the app's engine.stream calls and, with `after_steps`,
    pause each answer after that many steps until released; returns (reached, release, calls)."""
    real = app.engine.stream
    reached, release, calls = threading.Event(), threading.Event(), []

    def stream(ids, **kwargs):
        calls.append(kwargs)
        steps = 0
        for event in real(ids, **kwargs):
            yield event
            if isinstance(event, StepEvent):
                steps += 1
                if after_steps is not None and steps == after_steps:
                    reached.set()
                    release.wait(20)

    app.engine.stream = stream
    return reached, release, calls


def test_answer_arrives_as_the_engines_chat_answer(engine):
    app = make_app()
    expected = engine.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=N)

    async def scenario(pilot):
        assert app.query_one(PromptInput).disabled  # until the model is loaded
        await ready(pilot)
        await say(pilot, "Hello there")
        assert [m["role"] for m in app.messages] == ["user", "assistant"]
        assert app.messages[1]["content"] == expected.text
        (answer,) = app.query(AssistantMessage)
        assert answer.finished and answer.text == expected.text
        assert "tokens/s" in str(app.query_one("#status").render())
        # multi-turn: the second prompt holds the first exchange
        await say(pilot, "And then?")
        follow = engine.chat([{"role": "user", "content": "Hello there"},
                              {"role": "assistant", "content": expected.text},
                              {"role": "user", "content": "And then?"}], max_new_tokens=N)
        assert app.messages[-1]["content"] == follow.text
        assert len(app.query(UserMessage)) == 2

    run(app, scenario)


def test_the_demo_model_answers_in_the_app():
    app = ChatApp(demo=True, load_options={"device": "cpu", "threads": 1})

    async def scenario(pilot):
        await ready(pilot)
        assert any("Try: Reverse: apple pear fig" in text for text in notes(app))
        await say(pilot, "Reverse: apple pear fig")
        assert app.messages[-1]["content"] == "fig pear apple"
        await say(pilot, "Reverse: cat dog sun moon")  # a second turn, over the first
        assert app.messages[-1]["content"] == "moon sun dog cat"

    run(app, scenario)


def test_the_live_block_shows_masks_resolving():
    app = make_app(max_new_tokens=64)

    async def scenario(pilot):
        await ready(pilot)
        reached, release, _ = gate_stream(app, after_steps=40)  # into the second block
        await say(pilot, "Hi", wait=False)
        await until(pilot, reached.is_set)
        await pilot.pause(0.1)
        answer = app.query_one(AssistantMessage)
        body = str(answer.query_one(".body").render())
        bar = str(answer.query_one(".map").render())
        assert MASK.strip() in body  # still-masked positions
        assert "block 2" in bar and "masked" in bar
        assert not answer.finished
        assert "░" in app.export_screenshot()
        release.set()
        await until(pilot, lambda: app.turn is None)
        assert answer.finished

    run(app, scenario)


def test_escape_stops_the_answer_and_keeps_what_was_done():
    app = make_app(max_new_tokens=256)

    async def scenario(pilot):
        await ready(pilot)
        reached, release, _ = gate_stream(app, after_steps=40)
        await say(pilot, "Tell me a long story", wait=False)
        await until(pilot, reached.is_set)
        await pilot.press("escape")
        release.set()
        await until(pilot, lambda: app.turn is None, timeout=10)
        answer = app.query_one(AssistantMessage)
        assert answer.has_class("stopped")
        assert app.messages[-1]["role"] == "assistant"
        assert app.messages[-1]["content"] == answer.text
        assert len(answer.text) > 0  # the first block (32 tokens) was done
        assert app.is_running
        # the conversation goes on
        await say(pilot, "Shorter please")
        assert len(app.messages) == 4 and app.query(AssistantMessage).last().finished

    run(app, scenario)
    assert app.engine is None  # closed on exit


def test_quit_while_answering_waits_for_the_step_and_closes_the_model():
    """Quit while a step is in flight: the answer is held after its 5th step until the quit has
    asked the turn to stop, so the quit always meets a running answer, however fast the machine."""
    app = make_app(max_new_tokens=256)
    turns = []

    def release_when_stopped(turn, release):
        turn.stop.wait(60)
        release.set()

    async def scenario(pilot):
        await ready(pilot)
        reached, release, _ = gate_stream(app, after_steps=5)
        await say(pilot, "Tell me a long story", wait=False)
        await until(pilot, reached.is_set)
        turns.append(app.turn)
        assert app.generating and app.engine is not None
        threading.Thread(target=release_when_stopped, args=(app.turn, release), daemon=True).start()
        await pilot.press("ctrl+q")

    run(app, scenario)
    assert not app.is_running and app.engine is None
    assert turns[0].stop.is_set()


def test_reset_empties_the_history():
    app = make_app()

    async def scenario(pilot):
        await ready(pilot)
        await say(pilot, "Hello")
        assert len(app.messages) == 2
        await say(pilot, "/reset", wait=False)
        await pilot.pause()
        assert app.messages == []
        assert not app.query(UserMessage) and not app.query(AssistantMessage)
        assert app.query_one(PromptInput).text == ""
        await say(pilot, "Hello again")  # a fresh conversation: one exchange
        assert len(app.messages) == 2
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.messages == [] and not app.query(UserMessage)

    run(app, scenario)


def test_set_threshold_changes_the_next_generation(engine):
    app = make_app()
    expected = engine.chat([{"role": "user", "content": "Hi"}], max_new_tokens=N, threshold=0.05)

    async def scenario(pilot):
        await ready(pilot)
        _, _, calls = gate_stream(app)
        await say(pilot, "/set threshold 0.05", wait=False)
        await pilot.pause()
        assert app.settings.values["threshold"] == 0.05
        await say(pilot, "Hi")
        assert calls[-1]["threshold"] == 0.05
        assert app.messages[-1]["content"] == expected.text
        assert app.last_stats.steps == expected.stats.steps
        # other options, and back to the model's default
        for command in ("/set steps 8", "/set temperature 0.7", "/set top_k 5", "/set top-p 0.9", "/set seed 3",
                        "/set n 16", "/set threshold default"):
            await say(pilot, command, wait=False)
        await pilot.pause()
        await say(pilot, "Again")
        assert calls[-1] == {"stop_ids": engine.chat_stop_ids(), "steps": 8, "temperature": 0.7, "top_k": 5,
                             "top_p": 0.9, "seed": 3, "max_new_tokens": 16}
        await say(pilot, "/set threshold 2", wait=False)
        await pilot.pause()
        assert "threshold must be in (0, 1]" in notes(app, "error")[-1]
        assert app.settings.values["threshold"] is None

    run(app, scenario)


def test_a_long_message_wraps():
    app = make_app()
    long = "a fairly long message without any line break " * 12

    async def scenario(pilot):
        await ready(pilot)
        await say(pilot, long.strip())
        message = app.query_one(UserMessage)
        assert message.region.right <= app.size.width
        assert message.region.height >= 2 + len(long) // app.size.width  # borders + wrapped lines
        assert message.text == long.strip()

    run(app, scenario)


def test_ctrl_j_inserts_a_newline_and_enter_sends():
    app = make_app()

    async def scenario(pilot):
        await ready(pilot)
        await pilot.press("o", "n", "e", "ctrl+j", "t", "w", "o")
        assert app.query_one(PromptInput).text == "one\ntwo"
        await pilot.press("enter")
        await until(pilot, lambda: app.turn is None)
        assert app.messages[0]["content"] == "one\ntwo"

    run(app, scenario)


def test_a_prompt_past_the_context_is_an_error_in_the_app():
    app = make_app()

    async def scenario(pilot):
        await ready(pilot)
        await say(pilot, "/set max_new_tokens 5000", wait=False)
        await say(pilot, "Hello")
        errors = notes(app, "error")
        assert errors and "context" in errors[-1]
        assert app.messages == []  # the failed turn is not part of the conversation
        assert app.query_one(PromptInput).text == "Hello"  # it is back in the input
        assert app.is_running
        await say(pilot, "/set max_new_tokens 16", wait=False)
        await say(pilot, "Hello")
        assert [m["role"] for m in app.messages] == ["user", "assistant"]

    run(app, scenario)


def test_an_engine_failure_is_shown_and_the_app_stays_up():
    app = make_app(max_new_tokens=64)

    async def scenario(pilot):
        await ready(pilot)
        real = app.engine.stream

        def failing(ids, **kwargs):
            for n, event in enumerate(real(ids, **kwargs)):
                if n == 40:  # in the second block
                    raise RuntimeError("the device went away")
                yield event

        app.engine.stream = failing
        await say(pilot, "Hello")
        assert "RuntimeError: the device went away" in notes(app, "error")[-1]
        kept = app.messages[-1]
        assert kept["role"] == "assistant" and kept["content"]  # the first block is kept
        app.engine.stream = real
        await say(pilot, "Hello again")
        assert app.query(AssistantMessage).last().finished and len(app.messages) == 4

    run(app, scenario)


def test_loading_shows_what_is_happening(monkeypatch):
    gate = threading.Event()
    real_load = tide_local.load

    def slow_load(path, **options):
        gate.wait(30)
        return real_load(path, **options)

    monkeypatch.setattr(tide_local, "load", slow_load)
    app = make_app()

    async def scenario(pilot):
        await until(pilot, lambda: "loading" in str(app.query_one("#loading-stage").render()))
        stage = str(app.query_one("#loading-stage").render())
        assert "memory-mapping" in stage and MODEL["path"].name in stage
        assert app.query_one(LoadingView).display and app.query_one(PromptInput).disabled
        await say(pilot, "too early", wait=False)
        gate.set()
        await ready(pilot)
        assert not app.query_one(LoadingView).display
        assert app.messages == []

    run(app, scenario)


def test_a_model_that_fails_to_load_is_reported(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    app = ChatApp(bad, load_options={"device": "cpu", "threads": 1})

    async def scenario(pilot):
        await until(pilot, lambda: app.load_error is not None)
        await pilot.pause()
        assert "could not load the model" in notes(app, "error")[-1]
        assert app.is_running and app.query_one(PromptInput).disabled

    run(app, scenario)


def test_offload_statistics_in_the_status_line_and_stats():
    app = make_app(device="emulated")

    async def scenario(pilot):
        await ready(pilot)
        await say(pilot, "Hello")
        status = str(app.query_one("#status").render())
        for part in ("tokens/s", "steps/block", "tokens/step", "emulated hits", "MB uploaded", "CPU", "device memory"):
            assert part in status
        await say(pilot, "/stats", wait=False)
        await pilot.pause()
        stats = notes(app)[-1]
        assert "expert offload: device emulated, policy tide" in stats
        assert "device memory plan" in stats and "threshold" in stats

    run(app, scenario)


def test_help_screen_and_slash_commands():
    app = make_app()

    async def scenario(pilot):
        await ready(pilot)
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        await say(pilot, "/help", wait=False)
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await say(pilot, "/system Answer in French.", wait=False)
        await say(pilot, "Bonjour")
        assert app.chat_messages()[0] == {"role": "system", "content": "Answer in French."}
        await say(pilot, "/system off", wait=False)
        await say(pilot, "/bogus", wait=False)
        await pilot.pause()
        assert app.system is None
        assert "unknown command /bogus" in notes(app, "error")[-1]
        await say(pilot, "/quit", wait=False)
        await pilot.pause()
        assert not app.is_running

    run(app, scenario)


# -- pieces ----------------------------------------------------------------------------------------
def test_live_answer_and_its_drawing(engine):
    ids = engine.chat_prompt([{"role": "user", "content": "Hi"}])
    stops = engine.chat_stop_ids()
    live = LiveAnswer(len(ids), 40, stops, engine.mask_id)
    words = TokenText(engine.tokenizer)
    from rich.style import Style

    from tide_local.tui.live import CanvasStyles

    styles = CanvasStyles(*(Style() for _ in range(5)))
    result = None
    seen_mask = False
    for event in engine.stream(ids, stop_ids=stops, max_new_tokens=40):
        if isinstance(event, StepEvent):
            live.step(event)
            snap = live.snapshot()
            seen_mask |= MASK in render_answer(snap, words, styles).plain
            assert "masked" in render_map(snap, styles).plain
        elif isinstance(event, BlockEvent):
            live.block(event)
        else:
            result = event
    assert seen_mask
    assert live.snapshot().ids == tuple(result.tokens)
    assert render_answer(live.snapshot(), words, styles).plain == printable(result.text).rstrip("\ufffd")


def test_slash_command_parsing_and_settings():
    assert parse_command("hello") is None
    assert parse_command("//etc") is None and message_text("//etc") == "/etc"
    assert parse_command("/new").name == "reset"
    assert parse_command("/system  Be brief. ").argument == "Be brief."
    with pytest.raises(CommandError, match="unknown command"):
        parse_command("/frobnicate")
    settings = GenerationSettings({"threshold": 0.9}, {"threshold": 0.95, "steps": 32})
    assert settings.options() == {"threshold": 0.9, "max_new_tokens": 512}
    settings.set("top-k 4")
    assert settings.values["top_k"] == 4
    with pytest.raises(CommandError, match="integer"):
        settings.set("steps many")
    with pytest.raises(CommandError, match="no option"):
        settings.set("speed 3")
    settings.set("threshold default")
    assert "0.95 (model default)" in settings.describe()
    assert printable("a\x1b[2Jb") == "a\u241b[2Jb"


def test_offload_text_needs_offload():
    from tide_local.results import GenerationStats, LayerOffload, OffloadStats

    base = dict(prompt_tokens=4, tokens=8, blocks=1, steps=8, steps_per_block=(8,), seconds=1.0,
                prefill_seconds=0.1, finish_reason="length")
    assert offload_text(GenerationStats(**base), None) == ""
    offload = OffloadStats(policy="tide", tau=4, tau_source="given", per_step=[], upload_seconds=0.0,
                           cpu_expert_seconds=0.0, wait_seconds=0.0,
                           per_layer={1: LayerOffload(hits=3, misses=1, uploads=2, upload_bytes=2_500_000)})
    text = offload_text(GenerationStats(**base, device="CUDA0", offload=offload), None)
    assert text == "CUDA0 hits 75.0% · 2.5 MB uploaded · CPU 25.0% of experts"


def test_cli_without_a_model_says_how_to_get_one(capsys):
    assert cli.main(["chat"]) == 2
    err = capsys.readouterr().err
    assert "models.md" in err and "tide chat --demo" in err and "tide convert" in err
    assert cli.main(["chat", "-m", "missing.gguf"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["chat", "--demo", "--threshold", "2"]) == 2
    assert "--threshold" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["chat", "--help"])
    assert exit_.value.code == 0
    assert "Ctrl+J" in capsys.readouterr().out
