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

import time
from dataclasses import dataclass
from typing import Collection, Iterator, Literal, Sequence

import numpy as np

from .blockmodel import BlockModel
from .options import DecodeOptions, _is_int
from .sampling import choose_tokens, select_commits, transfer_schedule

__all__ = ["DecodeOptions", "StepEvent", "BlockEvent", "DecodeStats", "DecodeResult", "FinishReason",
           "iter_decode", "decode", "decode_program", "check_request", "Prefill", "BlockLogits", "CommitBlock"]

FinishReason = Literal["stop", "length", "cancelled"]


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
    """A finished block: its final tokens (prompt tail included), the steps it took, and
    ``answer``: the part of it that belongs to the answer (positions past the prompt, within
    ``max_new_tokens``, up to and including the first stop id). The answer is the
    concatenation of the blocks' ``answer``s."""

    block_index: int
    start: int
    tokens: np.ndarray
    steps: int
    answer: np.ndarray


@dataclass(frozen=True)
class DecodeStats:
    """What one generation did.

    ``seconds`` is time spent in decoding, prefill included, not counting time the consumer of
    :func:`iter_decode` spends between events. ``finish_reason``: ``stop`` (a stop id ended the
    answer), ``length`` (``max_new_tokens`` reached) or ``cancelled`` (the caller's cancel was
    set; the answer is the finished blocks')."""

    prompt_tokens: int
    tokens: int  # ids returned
    blocks: int  # blocks denoised
    steps: int  # denoising steps (= model forwards with logits)
    steps_per_block: tuple[int, ...]
    seconds: float
    prefill_seconds: float
    finish_reason: FinishReason

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_steps_per_block(self) -> float:
        return sum(self.steps_per_block) / len(self.steps_per_block) if self.steps_per_block else 0.0


@dataclass
class DecodeResult:
    """The generated ids and their statistics."""

    tokens: list[int]
    stats: DecodeStats


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


@dataclass(frozen=True)
class Prefill:
    """A request of the decoding program: write the K/V of the prompt's full blocks (a reset)."""

    tokens: np.ndarray


@dataclass(frozen=True)
class BlockLogits:
    """A request: the logits of the active block's rows (the reply the program is sent)."""

    block: np.ndarray
    start: int
    rows: np.ndarray
    step: int


@dataclass(frozen=True)
class CommitBlock:
    """A request: the finished block's K/V, written once more with its final tokens."""

    block: np.ndarray
    start: int


def check_request(prompt: Sequence[int], options: DecodeOptions, mask_id: int, stop_ids: Collection[int],
                  model_block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate one decode (ValueError before any model call); returns the prompt as int32 and
    the stop ids, sorted, as int64."""
    options.validate()
    tokens = _prompt_array(prompt)
    if not _is_int(mask_id) or mask_id < 0:
        raise ValueError(f"mask_id must be a non-negative integer, got {mask_id!r}")
    if model_block is not None and model_block != options.block_length:
        raise ValueError(f"block_length {options.block_length} differs from the model's block length {model_block}")
    return tokens, np.array(sorted({int(s) for s in stop_ids}), dtype=np.int64)


def iter_decode(
    model: BlockModel,
    prompt: Sequence[int],
    options: DecodeOptions,
    *,
    mask_id: int,
    stop_ids: Collection[int],
    cancel=None,
) -> Iterator[StepEvent | BlockEvent | DecodeResult]:
    """Decode, yielding a StepEvent per step, a BlockEvent per finished block and the DecodeResult
    last. Raises ValueError (before calling the model) on an empty prompt or invalid options.
    `cancel`: anything with ``is_set()`` (a threading.Event), checked before every step: once
    set, decoding ends with the finished blocks and ``finish_reason`` "cancelled"."""
    tokens, stops = check_request(prompt, options, mask_id, stop_ids, getattr(model, "block_length", None))
    return _run_solo(model, decode_program(tokens, options, int(mask_id), stops, cancel))


def _run_solo(model: BlockModel, program) -> Iterator[StepEvent | BlockEvent | DecodeResult]:
    """Drive one decoding program: each request runs on `model` at once; events pass through."""
    reply = None
    while True:
        try:
            item = program.send(reply)
        except StopIteration:
            return
        reply = None
        if isinstance(item, BlockLogits):
            reply = model.block_logits(item.block, item.start, item.rows, item.step)
        elif isinstance(item, Prefill):
            model.prefill(item.tokens)
        elif isinstance(item, CommitBlock):
            model.commit_block(item.block, item.start)
        else:
            yield item


def _answer_part(block: np.ndarray, start: int, n_prompt: int, limit: int, stops: np.ndarray) -> np.ndarray:
    """The answer's tokens in a finished block at `start`: positions in [n_prompt, limit), cut
    after the first stop id."""
    part = block[max(0, n_prompt - start): max(0, limit - start)]
    hits = np.flatnonzero(np.isin(part, stops)) if stops.size else ()
    return part[: hits[0] + 1].copy() if len(hits) else part.copy()


def decode_program(prompt: np.ndarray, options: DecodeOptions, mask_id: int, stops: np.ndarray, cancel):
    """The decoding of one prompt as a program that asks for its forwards: a generator yielding
    requests (Prefill, BlockLogits, CommitBlock: a BlockLogits is answered by ``send(logits)``) and
    events (StepEvent, BlockEvent, the DecodeResult last). A driver runs the requests: one at a
    time on one model (`iter_decode`), or together with other programs' in one batched forward
    (`diffusion.batch`). `prompt` and `stops` come from `check_request`."""
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
    yield Prefill(canvas[: first * B].copy())
    prefill_seconds = time.perf_counter() - clock._since

    steps_per_block: list[int] = []
    answer: list[np.ndarray] = []
    reason: FinishReason = "length"
    for b in range(first, num_blocks):
        start = b * B
        block = canvas[start : start + B]  # view into the canvas
        free = offsets + start >= P  # prompt positions are never candidates
        done = 0
        for step, quota in enumerate(quotas):
            if cancel is not None and cancel.is_set():
                reason = "cancelled"
                break
            rows = np.flatnonzero((block == mask_id) & free)
            if rows.size == 0:
                break
            logits = np.asarray((yield BlockLogits(block.copy(), start, rows, step)))
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
        if reason == "cancelled":
            break
        steps_per_block.append(done)
        part = _answer_part(block, start, P, P + max_new, stops)
        answer.append(part)
        if stops.size and np.isin(part, stops).any():
            reason = "stop"
        last = reason == "stop" or b == num_blocks - 1
        if not last:  # the last block's K/V would never be read
            yield CommitBlock(block.copy(), start)
        clock.pause()
        yield BlockEvent(b, start, block.copy(), done, part)
        clock.resume()
        if last:
            break

    generated = np.concatenate(answer) if answer else np.zeros(0, dtype=np.int32)
    clock.pause()
    stats = DecodeStats(
        prompt_tokens=P, tokens=int(generated.size), blocks=len(steps_per_block), steps=sum(steps_per_block),
        steps_per_block=tuple(steps_per_block), seconds=clock.total, prefill_seconds=prefill_seconds,
        finish_reason=reason,
    )
    yield DecodeResult([int(t) for t in generated], stats)


def decode(
    model: BlockModel,
    prompt: Sequence[int],
    options: DecodeOptions,
    *,
    mask_id: int,
    stop_ids: Collection[int],
    cancel=None,
) -> DecodeResult:
    """Run :func:`iter_decode` to the end and return its DecodeResult."""
    result = None
    for event in iter_decode(model, prompt, options, mask_id=mask_id, stop_ids=stop_ids, cancel=cancel):
        result = event
    assert isinstance(result, DecodeResult)
    return result
