"""An answer while it is decoded: the state the generation worker writes and the UI draws.

The worker records every denoising step (:class:`LiveAnswer.step`) and finished block
(:class:`LiveAnswer.block`); the UI takes a :class:`Snapshot` when it draws, at most once a
frame, so any number of steps between two frames cost one redraw.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
from rich.style import Style
from rich.text import Text

MASK = " ░░"  # a still-masked position: about a short word wide
END = " ⏎"  # a stop id (end of turn / text): the answer ends there
PROMPT_CELL, MASK_CELL, TOKEN_CELL = "·", "░", "█"


# Control characters (a model can emit any byte) drawn as their Unicode pictures: a raw one
# would move the terminal's cursor or break an SVG screenshot.
_CONTROL_PICTURES = {c: 0x2400 + c for c in range(32) if chr(c) not in "\n\t"}
_CONTROL_PICTURES[0x7F] = 0x2421


def printable(text: str) -> str:
    """`text` for the screen: control characters other than newline and tab made visible."""
    return text.translate(_CONTROL_PICTURES)


@dataclass(frozen=True)
class Snapshot:
    ids: tuple[int, ...]  # generated ids of the finished blocks (cut at a stop id or the token limit)
    canvas: np.ndarray | None  # the active block's tokens, mask_id where still masked; None between blocks
    start: int  # absolute position of the active block's first token
    block: int  # 1-based block number within the answer
    step: int  # steps taken in the active block
    commit_step: np.ndarray | None  # per block position: the answer-wide step that committed it, -1 if masked
    steps: int  # steps taken in the whole answer
    tokens: int  # answer tokens committed so far (finished blocks and the active one)
    seconds: float  # since decoding started
    n_prompt: int
    limit: int  # absolute position where the answer is cut (prompt + max_new_tokens)
    mask_id: int
    stop_ids: frozenset


class LiveAnswer:
    """Decoding progress of one answer, shared by the generation worker and the UI."""

    def __init__(self, n_prompt: int, max_new_tokens: int, stop_ids, mask_id: int):
        self.n_prompt, self.limit, self.mask_id = n_prompt, n_prompt + max_new_tokens, int(mask_id)
        self.stop_ids = frozenset(int(s) for s in stop_ids)
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._ended = False
        self._canvas: np.ndarray | None = None
        self._commit_step: np.ndarray | None = None
        self._start = 0
        self._block_steps = 0
        self._steps = 0
        self._tokens_done = 0  # answer tokens of finished blocks, before the cut
        self._started = time.perf_counter()

    # -- the worker's side ---------------------------------------------------------------
    def step(self, event) -> None:
        with self._lock:
            if self._canvas is None or event.start != self._start:
                self._start = int(event.start)
                self._commit_step = np.full(len(event.canvas), -1, dtype=np.int64)
                self._block_steps = 0
            self._canvas = np.array(event.canvas, copy=True)
            self._commit_step[np.asarray(event.committed, dtype=np.int64)] = self._steps
            self._steps += 1
            self._block_steps += 1

    def block(self, event) -> None:
        with self._lock:
            if not self._ended:
                answer = [int(t) for t in event.answer]
                self._ids.extend(answer)
                self._tokens_done += len(answer)
                # the decoder cuts a block's answer at the limit or a stop id: nothing follows it
                self._ended = bool(answer) and (answer[-1] in self.stop_ids or
                                                self.n_prompt + len(self._ids) >= self.limit)
            self._canvas = None
            self._commit_step = None

    # -- the UI's side -------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            canvas = None if self._canvas is None else self._canvas.copy()
            commits = None if self._commit_step is None else self._commit_step.copy()
            active = 0
            if canvas is not None:
                positions = self._start + np.arange(len(canvas))
                answer = (positions >= self.n_prompt) & (positions < self.limit)
                active = int(np.count_nonzero(answer & (canvas != self.mask_id)))
            first_block = self.n_prompt // len(canvas) if canvas is not None and len(canvas) else 0
            return Snapshot(
                ids=tuple(self._ids), canvas=canvas, start=self._start,
                block=(self._start // len(canvas) - first_block + 1) if canvas is not None else 0,
                step=self._block_steps, commit_step=commits, steps=self._steps,
                tokens=self._tokens_done + active, seconds=time.perf_counter() - self._started,
                n_prompt=self.n_prompt, limit=self.limit, mask_id=self.mask_id, stop_ids=self.stop_ids,
            )

    def partial_ids(self) -> list[int]:
        """What a stopped answer keeps: the finished blocks, then the active block's committed
        tokens up to its first still-masked position."""
        with self._lock:
            ids = list(self._ids)
            if self._canvas is None or self._ended:
                return ids
            for offset, token in enumerate(self._canvas):
                pos = self._start + offset
                if pos < self.n_prompt:
                    continue
                if pos >= self.limit or int(token) == self.mask_id:
                    break
                ids.append(int(token))
                if int(token) in self.stop_ids:
                    break
            return ids


class TokenText:
    """Decodes for drawing: the answer so far, and single tokens (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._pieces: dict[int, str] = {}
        self._text_key: tuple[int, ...] | None = None
        self._text = ""

    def piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = printable(self.tokenizer.decode([token]))
        return self._pieces[token]

    def text(self, ids: tuple[int, ...]) -> str:
        """The decoded answer; trailing U+FFFD (a character whose other bytes are still to
        come) are held back."""
        if ids != self._text_key:
            self._text_key, self._text = ids, printable(self.tokenizer.decode(list(ids)).rstrip("\ufffd"))
        return self._text


@dataclass
class CanvasStyles:
    token: Style
    fresh: Style  # committed at the latest step
    mask: Style
    cut: Style  # decoded but not part of the answer: past a stop id or the token limit
    prompt: Style


def render_answer(snap: Snapshot, words: TokenText, styles: CanvasStyles) -> Text:
    """The finished blocks' text followed by the live block: committed tokens as text,
    masked positions as placeholders, the latest commits highlighted."""
    out = Text(words.text(snap.ids))
    if snap.canvas is None:
        return out
    ended = bool(snap.ids) and snap.ids[-1] in snap.stop_ids
    for offset, token in enumerate(snap.canvas.tolist()):
        pos = snap.start + offset
        if pos < snap.n_prompt:
            continue
        if token == snap.mask_id:
            out.append(MASK, styles.mask)
            continue
        cut = ended or pos >= snap.limit
        fresh = snap.commit_step[offset] >= snap.steps - 1
        style = styles.cut if cut else styles.fresh if fresh else styles.token
        if token in snap.stop_ids:
            out.append(END, style if fresh or cut else styles.mask)
            ended = True
        else:
            out.append(words.piece(token), style)
    return out


def render_map(snap: Snapshot, styles: CanvasStyles) -> Text:
    """The block and its step, then one cell per block position: prompt tail, masked,
    committed, just committed."""
    out = Text()
    if snap.canvas is None:
        out.append(f"between blocks · {snap.tokens} tokens", styles.mask)
        return out
    out.append(f"block {snap.block} · step {snap.step:>2} ", styles.mask)
    out.append("▕", styles.mask)
    masked = 0
    for offset, token in enumerate(snap.canvas.tolist()):
        if snap.start + offset < snap.n_prompt:
            out.append(PROMPT_CELL, styles.prompt)
        elif token == snap.mask_id:
            masked += 1
            out.append(MASK_CELL, styles.mask)
        elif snap.commit_step[offset] >= snap.steps - 1:
            out.append(TOKEN_CELL, styles.fresh)
        else:
            out.append(TOKEN_CELL, styles.token)
    out.append("▏", styles.mask)
    out.append(f" {masked:>2} masked", styles.mask)
    return out
