"""What the worker threads tell the UI thread (textual messages), and the turn they share."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from textual.message import Message

from .live import LiveAnswer
from .widgets import AssistantMessage


class LoadStage(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class Loaded(Message):
    def __init__(self, engine, path: str, seconds: float) -> None:
        super().__init__()
        self.engine, self.path, self.seconds = engine, path, seconds


class LoadFailed(Message):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error


@dataclass(eq=False)
class Turn:
    """One answer being generated."""

    messages: list[dict]  # what the model reads: system prompt and conversation, the new user turn last
    options: dict  # decoder options for Engine.stream
    widget: AssistantMessage
    user_text: str
    stop: threading.Event = field(default_factory=threading.Event)
    live: LiveAnswer | None = None
    wake_pending: bool = False  # a Progress message is on its way to the UI
    draw_scheduled: bool = False
    last_draw: float = 0.0


class Progress(Message):
    def __init__(self, turn: Turn) -> None:
        super().__init__()
        self.turn = turn


class AnswerEnded(Message):
    """The worker is done with a turn: a result, a stop, or an error."""

    def __init__(self, turn: Turn, result=None, error: BaseException | None = None) -> None:
        super().__init__()
        self.turn, self.result, self.error = turn, result, error
