"""What a generation returns: the tokens, the text, and typed statistics.

    res = eng.generate("The capital of France is", max_new_tokens=64)
    res.text, res.stats.tokens_per_second, res.stats.finish_reason
    res.stats.offload.hit_rate        # with expert offload (None without)
    res.stats.to_dict()               # JSON-ready, as `tide generate --json` prints it
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tide_local.diffusion import DecodeStats


@dataclass(frozen=True)
class LayerOffload:
    """One MoE layer's routed token-slots on the device (hits) and the CPU (misses), and uploads."""

    hits: int = 0
    misses: int = 0
    uploads: int = 0
    upload_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)


@dataclass(frozen=True)
class OffloadStats:
    """Where the routed experts of a generation ran, and what moving them cost."""

    policy: str
    tau: int | None  # TIDE's refresh interval (None for other policies)
    tau_source: str | None  # why that tau ("given", the cached plan, or the default and why); for
    # adaptive, where its prices come from
    per_layer: dict[int, LayerOffload]
    per_step: list[dict]  # per pass: block start, step, tokens, per layer (hits, misses, uploads)
    upload_seconds: float
    cpu_expert_seconds: float  # the CPU share's compute, in its worker thread
    wait_seconds: float  # the device side waiting for the CPU share

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self.per_layer.values())

    @property
    def misses(self) -> int:
        """Routed token-slots computed on the CPU."""
        return sum(s.misses for s in self.per_layer.values())

    @property
    def hit_rate(self) -> float:
        return self.hits / max(1, self.hits + self.misses)

    @property
    def uploads(self) -> int:
        return sum(s.uploads for s in self.per_layer.values())

    @property
    def upload_bytes(self) -> int:
        return sum(s.upload_bytes for s in self.per_layer.values())


@dataclass(frozen=True)
class GenerationStats(DecodeStats):
    """A generation's statistics: the decoder's (tokens, steps, blocks, finish_reason, ...)
    and the engine's. ``seconds`` is decoding time; ``wall_seconds`` the call's whole time."""

    wall_seconds: float = 0.0
    forwards: int = 0  # model passes (prefill chunks, steps, block commits)
    forwarded_tokens: int = 0
    kv_cache: bool = True
    device: str = "cpu"
    device_compute_seconds: float = 0.0  # inside ggml compute on the model's backend
    host_seconds: float = 0.0  # the rest: Python, routing, inputs (uploads and CPU waits excluded)
    offload: OffloadStats | None = None  # None without a device

    def to_dict(self) -> dict:
        """Every field and derived figure, JSON-ready (layer numbers become strings)."""
        out = dataclasses.asdict(self)
        out["steps_per_block"] = list(self.steps_per_block)
        out.update(tokens_per_second=self.tokens_per_second, tokens_per_step=self.tokens_per_step,
                   mean_steps_per_block=self.mean_steps_per_block)
        if self.offload is not None:
            o = self.offload
            out["offload"].update(hits=o.hits, misses=o.misses, hit_rate=o.hit_rate, uploads=o.uploads,
                                  upload_bytes=o.upload_bytes)
            out["offload"]["per_layer"] = {str(k): {**v, "hit_rate": o.per_layer[k].hit_rate}
                                           for k, v in out["offload"]["per_layer"].items()}
        return out


@dataclass
class GenerationResult:
    """The answer: its token ids (up to and including the stop id that ended it, if any), their
    text, and the statistics of the generation."""

    tokens: list[int]
    text: str
    stats: GenerationStats = field(repr=False)
