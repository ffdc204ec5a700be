"""An answer's text as its blocks finish, cut at the first stop string.

Streamed and whole answers are both made of these parts, so a stream concatenated is the
whole answer. The stop strings are OpenAI's ``stop``: text, unlike the engine's stop ids."""

from __future__ import annotations

from collections.abc import Sequence

from tide_local.generate_cli import TextDeltas


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first stop string in `text` begins (None: none occurs)."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` could begin a stop string: they wait for the next
    part (the longest such tail, so no stop string can start in what is handed out)."""
    longest = max((len(s) for s in stops), default=0)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[start:]
        if any(s.startswith(tail) for s in stops):
            return len(text) - start
    return 0


class AnswerText:
    """The new text of an answer, part by part: complete characters (TextDeltas), cut before the
    first stop string. `stopped` tells that one was found: the rest of the answer is not needed."""

    def __init__(self, tokenizer, stops: Sequence[str] = ()):
        self._deltas = TextDeltas(tokenizer)
        self._stops = list(stops)
        self._pending = ""  # the tail that may begin a stop string
        self.text = ""  # handed out so far
        self.stopped = False

    def block(self, answer) -> str:
        """The new text once a block's answer tokens (BlockEvent.answer) are added."""
        return self._take(self._deltas.block(answer), final=False)

    def finish(self, text: str) -> str:
        """The rest, given the whole answer's text (GenerationResult.text)."""
        return self._take(self._deltas.advance(text), final=True)

    def _take(self, new: str, *, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._pending + new
        cut = first_stop(text, self._stops)
        if cut is not None:
            self.stopped, out, self._pending = True, text[:cut], ""
        else:
            keep = 0 if final else _held(text, self._stops)
            out, self._pending = text[:len(text) - keep], text[len(text) - keep:]
        self.text += out
        return out
