"""Routing traces: which experts every token chose, per pass and MoE layer.

Recorded by `tide generate --trace FILE` and read by the planner (and by the `static`
policy, for its popular experts). A pass is one forward: a prefill chunk, a denoising
step, or a block's final commit. Each pass keeps what the decoder said it was for
(`kind`, `block`, `step`: see `tide_local.diffusion.PassInfo`), so a replay refreshes
exactly where the engine did.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tide_local.errors import TraceError
from tide_local.paths import write_json_atomically

TRACE_VERSION = 2  # 2: passes carry kind and block (version 1 files are read with both inferred)


def _infer_kinds(passes: list[dict]) -> None:
    """Version 1 traces have no kind or block: a logits pass is a step, a pass without logits
    right after a step at the same start is a commit, any other a prefill."""
    previous = None
    for p in passes:
        if p["logits"]:
            p["kind"] = "step"
        elif previous is not None and previous["logits"] and previous["start"] == p["start"]:
            p["kind"] = "commit"
        else:
            p["kind"] = "prefill"
        p["block"] = -1 if p["kind"] == "prefill" else p["start"] // max(1, p["tokens"])
        previous = p


class RoutingTrace:
    def __init__(self, model_name: str, n_experts: int, n_used: int, moe_layers: list[int]):
        self.model_name, self.n_experts, self.n_used, self.moe_layers = model_name, n_experts, n_used, list(moe_layers)
        self.passes: list[dict] = []
        # with a device: per pass and MoE layer, when the uploads, device, CPU misses and the wait
        # for them ran (HybridExperts.timeline_seconds); plotted by benchmarks/plot_timeline.py
        self.timeline: list[dict] | None = None

    def begin_pass(self, start: int, n_tokens: int, logits: bool, info) -> None:
        """`logits`: the pass yields logits, not only K/V; `info`: its PassInfo."""
        self.passes.append({"start": start, "kind": info.kind, "block": info.block, "step": info.step,
                            "tokens": n_tokens, "logits": logits, "layers": {}})

    def record(self, layer: int, experts: np.ndarray) -> None:
        self.passes[-1]["layers"][layer] = np.asarray(experts, dtype=np.int32)

    def popularity(self) -> dict[int, np.ndarray]:
        """Routed token-slots per expert, per layer, over the whole trace."""
        counts = {layer: np.zeros(self.n_experts, dtype=np.int64) for layer in self.moe_layers}
        for p in self.passes:
            for layer, experts in p["layers"].items():
                counts[layer] += np.bincount(experts.ravel(), minlength=self.n_experts)
        return counts

    def save(self, path) -> None:
        data = {
            "version": TRACE_VERSION, "model": self.model_name, "n_experts": self.n_experts,
            "n_experts_used": self.n_used, "moe_layers": self.moe_layers,
            "passes": [{**p, "layers": {str(k): v.tolist() for k, v in p["layers"].items()}} for p in self.passes],
        }
        if self.timeline is not None:
            data["timeline"] = self.timeline
        write_json_atomically(path, data, indent=None)  # a cut-short save never replaces a good trace

    @classmethod
    def load(cls, path, *, n_experts: int | None = None, moe_layers=None) -> "RoutingTrace":
        """Read a trace; with the model's shape given, a trace of another model is refused."""
        try:
            data = json.loads(Path(path).read_text())
            version = data.get("version", 1)
            if version not in (1, TRACE_VERSION):
                raise ValueError(f"version {version!r}, this tide-local reads 1 and {TRACE_VERSION}")
            trace = cls(data["model"], int(data["n_experts"]), int(data["n_experts_used"]), data["moe_layers"])
            for p in data["passes"]:
                entry = {"start": int(p["start"]), "step": int(p["step"]), "tokens": int(p["tokens"]),
                         "logits": bool(p["logits"]),
                         "layers": {int(k): np.asarray(v, dtype=np.int32) for k, v in p["layers"].items()}}
                if version >= 2:
                    if p["kind"] not in ("prefill", "step", "commit", "forward", "batch"):
                        raise ValueError(f"unknown pass kind {p['kind']!r}")
                    entry.update(kind=p["kind"], block=int(p["block"]))
                trace.passes.append(entry)
            if version == 1:
                _infer_kinds(trace.passes)
            if isinstance(data.get("timeline"), list):
                trace.timeline = data["timeline"]
        except FileNotFoundError:
            raise TraceError(f"{path}: no such trace file") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise TraceError(f"{path}: not a valid routing trace ({type(err).__name__}: {err})") from None
        for p in trace.passes:
            for layer, experts in p["layers"].items():
                if experts.ndim != 2 or experts.shape != (p["tokens"], trace.n_used) or (
                        experts.size and (experts.min() < 0 or experts.max() >= trace.n_experts)):
                    raise TraceError(f"{path}: pass at {p['start']} layer {layer} has malformed expert ids")
        if n_experts is not None and (n_experts != trace.n_experts or list(moe_layers) != trace.moe_layers):
            raise TraceError(f"{path}: the trace is of a model with {trace.n_experts} experts and MoE layers "
                             f"{trace.moe_layers[:1]}..{trace.moe_layers[-1:]}, not this one")
        return trace
