"""What the decoder needs from a model, and an adapter for models without a KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol, runtime_checkable

import numpy as np

__all__ = ["BlockModel", "WindowModel", "PassInfo"]

PassKind = Literal["prefill", "step", "commit", "forward", "batch"]


@dataclass(frozen=True)
class PassInfo:
    """What one forward pass is for, as the decoder knows it (and the expert offload needs:
    TIDE refreshes at a block's steps 0, tau, 2 tau, ... and never on a commit).

    kind: ``prefill`` (a chunk of the prompt's full blocks), ``step`` (a denoising step of
    block ``block``, its ``step``-th, counted from 0 in every block and every generation),
    ``commit`` (the finished block's K/V written once more with its final tokens),
    ``forward`` (a plain forward outside decoding, e.g. ``Engine.logits``) or ``batch`` (several
    sequences' requests in one pass, ``step`` counting such passes from 0: the sequences are at
    different steps of their blocks, so the batch keeps one clock for the offload)."""

    kind: PassKind
    block: int = -1  # the block being decoded (its index from position 0); -1 when none
    step: int = 0

    @property
    def refreshes(self) -> bool:
        """Whether the offload may change its resident experts before this pass."""
        return self.kind != "commit"

    @classmethod
    def plain(cls) -> "PassInfo":
        return cls("forward")

    @classmethod
    def step_at(cls, start: int, block_length: int, step: int) -> "PassInfo":
        """The ``step``-th denoising step of the block that begins at position ``start``."""
        return cls("step", start // block_length, step)

    @classmethod
    def commit_at(cls, start: int, block_length: int) -> "PassInfo":
        """The commit of the block that begins at position ``start``."""
        return cls("commit", start // block_length)


@runtime_checkable
class BlockModel(Protocol):
    """A block-causal model with a cache of finished blocks, driven by :func:`iter_decode`.

    Call order for one generation: ``prefill`` once; then for each block, one or more
    ``block_logits`` with the same ``start``, then ``commit_block`` at that ``start`` unless it is
    the last block of the generation (whose K/V nothing would read). Arrays passed in are the
    decoder's own copies.
    """

    block_length: int

    def prefill(self, tokens: np.ndarray) -> None:
        """Reset the cache and write the K/V of ``tokens`` (int32, the prompt's full blocks at
        positions 0..n-1, n a multiple of ``block_length``, possibly 0)."""

    def block_logits(self, block: np.ndarray, start: int, rows: np.ndarray, step: int = 0) -> np.ndarray:
        """Logits of the active block. ``block``: int32 ``[block_length]`` at absolute positions
        ``start..start+block_length-1``, attending to the cache (everything before ``start``) and to
        the whole block. ``rows``: ascending int64 indices into the block (its masked positions).
        ``step``: the denoising step within the block (0 at its first). Returns float32
        ``[len(rows), vocab]``."""

    def commit_block(self, block: np.ndarray, start: int) -> None:
        """The block is final: write its K/V into the cache at ``start``."""


LogitsFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


class WindowModel:
    """A :class:`BlockModel` without a KV cache: every step forwards the whole window.

    ``logits_fn(tokens, rows)`` forwards ``tokens`` (int32, absolute positions 0..len-1, with the
    block-causal attention mask) and returns float32 logits ``[len(rows), vocab]`` of the absolute
    positions ``rows``. The adapter keeps the committed canvas itself: ``prefill`` stores the
    prompt's full blocks, ``block_logits`` forwards them + earlier blocks + the active block, and
    ``commit_block`` appends the block. ``forwards`` counts ``logits_fn`` calls and
    ``forwarded_tokens`` the tokens they covered, for comparisons with a cached model.
    A subclass that needs to know which step a forward is for overrides ``window_logits``.
    """

    def __init__(self, logits_fn: LogitsFn, block_length: int = 32):
        if block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {block_length}")
        self.logits_fn = logits_fn
        self.block_length = int(block_length)
        self._tokens = np.zeros(0, dtype=np.int32)
        self.forwards = 0
        self.forwarded_tokens = 0

    @property
    def tokens(self) -> np.ndarray:
        """The committed tokens (prompt full blocks + committed blocks), read-only view."""
        view = self._tokens.view()
        view.flags.writeable = False
        return view

    def prefill(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if tokens.size % self.block_length:
            raise ValueError(
                f"prefill takes whole blocks: {tokens.size} tokens is not a multiple of {self.block_length}"
            )
        self._tokens = tokens.copy()

    def _check(self, block: np.ndarray, start: int) -> np.ndarray:
        block = np.asarray(block, dtype=np.int32).reshape(-1)
        if block.size != self.block_length:
            raise ValueError(f"a block has {self.block_length} tokens, got {block.size}")
        if start != self._tokens.size:
            raise ValueError(f"block at {start} does not follow the committed tokens (0..{self._tokens.size - 1})")
        return block

    def block_logits(self, block: np.ndarray, start: int, rows: np.ndarray, step: int = 0) -> np.ndarray:
        block = self._check(block, start)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        window = np.concatenate([self._tokens, block])
        self.forwards += 1
        self.forwarded_tokens += window.size
        info = PassInfo.step_at(start, self.block_length, step)
        logits = np.asarray(self.window_logits(window, start + rows, info), dtype=np.float32)
        if logits.ndim != 2 or logits.shape[0] != rows.size:
            raise ValueError(f"logits_fn returned shape {logits.shape} for {rows.size} rows")
        return logits

    def window_logits(self, window: np.ndarray, rows: np.ndarray, info: PassInfo) -> np.ndarray:
        """Forward the whole window for the pass `info` (a step of the active block)."""
        return self.logits_fn(window, rows)

    def commit_block(self, block: np.ndarray, start: int) -> None:
        self._tokens = np.concatenate([self._tokens, self._check(block, start)])
