"""The block-diffusion loop of LLaDA2.0, independent of how logits are computed.

Semantics (the HF reference's ``generate``, with the greedy rule of SGLang / dInfer / LLaDA2.1):

* Blocks of ``block_length`` tokens are aligned at position 0. The canvas is the whole blocks
  covering prompt + ``max_new_tokens`` (``ceil((P + max_new_tokens) / B)`` blocks), mask ids past
  the prompt. Positions past ``max_new_tokens`` in the last block are decoded too (through in-block
  attention they shape the others) and cut at the end.
* The prompt's full blocks are prefilled; decoding starts at block ``P // B`` (prompt tail + masks).
  Prompt tokens are never candidates, not even a mask id inside the prompt.
* ``steps = min(steps, max_new_tokens)`` and the per-step quota splits ``block_length`` over
  ``steps`` (base ``B // steps``, the first ``B % steps`` steps one more): 1 per step by default.
  Each step: stop the block if no masked position is left; choose a token and confidence for every
  masked position (:mod:`.sampling`); if at least ``quota`` of them have confidence strictly above
  ``threshold`` commit all those, else the ``min(quota, #masked)`` most confident (ties: lowest
  position). Committed tokens are never re-masked. The quotas add up to ``B``, so ``steps`` steps
  always finish a block.
* A masked position is one holding ``mask_id``. As in the reference, nothing stops a model from
  choosing ``mask_id`` itself; such a position simply stays masked.
* Decoding stops after the first block whose generated part holds a stop id. The result is the
  generated ids (positions P..) up to and including the first stop id, at most ``max_new_tokens``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Collection, Iterator, Sequence

import numpy as np

from .blockmodel import BlockModel
from .sampling import choose_tokens, select_commits, transfer_schedule

__all__ = ["DecodeOptions", "StepEvent", "BlockEvent", "DecodeResult", "iter_decode", "decode"]


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass
class DecodeOptions:
    """Decoding settings. Defaults follow the model: greedy, block 32, 32 steps, threshold 0.95.

    ``top_k`` / ``top_p`` only act when ``temperature > 0``: at temperature 0 the token is the
    argmax of the full row, which neither filter can change, and its confidence is the unfiltered
    softmax probability. ``seed`` seeds the sampler (``None``: fresh entropy each run).
    """

    max_new_tokens: int = 256
    threshold: float = 0.95
    steps: int = 32
    block_length: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def validate(self) -> "DecodeOptions":
        """Raise ValueError naming the first bad setting; return self."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_real(self.threshold) or not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not _is_int(self.block_length) or self.block_length < 1:
            raise ValueError(f"block_length must be an integer >= 1, got {self.block_length!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        if self.top_p is not None and (not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {self.seed!r}")
        return self


@dataclass
class StepEvent:
    """One denoising step of block ``block_index`` (absolute positions ``start..start+B-1``).

    ``canvas``: the block's tokens after the step (prompt tail included; ``mask_id`` where still
    masked). ``committed``: positions within the block committed this step (ascending);
    ``confidences``: their confidences."""

    block_index: int
    step: int
    start: int
    canvas: np.ndarray
    committed: np.ndarray
    confidences: np.ndarray


@dataclass
class BlockEvent:
    """A finished block: its final tokens (prompt tail included) and the steps it took."""

    block_index: int
    start: int
    tokens: np.ndarray
    steps: int


@dataclass
class DecodeResult:
    """The generated ids and statistics.

    ``stats``: ``blocks`` (blocks denoised), ``steps`` (denoising steps = model forwards),
    ``tokens`` (ids returned), ``tokens_per_step``, ``seconds`` (time spent in decoding, prefill
    included, not counting time the consumer of :func:`iter_decode` spends between events),
    ``tokens_per_second``, ``prefill_seconds``, ``steps_per_block`` (list), ``prompt_tokens``,
    ``stopped`` (a stop id ended generation)."""

    tokens: list[int]
    stats: dict = field(default_factory=dict)


class _Clock:
    """Accumulates time while running; paused around yields."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since = time.perf_counter()

    def pause(self) -> None:
        self.total += time.perf_counter() - self._since

    def resume(self) -> None:
        self._since = time.perf_counter()


def _prompt_array(prompt: Sequence[int]) -> np.ndarray:
    arr = np.asarray(prompt)
    if arr.ndim != 1:
        raise ValueError(f"the prompt must be a flat sequence of token ids, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"the prompt must hold integer token ids, got {arr.dtype}")
    if arr.min() < 0 or arr.max() > np.iinfo(np.int32).max:
        raise ValueError("the prompt holds a token id outside 0..2^31-1")
    return arr.astype(np.int32)


def iter_decode(
    model: BlockModel,
    prompt: Sequence[int],
    options: DecodeOptions,
    *,
    mask_id: int,
    stop_ids: Collection[int],
) -> Iterator[StepEvent | BlockEvent | DecodeResult]:
    """Decode, yielding a StepEvent per step, a BlockEvent per finished block and the DecodeResult
    last. Raises ValueError (before calling the model) on an empty prompt or invalid options."""
    options.validate()
    tokens = _prompt_array(prompt)
    if not _is_int(mask_id) or mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative integer, got {mask_id!r}")
    B = options.block_length
    model_block = getattr(model, "block_length", B)
    if model_block != B:
        raise ValueError(f"block_length {B} differs from the model's block length {model_block}")
    stops = np.array(sorted({int(s) for s in stop_ids}), dtype=np.int64)
    return _run(model, tokens, options, int(mask_id), stops)


def _run(
    model: BlockModel, prompt: np.ndarray, options: DecodeOptions, mask_id: int, stops: np.ndarray
) -> Iterator[StepEvent | BlockEvent | DecodeResult]:
    B = options.block_length
    P = prompt.size
    max_new = options.max_new_tokens
    quotas = transfer_schedule(B, min(options.steps, max_new))
    num_blocks = -(-(P + max_new) // B)
    first = P // B
    canvas = np.full(num_blocks * B, mask_id, dtype=np.int32)
    canvas[:P] = prompt
    rng = np.random.default_rng(options.seed) if options.temperature > 0 else None
    offsets = np.arange(B)

    clock = _Clock()
    model.prefill(canvas[: first * B].copy())
    prefill_seconds = time.perf_counter() - clock._since

    steps_per_block: list[int] = []
    stopped = False
    for b in range(first, num_blocks):
        start = b * B
        block = canvas[start : start + B]  # view into the canvas
        free = offsets + start >= P  # prompt positions are never candidates
        done = 0
        for step, quota in enumerate(quotas):
            rows = np.flatnonzero((block == mask_id) & free)
            if rows.size == 0:
                break
            logits = np.asarray(model.block_logits(block.copy(), start, rows))
            if logits.ndim != 2 or logits.shape[0] != rows.size:
                raise ValueError(f"block_logits returned shape {logits.shape} for {rows.size} rows")
            chosen, confidence = choose_tokens(
                logits, options.temperature, options.top_k, options.top_p, rng
            )
            pick = select_commits(confidence, options.threshold, quota)
            committed = rows[pick]
            block[committed] = chosen[pick]
            done += 1
            clock.pause()
            yield StepEvent(b, step, start, block.copy(), committed, confidence[pick])
            clock.resume()
        steps_per_block.append(done)
        stopped = bool(stops.size) and bool(np.isin(canvas[P : start + B], stops).any())
        last = stopped or b == num_blocks - 1
        if not last:  # the last block's K/V would never be read
            model.commit_block(block.copy(), start)
        clock.pause()
        yield BlockEvent(b, start, block.copy(), done)
        clock.resume()
        if last:
            break

    generated = canvas[P : P + max_new]
    hits = np.flatnonzero(np.isin(generated, stops)) if stops.size else np.zeros(0, dtype=np.int64)
    if hits.size:
        generated = generated[: hits[0] + 1]
    clock.pause()
    total_steps = sum(steps_per_block)
    n = int(generated.size)
    stats = {
        "blocks": len(steps_per_block),
        "steps": total_steps,
        "tokens": n,
        "tokens_per_step": n / total_steps if total_steps else 0.0,
        "seconds": clock.total,
        "tokens_per_second": n / clock.total if clock.total > 0 else 0.0,
        "prefill_seconds": prefill_seconds,
        "steps_per_block": steps_per_block,
        "prompt_tokens": P,
        "stopped": bool(hits.size),
    }
    yield DecodeResult([int(t) for t in generated], stats)


def decode(
    model: BlockModel,
    prompt: Sequence[int],
    options: DecodeOptions,
    *,
    mask_id: int,
    stop_ids: Collection[int],
) -> DecodeResult:
    """Run :func:`iter_decode` to the end and return its DecodeResult."""
    result = None
    for event in iter_decode(model, prompt, options, mask_id=mask_id, stop_ids=stop_ids):
        result = event
    assert isinstance(result, DecodeResult)
    return result
