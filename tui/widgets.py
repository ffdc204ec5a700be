"""The chat app's widgets: the input, the turns of the conversation, the status line,
the loading view and the help screen. Styles are in app.tcss."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import LoadingIndicator, Markdown, Static, TextArea

from .commands import COMMANDS
from .live import CanvasStyles, Snapshot, TokenText, printable, render_answer, render_map

NEWLINE_KEYS = ("ctrl+j", "shift+enter")


class PromptInput(TextArea):
    """The message input: Enter sends, Ctrl+J (or Shift+Enter, where the terminal reports
    it) inserts a newline. Long lines wrap."""

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, tab_behavior="focus", **kwargs)

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class UserMessage(Static):
    """A user turn (the text as typed: no markup, no Markdown)."""

    def __init__(self, text: str) -> None:
        super().__init__(Text(printable(text)), markup=False)
        self.text = text
        self.border_title = "you"


class Note(Static):
    """A line from the app in the conversation: information (class "info") or an error ("error")."""

    def __init__(self, text: str, kind: str = "info", title: str | None = None) -> None:
        super().__init__(Text(printable(text)), markup=False, classes=kind + (" titled" if title else ""))
        self.text = text
        if title:
            self.border_title = title


class AssistantMessage(Vertical):
    """An assistant turn. While it is decoded: the finished blocks' text running into the
    active block's live canvas, and a map of the block. Once it ends: Markdown and a line
    of statistics."""

    COMPONENT_CLASSES = {"canvas--token", "canvas--fresh", "canvas--mask", "canvas--cut", "canvas--prompt"}

    def __init__(self, words: TokenText | None = None) -> None:
        super().__init__()
        self.words = words
        self.text = ""
        self.finished = False
        self.border_title = "assistant"

    def compose(self) -> ComposeResult:
        yield Static(Text("thinking", style="italic"), classes="body", markup=False)
        yield Static("", classes="map", markup=False)

    def _styles(self) -> CanvasStyles:
        style = self.get_component_rich_style
        return CanvasStyles(token=style("canvas--token"), fresh=style("canvas--fresh"), mask=style("canvas--mask"),
                            cut=style("canvas--cut"), prompt=style("canvas--prompt"))

    def draw(self, snap: Snapshot) -> None:
        if self.finished or self.words is None:
            return
        styles = self._styles()
        self.query_one(".body", Static).update(render_answer(snap, self.words, styles))
        self.query_one(".map", Static).update(render_map(snap, styles))

    async def finish(self, text: str, footer: str, stopped: bool = False) -> None:
        """Show the final answer as Markdown with `footer` under it."""
        self.finished = True
        self.text = text
        body = self.query_one(".body", Static)
        if text.strip():
            await self.mount(Markdown(printable(text), classes="answer"), before=body)
        else:
            await self.mount(Static(Text("(no text)", style="italic"), classes="answer empty"), before=body)
        await body.remove()
        self.query_one(".map", Static).update(Text(footer))
        self.set_class(stopped, "stopped")


class Conversation(VerticalScroll):
    """The turns, oldest first; stays scrolled to the newest unless the user scrolls up."""

    def on_mount(self) -> None:
        self.anchor()


class StatusLine(Static):
    """Model and device on the left, the speed of the last (or current) answer after it."""


class LoadingView(Vertical):
    """Shown while the model loads: a spinner and what is being done."""

    def compose(self) -> ComposeResult:
        yield LoadingIndicator()
        yield Static("", id="loading-stage", markup=False)

    def show(self, lines: list[str]) -> None:
        self.query_one("#loading-stage", Static).update(Text("\n".join(lines)))


KEYS: list[tuple[str, str]] = [
    ("Enter", "send the message"),
    ("Ctrl+J", "new line in the message (Shift+Enter too, where the terminal reports it)"),
    ("Esc", "stop the answer being generated (what is done of it stays)"),
    ("Ctrl+N", "new conversation"),
    ("F1", "this help"),
    ("Ctrl+Q", "quit"),
    ("PgUp/PgDn", "scroll the conversation (also the mouse wheel)"),
]


def help_text() -> Group:
    def table(title: str, rows: list[tuple[str, str]]) -> Table:
        grid = Table.grid(padding=(0, 2))
        grid.title, grid.title_justify, grid.title_style = title, "left", "bold"
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        for name, what in rows:
            grid.add_row(name, what)
        return grid

    legend = Text("While an answer is decoded, its active block of 32 tokens is drawn live: ░░ marks a "
                  "still-masked position, highlighted text was committed at the latest denoising step, and "
                  "the bar under it maps the block (· prompt, ░ masked, █ committed).")
    return Group(table("Keys", KEYS), Text(""), table("Commands", COMMANDS), Text(""), legend)


class HelpScreen(ModalScreen[None]):
    """Keys and slash commands."""

    BINDINGS = [Binding("escape,f1,q,enter", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help") as box:
            box.border_title, box.border_subtitle = "tide chat", "Esc closes"
            yield Static(help_text(), markup=False)

    def on_click(self) -> None:
        self.dismiss()
