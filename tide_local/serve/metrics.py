"""The counters behind GET /metrics, in Prometheus' text exposition format.

A handful of counters and histograms: written here rather than pulled in with a client
library. Requests are counted by the request counter (middleware.py), generations and batched
steps by the scheduler's worker, and the queue is read when scraped."""

from __future__ import annotations

import math
import threading
from collections import Counter

from tide_local.batching import BatchStep
from tide_local.results import GenerationResult

DECODE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, math.inf)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, math.inf)
ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, math.inf)


class Histogram:
    """Cumulative bucket counts, a sum and a count (not thread-safe: Metrics holds the lock)."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts, self.sum = bounds, [0] * len(bounds), 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            self.counts[i] += value <= bound
        self.sum += value

    def lines(self, name: str, help: str) -> list[str]:
        out = [f"# HELP {name} {help}", f"# TYPE {name} histogram"]
        out += [f"{name}_bucket{_labels(le=_number(b))} {n}" for b, n in zip(self.bounds, self.counts, strict=True)]
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.counts[-1]}"]


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: object) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(value) if isinstance(value, float) else str(value)


class Metrics:
    """Thread-safe counters of requests and generations."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status)
        self.generations: Counter[str] = Counter()  # by the engine's finish_reason
        self.totals: Counter[str] = Counter()  # prompt/completion tokens, steps, offload counts
        self.decode = Histogram(DECODE_BUCKETS)
        self.step_seconds = Histogram(STEP_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.rows_per_expert = Histogram(ROWS_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def generation(self, result: GenerationResult) -> None:
        stats = result.stats
        with self._lock:
            self.generations[stats.finish_reason] += 1
            self.totals.update(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.tokens, steps=stats.steps,
                               blocks=stats.blocks)
            self.decode.observe(stats.seconds)

    def step(self, step: BatchStep) -> None:
        """One batched forward of the decoder (all running requests' steps, prefills and commits)."""
        with self._lock:
            self.step_seconds.observe(step.seconds)
            self.batch_size.observe(step.sequences)
            self.rows_per_expert.observe(step.rows_per_expert)
            self.totals.update(forwarded_rows=step.rows)
            if step.offload is not None:
                o = step.offload
                self.totals.update(offload_hits=o.hits, offload_misses=o.misses, offload_uploads=o.uploads,
                                   offload_upload_bytes=o.upload_bytes)

    def render(self, *, waiting: int, running: int, device: bool) -> str:
        """The exposition text; `waiting`/`running`: the queue now; `device`: offload counters too."""
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[dict, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{_labels(**labels)} {_number(value)}" for labels, value in samples)

        with self._lock:
            metric("tide_requests_total", "counter", "HTTP requests by endpoint and status code",
                   [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(self.requests.items())])
            metric("tide_generations_total", "counter", "decodes finished, by the engine's finish reason",
                   [({"finish_reason": r}, n) for r, n in sorted(self.generations.items())])
            for key, help in (("prompt_tokens", "prompt tokens decoded"),
                              ("completion_tokens", "tokens generated"),
                              ("steps", "denoising steps (model forwards with logits)"),
                              ("blocks", "blocks denoised")):
                metric(f"tide_{key}_total", "counter", help, [({}, self.totals[key])])
            metric("tide_forwarded_rows_total", "counter", "token rows forwarded (steps, prefill chunks, commits)",
                   [({}, self.totals["forwarded_rows"])])
            out += self.decode.lines("tide_decode_seconds",
                                     "time decoding one request (prefill included, queue excluded)")
            out += self.step_seconds.lines("tide_step_seconds", "time of one batched forward of all running requests")
            out += self.batch_size.lines("tide_batch_size", "requests in one batched forward")
            out += self.rows_per_expert.lines("tide_rows_per_expert",
                                              "routed rows per distinct expert in one forward (mean over MoE layers)")
            if device:
                for key, help in (("offload_hits", "routed token-slots computed by experts on the device"),
                                  ("offload_misses", "routed token-slots computed on the CPU"),
                                  ("offload_uploads", "experts uploaded to the device"),
                                  ("offload_upload_bytes", "bytes of experts uploaded to the device")):
                    metric(f"tide_{key}_total", "counter", help, [({}, self.totals[key])])
        metric("tide_queue_depth", "gauge", "requests waiting for the decoder", [({}, waiting)])
        metric("tide_requests_running", "gauge", "requests being decoded", [({}, running)])
        return "\n".join(out) + "\n"
