"""What decoding several prompts per forward buys on this machine: the same prompts one after
another, then `generate_batch` with at most N per forward (what `tide serve --max-batch N` does)."""

from __future__ import annotations

import time


def batched_throughput(eng, prompts: list, sizes, **options) -> list[dict]:
    """Per batch size (1: one after another) the aggregate tokens/s, its ratio to one at a time,
    and whether every answer equals its sequential one (so on f32 and q8_0; K-quants' tiled CPU
    kernel rounds by row count). `options`: `generate`'s keywords for every prompt."""
    t0 = time.perf_counter()
    alone = [eng.generate(p, **options).tokens for p in prompts]
    base = sum(map(len, alone)) / (time.perf_counter() - t0)
    rows = [{"batch": 1, "tokens_per_second": base, "over_one_at_a_time": 1.0, "same_tokens": True}]
    for size in sorted(n for n in set(sizes) if n > 1):
        t0 = time.perf_counter()
        got = [r.tokens for r in eng.generate_batch(prompts, max_batch=size, **options)]
        rate = sum(map(len, got)) / (time.perf_counter() - t0)
        rows.append({"batch": size, "tokens_per_second": rate, "over_one_at_a_time": rate / base,
                     "same_tokens": got == alone})
    return rows
