"""The counters behind GET /metrics, in Prometheus' text exposition format.

A handful of counters and one histogram: written here rather than pulled in with a client
library. Requests are counted by the request counter (middleware.py), generations by the
scheduler's worker, and the queue is read when scraped."""

from __future__ import annotations

import math
import threading
from collections import Counter

from tide_local.results import GenerationResult

DECODE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, math.inf)


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
        self.decode_buckets = [0] * len(DECODE_BUCKETS)
        self.decode_sum = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def generation(self, result: GenerationResult) -> None:
        stats = result.stats
        with self._lock:
            self.generations[stats.finish_reason] += 1
            self.totals.update(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.tokens, steps=stats.steps,
                               blocks=stats.blocks)
            if stats.offload is not None:
                o = stats.offload
                self.totals.update(offload_hits=o.hits, offload_misses=o.misses, offload_uploads=o.uploads,
                                   offload_upload_bytes=o.upload_bytes)
            for i, bound in enumerate(DECODE_BUCKETS):
                self.decode_buckets[i] += stats.seconds <= bound
            self.decode_sum += stats.seconds

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
            count = self.decode_buckets[-1]
            out.append("# HELP tide_decode_seconds time decoding one request (prefill included, queue excluded)")
            out.append("# TYPE tide_decode_seconds histogram")
            out.extend(f"tide_decode_seconds_bucket{_labels(le=_number(b))} {n}"
                       for b, n in zip(DECODE_BUCKETS, self.decode_buckets, strict=True))
            out.append(f"tide_decode_seconds_sum {_number(self.decode_sum)}")
            out.append(f"tide_decode_seconds_count {count}")
            if device:
                for key, help in (("offload_hits", "routed token-slots computed by experts on the device"),
                                  ("offload_misses", "routed token-slots computed on the CPU"),
                                  ("offload_uploads", "experts uploaded to the device"),
                                  ("offload_upload_bytes", "bytes of experts uploaded to the device")):
                    metric(f"tide_{key}_total", "counter", help, [({}, self.totals[key])])
        metric("tide_queue_depth", "gauge", "requests waiting for the decoder", [({}, waiting)])
        metric("tide_requests_running", "gauge", "requests being decoded", [({}, running)])
        return "\n".join(out) + "\n"
