"""Where a forward's time goes, by phase: the hook the engine's statistics and the
benchmarks read instead of patching internals.

The forward wraps each phase of a pass in ``timer.phase(name)``; the phases are
``build_pass`` and ``build_lm_head`` (graph construction), ``embed`` (host embedding
lookup and upload), ``compute_layers`` and ``compute_lm_head`` (ggml compute on the
model's backend), ``route`` (reading router logits and selecting experts on the host),
``experts`` (the experts executor's work before a layer's graph: inputs, uploads, the
device share, waiting for the CPU share), within it ``compute_experts`` (the device share's
own graph, when the executor has one) and ``logits`` (reading the logits back).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

PHASES = ("build_pass", "build_lm_head", "embed", "compute_layers", "compute_lm_head", "route", "experts",
          "compute_experts", "logits")
COMPUTE_PHASES = ("compute_layers", "compute_lm_head", "compute_experts")


class PhaseTimer:
    """Seconds and calls per phase, accumulated until `reset`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0
            self.calls[name] += 1

    @property
    def compute_seconds(self) -> float:
        """Time inside ggml compute on the model's backend."""
        return sum(self.seconds[p] for p in COMPUTE_PHASES)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
