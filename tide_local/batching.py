"""Several prompts decoded together on one engine: ``Engine.batch()`` and ``generate_batch``.

    with eng.batch() as batch:                 # up to eng.max_batch sequences at once
        batch.add("a", "What is 2 + 2?")
        batch.add("b", [1, 2, 3], max_new_tokens=64)
        while batch.running:
            for key, event in batch.step():    # StepEvent, BlockEvent, GenerationResult, SequenceFailed
                ...

Each step is one forward over the active block of every running sequence (prefill chunks and
block commits ride along): the matmuls and the MoE run over all their rows, attention per
sequence over its own KV cache, and the expert offload sees the union of their routing. A
sequence's tokens are those of its solo `generate` on f32 and q8_0 models; K-quant models too
with GGML_CPU_TILED_MM=0 (the tiled kernel rounds by row count, as the KV cache does).
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tide_local.diffusion import DecodeResult, PassInfo
from tide_local.diffusion.batch import BatchDecoder, BatchPart, SequenceFailed
from tide_local.engine import prefill_chunk
from tide_local.model.forward import KVCache, Span
from tide_local.results import GenerationResult, GenerationStats, LayerOffload, OffloadStats

__all__ = ["EngineBatch", "BatchStep", "SequenceFailed"]


@dataclass(frozen=True)
class BatchStep:
    """One batched pass: its wall time, the sequences and rows it forwarded, the MoE's mean
    rows per expert (routed assignments per distinct expert, over the MoE layers) and, with a
    device, its expert offload summed over the layers (None on the CPU)."""

    seconds: float
    sequences: int
    rows: int
    rows_per_expert: float
    offload: LayerOffload | None = None


def _combine(a: LayerOffload, b: LayerOffload, sign: int = 1) -> LayerOffload:
    return LayerOffload(**{k: getattr(a, k) + sign * getattr(b, k) for k in vars(a)})


@dataclass
class _OffloadShare:
    """Offload counts per MoE layer and seconds: a snapshot of the executor's, a pass's
    difference, or a sequence's sum over the passes it took part in."""

    layers: dict[int, LayerOffload] = field(default_factory=dict)
    upload_seconds: float = 0.0
    cpu_seconds: float = 0.0
    wait_seconds: float = 0.0

    @classmethod
    def of(cls, offload) -> "_OffloadShare | None":
        if offload is None:
            return None
        s = offload.stats
        return cls(dict(s.layers), s.upload_seconds, s.cpu_seconds, s.wait_seconds)

    def minus(self, earlier: "_OffloadShare") -> "_OffloadShare":
        zero = LayerOffload()
        return _OffloadShare({layer: _combine(c, earlier.layers.get(layer, zero), -1) for layer, c in self.layers.items()},
                             self.upload_seconds - earlier.upload_seconds, self.cpu_seconds - earlier.cpu_seconds,
                             self.wait_seconds - earlier.wait_seconds)

    def add(self, other: "_OffloadShare") -> None:
        for layer, counts in other.layers.items():
            self.layers[layer] = _combine(self.layers.get(layer, LayerOffload()), counts)
        self.upload_seconds += other.upload_seconds
        self.cpu_seconds += other.cpu_seconds
        self.wait_seconds += other.wait_seconds

    def total(self) -> LayerOffload:
        out = LayerOffload()
        for counts in self.layers.values():
            out = _combine(out, counts)
        return out


@dataclass
class _SequenceState:
    """One sequence of the batch: its KV cache (None once it left), when it joined, and the
    passes, rows and offload counts it took part in (read for its GenerationStats)."""

    cache: KVCache | None
    started: float = field(default_factory=time.perf_counter)
    passes: int = 0
    rows: int = 0
    offload: _OffloadShare = field(default_factory=_OffloadShare)


class _SequenceCaches:
    """The BatchModel over an engine's forward: a KV cache per sequence, one pass per step."""

    def __init__(self, engine):
        self.engine, self.model = engine, engine.model
        self.block_length = self.model.block_length
        self.sequences: dict[Hashable, _SequenceState] = {}  # until their result is read
        self.batch_passes = 0  # passes of several sequences (the offload's clock for them)
        self.last: BatchStep | None = None

    def open_sequence(self, key, n_positions: int) -> None:
        self.sequences[key] = _SequenceState(self.model.new_cache(n_positions))

    def close_sequence(self, key) -> None:
        seq = self.sequences[key]
        self.model.release_cache(seq.cache)
        seq.cache = None

    def prefill_chunk(self, n_tokens: int) -> int:
        return prefill_chunk(self.model.config, n_tokens, self.block_length)

    def forward(self, parts: list[BatchPart]) -> list[np.ndarray | None]:
        t0, before = time.perf_counter(), _OffloadShare.of(self.engine.offload)
        spans, rows, offset = [], [], 0
        for part in parts:
            seq = self.sequences[part.key]
            spans.append(Span(seq.cache, part.start, len(part.tokens)))
            if part.rows is not None:
                rows.append(offset + np.asarray(part.rows))
            offset += len(part.tokens)
            seq.passes += 1
            seq.rows += len(part.tokens)
        tokens = np.concatenate([part.tokens for part in parts])
        logits = self.model.forward_spans(spans, tokens, np.concatenate(rows) if rows else None, self._info(parts))
        out, at = [], 0
        for part in parts:
            if part.rows is None:
                out.append(None)
            else:
                out.append(logits[at:at + len(part.rows)])
                at += len(part.rows)
        total = None
        if before is not None:
            delta = _OffloadShare.of(self.engine.offload).minus(before)
            for part in parts:
                self.sequences[part.key].offload.add(delta)
            total = delta.total()
        self.last = BatchStep(time.perf_counter() - t0, len(parts), offset, self._rows_per_expert(), total)
        return out

    def _info(self, parts: list[BatchPart]) -> PassInfo:
        """What the pass is for, as the offload needs it: one part's own, else a batch pass on
        the batch's clock (a pass of commits only never refreshes, as a solo commit)."""
        if len(parts) == 1:
            return parts[0].info
        if all(part.info.kind == "commit" for part in parts):
            return PassInfo("commit")
        self.batch_passes += 1
        return PassInfo("batch", -1, self.batch_passes - 1)

    def _rows_per_expert(self) -> float:
        per_layer = [r.experts.size / len(np.unique(r.experts)) for r in self.model.last_routing.values()]
        return float(np.mean(per_layer)) if per_layer else 0.0


class EngineBatch:
    """Decodes up to `max_batch` prompts together on `engine` (made by ``Engine.batch()``, which
    holds the engine for its lifetime). ``add`` a prompt under a key (checked as ``stream``
    checks it: ValueError / ContextError), then ``step`` until ``running`` is 0; each step returns
    (key, event) pairs: StepEvent, BlockEvent, GenerationResult (the sequence is done), or
    SequenceFailed. ``last_step`` describes the step's pass."""

    def __init__(self, engine, max_batch: int):
        self.engine = engine
        self._model = _SequenceCaches(engine)
        self._decoder = BatchDecoder(self._model, max_batch)

    @property
    def running(self) -> int:
        return self._decoder.running

    @property
    def max_batch(self) -> int:
        return self._decoder.max_batch

    def has_room(self) -> bool:
        return self._decoder.has_room()

    @property
    def last_step(self) -> BatchStep | None:
        """The last step's forward (None when it ran none)."""
        return self._model.last

    def add(self, key: Hashable, prompt: str | Sequence[int], *, stop_ids: Sequence[int] | None = None,
            cancel=None, **options) -> None:
        """Queue `prompt` (a string or token ids) to join at the next step; the decoding keywords
        are `generate`'s. RuntimeError when the batch is full."""
        self.add_checked(key, *self.engine._request(prompt, stop_ids, options), cancel=cancel)

    def add_checked(self, key: Hashable, ids, options, stop_ids: list[int], cancel=None) -> None:
        """`add` for a request the engine has checked already (`Engine._request`)."""
        self._decoder.add(key, ids, options, mask_id=self.engine.mask_id, stop_ids=stop_ids, cancel=cancel)

    def step(self) -> list[tuple[Hashable, object]]:
        self._model.last = None  # a step without a forward (only sequences ending) has no BatchStep
        events = []
        for key, event in self._decoder.step():
            if isinstance(event, DecodeResult):
                event = self._result(key, event)
            elif isinstance(event, SequenceFailed):
                self._model.sequences.pop(key, None)
            events.append((key, event))
        return events

    def _result(self, key, result: DecodeResult) -> GenerationResult:
        eng, seq = self.engine, self._model.sequences.pop(key)
        share, offload = seq.offload, None
        if eng.offload is not None:  # the counts of the passes it took part in, shared with the others in them
            offload = OffloadStats(policy=eng.offload.policy.name, tau=eng.tau, tau_source=eng.tau_source,
                                   per_layer=share.layers, per_step=[], upload_seconds=share.upload_seconds,
                                   cpu_expert_seconds=share.cpu_seconds, wait_seconds=share.wait_seconds)
        stats = GenerationStats(**vars(result.stats), wall_seconds=time.perf_counter() - seq.started,
                                forwards=seq.passes, forwarded_tokens=seq.rows, kv_cache=True,
                                device=eng.device, offload=offload)
        return GenerationResult(result.tokens, self.engine.tokenizer.decode(result.tokens), stats)

    def close(self) -> None:
        self._decoder.close()
