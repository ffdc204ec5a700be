"""Decoding several prompts together: one forward per step over every running sequence.

Each sequence runs the same decoding program as a solo decode (`decoder.decode_program`); the
driver here collects one request from each (a prefill chunk, a step's block logits, a block
commit), runs them as one pass of the :class:`BatchModel` and hands each program its reply.
Sequences join whenever they are added (their prefill rides along a chunk per pass, so a long
prompt never stalls the others for more than one chunk) and leave when they finish; each one's
events and result are what its solo decode would give, as long as the model computes a
sequence's rows in a batch as it would alone (true for ggml's CPU kernels except K-quants'
tiled matmul: see the README on exactness).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Collection, Protocol, Sequence

import numpy as np

from .blockmodel import PassInfo
from .decoder import (BlockEvent, BlockLogits, CommitBlock, DecodeResult, Prefill, StepEvent, check_request,
                      decode_program)
from .options import DecodeOptions

__all__ = ["BatchModel", "BatchPart", "BatchDecoder", "SequenceFailed"]


@dataclass(frozen=True)
class BatchPart:
    """One sequence's share of a batched pass: `tokens` at positions [start, start+len) of the
    sequence's cache; `rows` (indices into tokens) want logits, None for none."""

    key: Hashable
    tokens: np.ndarray
    start: int
    rows: np.ndarray | None
    info: PassInfo


class BatchModel(Protocol):
    """What the batch driver needs: a KV cache per sequence and one forward over many parts."""

    block_length: int

    def open_sequence(self, key: Hashable, n_positions: int) -> None:
        """Give the sequence `key` an empty cache for positions [0, n_positions)."""

    def close_sequence(self, key: Hashable) -> None:
        """The sequence is done: its cache may go."""

    def prefill_chunk(self, n_tokens: int) -> int:
        """How many tokens of a prefill of `n_tokens` one pass takes (a multiple of block_length)."""

    def forward(self, parts: list[BatchPart]) -> list[np.ndarray | None]:
        """One pass over the parts; per part the logits of its rows (None where rows is None)."""


@dataclass(frozen=True)
class SequenceFailed:
    """A sequence's decode raised (its program, not the forward): it has left the batch."""

    error: BaseException


@dataclass
class _Sequence:
    key: Hashable
    program: object  # decode_program's generator
    cancel: object
    request: object = None  # what it waits for
    chunks: list[tuple[int, int]] = field(default_factory=list)  # a prefill's (start, end) still to run


class BatchDecoder:
    """Decodes up to `max_batch` sequences together. `add` a prompt under a key; each `step`
    runs one pass and returns the (key, event) pairs it produced: StepEvents, BlockEvents,
    the DecodeResult that ends a sequence, or SequenceFailed."""

    def __init__(self, model: BatchModel, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.model, self.max_batch = model, max_batch
        self._running: dict[Hashable, _Sequence] = {}
        self._joining: list[_Sequence] = []

    @property
    def running(self) -> int:
        """Sequences in the batch (joined or about to)."""
        return len(self._running)

    def has_room(self) -> bool:
        return len(self._running) < self.max_batch

    def add(self, key: Hashable, prompt: Sequence[int], options: DecodeOptions, *, mask_id: int,
            stop_ids: Collection[int], cancel=None) -> None:
        """Join the batch at the next step. Validated as a solo decode is (ValueError); a full
        batch or a key in use is a RuntimeError / KeyError."""
        if not self.has_room():
            raise RuntimeError(f"the batch is full ({self.max_batch} sequences)")
        if key in self._running:
            raise KeyError(f"a sequence '{key}' is decoding already")
        tokens, stops = check_request(prompt, options, mask_id, stop_ids, self.model.block_length)
        B = options.block_length
        self.model.open_sequence(key, -(-(tokens.size + options.max_new_tokens) // B) * B)
        seq = _Sequence(key, decode_program(tokens, options, int(mask_id), stops, cancel), cancel)
        self._running[key] = seq
        self._joining.append(seq)

    def step(self) -> list[tuple[Hashable, object]]:
        """Run one pass over every running sequence's next request (nothing when none runs)."""
        events: list[tuple[Hashable, object]] = []
        for seq in self._joining:
            self._advance(seq, None, events)
        self._joining = []
        active = [seq for seq in self._running.values() if seq.request is not None]
        if not active:
            return events
        parts = [self._part(seq) for seq in active]
        outputs = self.model.forward(parts)
        for seq, out in zip(active, outputs):
            if isinstance(seq.request, Prefill):
                seq.chunks.pop(0)
                if seq.chunks and not (seq.cancel is not None and seq.cancel.is_set()):
                    continue  # more chunks (a cancelled sequence skips them: it ends before its first step)
                seq.chunks = []
            self._advance(seq, out if isinstance(seq.request, BlockLogits) else None, events)
        return events

    def _part(self, seq: _Sequence) -> BatchPart:
        req, B = seq.request, self.model.block_length
        if isinstance(req, Prefill):
            start, end = seq.chunks[0]
            return BatchPart(seq.key, req.tokens[start:end], start, None, PassInfo("prefill"))
        if isinstance(req, BlockLogits):
            return BatchPart(seq.key, req.block, req.start, req.rows, PassInfo.step_at(req.start, B, req.step))
        return BatchPart(seq.key, req.block, req.start, None, PassInfo.commit_at(req.start, B))

    def _advance(self, seq: _Sequence, reply, events: list) -> None:
        """Run the sequence's program up to its next forward, collecting its events."""
        try:
            while True:
                item = seq.program.send(reply)
                reply = None
                if isinstance(item, (StepEvent, BlockEvent)):
                    events.append((seq.key, item))
                elif isinstance(item, DecodeResult):
                    events.append((seq.key, item))
                    self._leave(seq)
                    return
                elif isinstance(item, Prefill):
                    n = item.tokens.size
                    if n == 0:
                        continue  # nothing to prefill: the sequence's cache starts empty
                    chunk = self.model.prefill_chunk(n)
                    seq.request, seq.chunks = item, [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
                    return
                elif isinstance(item, (BlockLogits, CommitBlock)):
                    seq.request = item
                    return
        except StopIteration:
            self._leave(seq)
        except Exception as err:  # this sequence's decode failed; the batch goes on
            events.append((seq.key, SequenceFailed(err)))
            self._leave(seq)

    def _leave(self, seq: _Sequence) -> None:
        seq.request = None
        if self._running.pop(seq.key, None) is not None:
            self.model.close_sequence(seq.key)

    def close(self) -> None:
        """Drop every sequence (their caches go)."""
        for seq in list(self._running.values()):
            seq.program.close()
            self._leave(seq)
        self._joining = []
