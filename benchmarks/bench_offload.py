"""Expert offload on a LLaDA2.0-mini-shaped model: hit rate, uploads and CPU work per block
for every policy, budgets of 32, 64 and 128 experts per layer, and TIDE with tau 1..8.

These counts depend only on the routing and the policy, so the benchmark records one
routing trace with the real engine (KV cache on, the decoding every user runs) and
replays each policy over it with the engine's own policy code (`tide_local.experts.replay`,
which the tests prove reproduces the engine's per-pass counts exactly). It also measures
how stable the routing is inside a block: the overlap of the top-B expert sets of
adjacent denoising steps, and the cosine similarity of adjacent steps' routing counts
(the paper measured 0.985 without a KV cache).

    python benchmarks/bench_offload.py [--model PATH] [--new-tokens 128]

Random weights: the routing of a trained model is more structured, so these hit rates
are what an unstructured router gives (a floor for the benefit of refreshing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path


import tide_local
from tide_local.experts.replay import replay
from tide_local.experts.trace import RoutingTrace
from tide_local.experts.trace_stats import step_similarity, top_overlap

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODEL = Path(os.environ.get("TIDE_BENCH_DIR", Path.home() / ".cache" / "tide-local" / "bench")) / "mini-q4_k_m.gguf"
PROMPT = ("Explain, step by step, how a mixture-of-experts diffusion language model decodes a block of "
          "thirty-two tokens, and why the experts it needs change little from one step to the next. ") * 2


def record_trace(model: Path, new_tokens: int, threads: int, out: Path) -> RoutingTrace:
    if out.exists():
        print(f"using the cached trace {out}")
        return RoutingTrace.load(out)
    with tide_local.load(model, device="cpu", threads=threads) as eng:
        ids = eng.tokenizer.encode(PROMPT)
        trace = eng.record_trace()
        t0 = time.perf_counter()
        res = eng.generate(ids, max_new_tokens=new_tokens)
        print(f"recorded {len(trace.passes)} passes ({len(ids)} prompt tokens, {res.stats.blocks} blocks, "
              f"{res.stats.steps} steps) in {time.perf_counter() - t0:.0f} s")
        eng.stop_trace()
    trace.save(out)
    return trace


def stability(trace: RoutingTrace, budget: int) -> dict:
    """Adjacent denoising steps inside a block: top-B overlap and cosine of routing counts."""
    return {"cosine": step_similarity(trace), "top_b_overlap": top_overlap(trace, budget)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                    help="a LLaDA2.0-mini-shaped GGUF (benchmarks/bench_step.py builds one)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if not args.model.exists():
        sys.exit(f"no model at {args.model}: run benchmarks/bench_step.py first (it builds the mini-shaped GGUF)")
    RESULTS.mkdir(exist_ok=True)
    trace = record_trace(args.model, args.new_tokens, args.threads, args.model.with_suffix(".trace.json"))

    rows, data = [], {"model": str(args.model.name), "machine": platform.processor() or platform.machine(),
                      "passes": len(trace.passes), "results": []}
    for budget in (32, 64, 128):
        configs = [("tide", t) for t in range(1, 9)] + [("swap", None), ("static", None), ("lru", None), ("cpu", None)]
        stab = stability(trace, budget)
        for policy, tau in configs:
            r = replay(trace, policy, 0 if policy == "cpu" else budget, tau=tau or 4,
                       popularity=trace.popularity() if policy == "static" else None)
            t = r.totals(decode_only=True)
            row = {"budget": budget, "policy": policy if tau is None else f"tide tau={tau}",
                   "hit_rate": t["hit_rate"], "uploads_per_block": t["uploads_per_block"],
                   "cpu_token_slots_per_block": t["cpu_token_slots_per_block"], **stab}
            data["results"].append(row)
            rows.append(row)
    lines = [f"Offload counts on {data['model']} (random weights), {trace.n_experts} experts per layer, "
             f"{len(trace.moe_layers)} MoE layers; decoding passes only (steps and block commits, KV cache on).",
             "", "| budget | policy | hit rate | uploads / block | CPU token-slots / block |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['budget']} | {r['policy']} | {r['hit_rate']:.3f} | {r['uploads_per_block']:.0f} | "
                     f"{r['cpu_token_slots_per_block']:.0f} |")
    lines += ["", "Routing stability between adjacent denoising steps of a block:", "",
              "| budget | top-B overlap | cosine of routing counts |", "|---|---|---|"]
    for budget in (32, 64, 128):
        r = next(x for x in rows if x["budget"] == budget)
        lines.append(f"| {budget} | {r['top_b_overlap']:.3f} | {r['cosine']:.3f} |")
    text = "\n".join(lines)
    print(text)
    (RESULTS / "offload.md").write_text(text + "\n\nMade with `python benchmarks/bench_offload.py`.\n")
    (RESULTS / "offload.json").write_text(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
