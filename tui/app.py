"""`tide chat`: a terminal chat with a LLaDA2 model that shows block diffusion at work.

The model loads and generates in worker threads; the UI thread only draws. While an answer
is decoded the worker records each denoising step in a :class:`LiveAnswer` and wakes the UI
with one message at a time; the UI draws the latest state at most once a frame, so fast
steps are coalesced and a slow step never freezes the screen.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.reactive import reactive
from textual.widgets import Footer, Header

from .commands import Command, CommandError, GenerationSettings, message_text, parse_command
from .format import (describe_error, live_text, load_stage_text, offload_text, placement_text, speed_text,
                     stats_text, turn_footer)
from .live import LiveAnswer, Snapshot, TokenText
from .messages import AnswerEnded, Loaded, LoadFailed, LoadStage, Progress, Turn
from .widgets import (AssistantMessage, Conversation, HelpScreen, LoadingView, Note, PromptInput, StatusLine,
                      UserMessage)

FRAME_SECONDS = 1 / 30  # the live canvas is redrawn at most this often
SHUTDOWN_WAIT_SECONDS = 30  # at exit, how long to wait for the step being computed before closing the model


class ChatApp(App):
    """Chat with a LLaDA2 GGUF (or the demo model) and watch its blocks denoise."""

    CSS_PATH = "app.tcss"
    TITLE = "tide chat"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("escape", "stop", "Stop answer"),
        Binding("ctrl+n", "new_conversation", "New chat"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    generating = reactive(False, bindings=True)

    def __init__(self, model: str | os.PathLike | None = None, *, demo: bool = False, load_options: dict | None = None,
                 system: str | None = None, options: dict | None = None) -> None:
        super().__init__()
        if (model is None) == (not demo):
            raise ValueError("give a model path or demo=True")
        self.model_path = None if model is None else str(model)
        self.demo = demo
        self.load_options = dict(load_options or {})
        self.system = system
        self.settings = GenerationSettings(options)
        self.engine = None
        self.messages: list[dict] = []  # the conversation: user and assistant turns
        self.turn: Turn | None = None
        self.last_stats = None  # GenerationStats of the last answer
        self.load_error: str | None = None
        self._engine_lock = threading.Lock()  # held by the worker using the engine
        self._closing = False
        self._stages: list[list] = []  # [text, started, seconds or None]
        self._stage_timer = None

    # -- layout ----------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header(icon="◇")
        yield LoadingView(id="loading")
        yield Conversation(id="conversation")
        yield StatusLine(id="status", markup=False)
        yield PromptInput(id="input", placeholder="Message · Enter sends · Ctrl+J new line · /help", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(Conversation).display = False
        self.sub_title = "loading"
        self._stage_timer = self.set_interval(0.1, self._show_stages)
        self._load_model()

    # -- loading ---------------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_model(self) -> None:
        import tide_local

        with self._engine_lock:
            try:
                started = time.perf_counter()
                if self.demo:
                    from tide_local.demo import demo_model_path

                    path = str(demo_model_path())
                else:
                    path = self.model_path
                self.post_message(LoadStage(load_stage_text(path, self.load_options)))
                engine = tide_local.load(path, **self.load_options)
                if self._closing:
                    engine.close()
                    return
                self.engine = engine  # here, under the lock, so that close_engine always finds it
                self.post_message(Loaded(engine, path, time.perf_counter() - started))
            except Exception as err:  # shown in the app, which stays up to say so
                self.post_message(LoadFailed(err))

    def on_load_stage(self, message: LoadStage) -> None:
        now = time.perf_counter()
        if self._stages and self._stages[-1][2] is None:
            self._stages[-1][2] = now - self._stages[-1][1]
        self._stages.append([message.text, now, None])
        self._show_stages()

    def _show_stages(self) -> None:
        now = time.perf_counter()
        lines = []
        for text, started, seconds in self._stages:
            if seconds is None:
                lines.append(f"… {text}  {now - started:.1f} s")
            else:
                lines.append(f"✓ {text}  {seconds:.1f} s")
        self.query_one(LoadingView).show(lines or ["starting"])

    def _end_loading(self) -> None:
        if self._stage_timer is not None:
            self._stage_timer.stop()
            self._stage_timer = None
        self.query_one(LoadingView).display = False
        self.query_one(Conversation).display = True

    async def on_loaded(self, message: Loaded) -> None:
        self.settings.model_defaults = dict(message.engine.defaults)
        self._end_loading()
        name = Path(message.path).name
        self.sub_title = f"{'demo model' if self.demo else name} · {placement_text(self.engine)}"
        await self._welcome(name, message.seconds)
        prompt = self.query_one(PromptInput)
        prompt.disabled = False
        prompt.focus()
        self._show_status()

    async def on_load_failed(self, message: LoadFailed) -> None:
        self.load_error = describe_error(message.error)
        self._end_loading()
        self.sub_title = "no model"
        await self.add_note(f"could not load the model: {self.load_error}\n\nCtrl+Q quits.", "error", "error")
        self._show_status()

    async def _welcome(self, name: str, seconds: float) -> None:
        eng = self.engine
        lines = [f"{name} loaded in {seconds:.1f} s · {placement_text(self.engine)} · context {eng.n_ctx}"]
        if eng.plan is not None:
            lines.append(f"device memory plan: {eng.plan.total_bytes / 2**20:.0f} MiB; /stats shows it in full")
        if self.demo:
            from tide_local.demo import DEMO_PROMPTS, DESCRIPTION

            lines.append(f"The demo model is {DESCRIPTION}; it knows nothing else. Try: "
                         + " · ".join(DEMO_PROMPTS))
        if self.system:
            lines.append(f"system prompt: {self.system}")
        lines.append("Enter sends · Ctrl+J new line · Esc stops an answer · Ctrl+N new chat · F1 or /help for more")
        await self.add_note("\n".join(lines))

    # -- the conversation ------------------------------------------------------------------------
    async def add_note(self, text: str, kind: str = "info", title: str | None = None) -> Note:
        note = Note(text, kind, title)
        await self.query_one(Conversation).mount(note)
        return note

    def chat_messages(self) -> list[dict]:
        """What the model reads: the system prompt, then the conversation."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + list(self.messages)

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text
        if not text.strip():
            return
        prompt = self.query_one(PromptInput)
        try:
            command = parse_command(text)
        except CommandError as err:
            await self.add_note(str(err), "error")
            return
        if command is not None:
            prompt.clear()
            await self.run_command(command)
            return
        if self.engine is None:
            self.notify("the model is not loaded", severity="warning")
            return
        if self.turn is not None:
            self.notify("still answering: Esc stops the answer", severity="warning")
            return
        prompt.clear()
        await self.send(message_text(text))

    async def send(self, text: str) -> None:
        """Add a user turn and start answering it."""
        conversation = self.query_one(Conversation)
        self.messages.append({"role": "user", "content": text})
        await conversation.mount(UserMessage(text))
        widget = AssistantMessage(TokenText(self.engine.tokenizer))
        await conversation.mount(widget)
        self.turn = Turn(self.chat_messages(), self.settings.options(), widget, text)
        self.generating = True
        self._show_status()
        self._generate(self.turn)

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, turn: Turn) -> None:
        from tide_local.diffusion import BlockEvent, StepEvent

        with self._engine_lock:
            if turn.stop.is_set() or self._closing:
                self.post_message(AnswerEnded(turn))
                return
            eng, events, result = self.engine, None, None
            try:
                ids = eng.chat_prompt(turn.messages)
                stops = eng.chat_stop_ids()
                turn.live = LiveAnswer(len(ids), turn.options["max_new_tokens"], stops, eng.mask_id)
                events = eng.stream(ids, stop_ids=stops, **turn.options)
                for event in events:
                    if isinstance(event, StepEvent):
                        turn.live.step(event)
                    elif isinstance(event, BlockEvent):
                        turn.live.block(event)
                    else:
                        result = event
                        break
                    if not turn.wake_pending:
                        turn.wake_pending = True
                        self.post_message(Progress(turn))
                    if turn.stop.is_set():
                        break
            except Exception as err:  # shown in the app; the conversation goes on
                self.post_message(AnswerEnded(turn, error=err))
                return
            finally:
                if events is not None:
                    events.close()
            self.post_message(AnswerEnded(turn, result=result))

    def on_progress(self, message: Progress) -> None:
        turn = message.turn
        if turn is not self.turn or turn.draw_scheduled:
            return
        wait = turn.last_draw + FRAME_SECONDS - time.perf_counter()
        if wait > 0:
            turn.draw_scheduled = True
            self.set_timer(wait, lambda: self._draw(turn))
        else:
            self._draw(turn)

    def _draw(self, turn: Turn) -> None:
        turn.draw_scheduled = False
        if turn is not self.turn or turn.live is None:
            return
        turn.wake_pending = False  # before the snapshot: a step after it wakes us again
        snap = turn.live.snapshot()
        turn.last_draw = time.perf_counter()
        turn.widget.draw(snap)
        self._show_live_status(snap)

    async def on_answer_ended(self, message: AnswerEnded) -> None:
        turn = message.turn
        if turn is not self.turn:  # the conversation was reset meanwhile
            return
        try:
            await self._end_turn(turn, message.result, message.error)
        finally:  # the turn counts as running until its message is final
            self.turn = None
            self.generating = False
            self._show_status()

    async def _end_turn(self, turn: Turn, result, error: BaseException | None) -> None:
        if result is not None:
            stats = self.last_stats = result.stats
            self.messages.append({"role": "assistant", "content": result.text})
            await turn.widget.finish(result.text, turn_footer(stats))
            return
        partial = turn.live.partial_ids() if turn.live is not None else []
        if error is not None and not partial:
            await self._unsend(turn, error)
            return
        text = self.engine.tokenizer.decode(partial) if partial else ""
        self.messages.append({"role": "assistant", "content": text})
        footer = f"{'stopped' if error is None else 'failed'} · {len(partial)} tokens kept"
        if turn.live is not None:
            snap = turn.live.snapshot()
            footer += f" · {snap.steps} steps · {snap.seconds:.1f} s"
        await turn.widget.finish(text, footer, stopped=True)
        if error is not None:
            await self.add_note(f"generation failed: {describe_error(error)}\n"
                                "The answer so far is kept in the conversation.", "error", "error")

    async def _unsend(self, turn: Turn, error: BaseException) -> None:
        """An answer that failed before its first token: take the user turn back out of the
        conversation (so the next message does not fail the same way) and into the input."""
        if self.messages and self.messages[-1] == {"role": "user", "content": turn.user_text}:
            self.messages.pop()
        await turn.widget.remove()
        text = describe_error(error)
        hints = ["The message was not added to the conversation."]
        prompt = self.query_one(PromptInput)
        if not prompt.text.strip():
            prompt.text = turn.user_text
            prompt.move_cursor(prompt.document.end)
            hints[0] += " It is back in the input."
        if "context" in text:
            hints.append("Start a new conversation (Ctrl+N or /reset), shorten the message, "
                         "or lower the answer length (/set max_new_tokens N).")
        await self.add_note(text + "\n" + " ".join(hints), "error", "error")

    # -- status line -----------------------------------------------------------------------------
    def _status_head(self) -> str:
        if self.engine is None:
            return "no model" if self.load_error else "loading"
        return placement_text(self.engine)

    def _show_status(self) -> None:
        out = Text()
        out.append(self._status_head(), style="bold")
        if self.last_stats is not None:
            out.append("  " + speed_text(self.last_stats))
            offload = offload_text(self.last_stats, self.engine.plan if self.engine else None)
            if offload:
                out.append("  " + offload)
        elif self.engine is not None and self.engine.plan is not None:
            out.append(f"  device memory {self.engine.plan.total_bytes / 2**20:.0f} MiB")
        self.query_one(StatusLine).update(out)

    def _show_live_status(self, snap: Snapshot) -> None:
        out = Text()
        out.append(self._status_head(), style="bold")
        out.append("  " + live_text(snap))
        self.query_one(StatusLine).update(out)

    # -- commands and keys -----------------------------------------------------------------------
    async def run_command(self, command: Command) -> None:
        try:
            if command.name == "reset":
                await self.action_new_conversation()
            elif command.name == "system":
                await self._system(command.argument)
            elif command.name == "set":
                if not command.argument:
                    await self.add_note(self.settings.describe(), title="generation options")
                else:
                    await self.add_note(self.settings.set(command.argument))
            elif command.name == "stats":
                await self.add_note(stats_text(self.last_stats, self.engine, self.settings), title="stats")
            elif command.name == "help":
                self.action_help()
            elif command.name == "quit":
                self.exit()
        except CommandError as err:
            await self.add_note(str(err), "error")

    async def _system(self, text: str) -> None:
        if not text:
            await self.add_note(f"system prompt: {self.system}" if self.system else
                                "no system prompt (/system TEXT sets one)")
        elif text.lower() == "off":
            self.system = None
            await self.add_note("system prompt removed")
        else:
            self.system = text
            await self.add_note(f"system prompt set for the next answers: {text}")

    def check_action(self, action: str, parameters) -> bool | None:
        if action == "stop":
            return True if self.generating else None
        return True

    def action_stop(self) -> None:
        if self.turn is not None and not self.turn.stop.is_set():
            self.turn.stop.set()
            self.notify("stopping after the current step")

    async def action_new_conversation(self) -> None:
        if self.turn is not None:  # its result will be ignored
            self.turn.stop.set()
            self.turn = None
            self.generating = False
        self.messages.clear()
        self.last_stats = None
        await self.query_one(Conversation).remove_children()
        note = "new conversation"
        if self.system:
            note += f" · system prompt: {self.system}"
        await self.add_note(note)
        self._show_status()
        if self.engine is not None:
            self.query_one(PromptInput).focus()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    # -- shutdown --------------------------------------------------------------------------------
    def close_engine(self) -> None:
        """Stop any answer, wait for the step being computed, and release the model."""
        self._closing = True
        if self.turn is not None:
            self.turn.stop.set()
        if not self._engine_lock.acquire(timeout=SHUTDOWN_WAIT_SECONDS):
            return  # a step that never ends: leave the model to the process exit
        try:
            if self.engine is not None:
                self.engine.close()
                self.engine = None
        finally:
            self._engine_lock.release()

    def on_unmount(self) -> None:
        self.close_engine()
