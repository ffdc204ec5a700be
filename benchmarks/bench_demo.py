"""The trained demo model, measured: accuracy per task, diffusion's parallelism, expert usage,
and its routing under TIDE beside the random tiny model's.

    python benchmarks/bench_demo.py                        # the packaged q8_0 demo model
    python benchmarks/bench_demo.py --hf TRAIN_DIR/hf      # f32, q8_0 and q4_k_m from the checkpoint

1. Accuracy: every held-out prompt of `tide_local.demo_tasks.evaluation_set` (200 per task)
   answered with `Engine.chat` and the default decoding (greedy, threshold 0.95, block 32) on
   the CPU; per model, accuracy per task, tokens per step and steps per block.
2. Routing (the q8_0 model; the random tiny model on 10 prompts per task, 64 tokens each, for
   comparison): the routing of every pass is recorded. Per MoE layer the share of experts used
   and the largest expert's share of the assignments. For denoising steps of a block: the
   adjacent-step cosine similarity of expert-count vectors (the paper's measure: 0.985 on
   LLaDA2.0-mini, whole window, no KV cache), the overlap of the top-B experts of adjacent steps
   (B = half the experts), distinct experts per step, with the KV cache (the active block) and
   without it (the whole window, the paper's regime; 25 prompts per task).
3. Offload on that routing: every policy replayed over the KV-cache trace with a quarter and
   half of the experts resident (`tide_local.experts.replay`, the engine's own policy code);
   `static` uses the popularity of a trace on other prompts (out of sample).

Results: benchmarks/results/demo.md and demo.json.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tide_local  # noqa: E402
from tide_local.demo import demo_model_path  # noqa: E402
from tide_local.demo_tasks import EVALUATION_SEED, TASKS, evaluation_set, is_correct  # noqa: E402
from tide_local.experts.policies import make_policy  # noqa: E402
from tide_local.experts.replay import replay  # noqa: E402
from tide_local.experts.trace_stats import distinct_per_step, expert_usage, step_similarity, top_overlap  # noqa: E402
from tide_local.modelfile import ModelFile  # noqa: E402
from tide_local.planner.lookup import adaptive_prices  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PAPER_SIMILARITY = 0.985
POLICIES = [("tide", 1), ("tide", 2), ("tide", 4), ("prefetch", 4), ("adaptive", None), ("swap", None),
            ("lru", None), ("ondemand", None), ("static", None)]


def evaluate(path: Path, items, threads: int, keep_trace: bool = False):
    """Accuracy and parallelism over `items`, and (`keep_trace`) the routing of those answers."""
    right: dict[str, int] = defaultdict(int)
    tokens = steps = blocks = 0
    wrong = []
    started = time.perf_counter()
    with tide_local.load(path, device="cpu", threads=threads) as eng:
        trace = eng.record_trace() if keep_trace else None
        for item in items:
            result = eng.chat(item.messages())
            ok = is_correct(item, result.text)
            right[item.task] += ok
            if not ok:
                wrong.append({"question": item.question, "answer": result.text})
            tokens, steps, blocks = tokens + result.stats.tokens, steps + result.stats.steps, blocks + result.stats.blocks
        if trace is not None:
            eng.stop_trace()
    per_task = {task: right[task] / sum(1 for i in items if i.task == task) for task in TASKS}
    return {"model": path.name, "accuracy": per_task, "tokens_per_step": tokens / max(1, steps),
            "steps_per_block": steps / max(1, blocks), "answers": len(items),
            "seconds": time.perf_counter() - started, "wrong": wrong}, trace


def record(path: Path, items, threads: int, *, kv_cache: bool = True, max_new_tokens: int | None = None):
    options = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    with tide_local.load(path, device="cpu", threads=threads) as eng:
        trace = eng.record_trace()
        for item in items:
            eng.chat(item.messages(), kv_cache=kv_cache, **options)
        eng.stop_trace()
    return trace


def routing(path: Path, trace, items, popularity_items, threads: int, max_new_tokens: int | None = None) -> dict:
    """Usage and stability of `trace` (the routing of `items`, KV cache on), the whole-window
    routing of some of those items, and every policy replayed over `trace`."""
    window = record(path, items[::8], threads, kv_cache=False, max_new_tokens=max_new_tokens)
    popularity = record(path, popularity_items, threads, max_new_tokens=max_new_tokens).popularity()
    with ModelFile(path) as model:  # adaptive's prices: this machine's emulated-device profile, else a preset
        prices, price_source = adaptive_prices(model, "emulated")
    E = trace.n_experts
    out = {"experts": E, "usage": expert_usage(trace), "distinct_per_step": distinct_per_step(trace),
           "active_block": {"cosine": step_similarity(trace), "top_half_overlap": top_overlap(trace, E // 2)},
           "whole_window": {"cosine": step_similarity(window), "top_half_overlap": top_overlap(window, E // 2)},
           "offload": [], "adaptive_prices": price_source}
    for slots in (E // 4, E // 2):
        for policy, tau in POLICIES:
            chosen = make_policy("adaptive", prices=prices) if policy == "adaptive" else policy
            r = replay(trace, chosen, slots, tau=tau or 4, popularity=popularity if policy == "static" else None)
            t = r.totals(decode_only=True)
            out["offload"].append({"slots": slots, "policy": policy if tau is None else f"{policy} tau={tau}",
                                   "hit_rate": t["hit_rate"], "uploads_per_block": t["uploads_per_block"],
                                   "cpu_slots_per_block": t["cpu_token_slots_per_block"]})
    return out


def random_model(directory: Path) -> Path:
    """The random tiny test model (seed 2025, q8_0): routing for comparison."""
    from tide_local.converters.convert import convert
    from tide_local.converters.testmodel import make_checkpoint

    hf = make_checkpoint(directory / "random-hf", preset="tiny", seed=2025)
    out = directory / "random-tiny-q8_0.gguf"
    convert(hf, out, "q8_0", threads=1, progress=False, log=io.StringIO())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf", type=Path, help="the trained checkpoint (scripts/train_demo.py OUT/hf): also f32, q4_k_m")
    ap.add_argument("--per-task", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    items = evaluation_set(args.per_task)
    other = evaluation_set(25, seed=EVALUATION_SEED + 1)  # popularity for static, out of sample
    few = [i for t in TASKS for i in [x for x in items if x.task == t][:10]]
    data: dict = {"machine": platform.processor() or platform.machine(), "per_task": args.per_task, "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.hf:
            models = {"q8_0": demo_model_path()}
        else:
            from tide_local.converters.convert import convert

            models = {}
            for kind in ("f32", "q8_0", "q4_k_m"):
                models[kind] = tmp / f"demo-{kind}.gguf"
                convert(args.hf, models[kind], kind, threads=args.threads, progress=False, log=io.StringIO())
        trace = None
        for label, path in models.items():
            print(f"{label}: {len(items)} prompts ...", file=sys.stderr, flush=True)
            row, recorded = evaluate(path, items, args.threads, keep_trace=label == "q8_0")
            trace = recorded or trace
            data["models"].append({"label": label, **row})
            print(f"  accuracy {row['accuracy']}  tokens/step {row['tokens_per_step']:.2f}  {row['seconds']:.0f} s",
                  file=sys.stderr)
        print("routing: trained q8_0, random tiny ...", file=sys.stderr, flush=True)
        random = random_model(tmp)
        data["routing"] = {"trained demo (q8_0)": routing(models["q8_0"], trace, items, other, args.threads),
                           "random tiny (q8_0)": routing(random, record(random, few, args.threads, max_new_tokens=64),
                                                         few, other[::5], args.threads, 64)}
    write(args, data)
    return 0


def write(args, data: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    cmd = "python benchmarks/bench_demo.py" + (f" --hf {args.hf}" if args.hf else "")
    lines = ["# The demo model, measured", "", f"`{cmd}` on {data['machine']}: {args.per_task} held-out prompts per "
             "task, `Engine.chat` with the defaults (greedy, threshold 0.95, block 32), CPU, "
             f"{args.threads} threads.", "",
             "| model | " + " | ".join(TASKS) + " | tokens/step | steps/block | s |",
             "|---|" + "---|" * (len(TASKS) + 3)]
    for r in data["models"]:
        acc = " | ".join(f"{100 * r['accuracy'][t]:.1f}%" for t in TASKS)
        lines.append(f"| {r['label']} | {acc} | {r['tokens_per_step']:.2f} | {r['steps_per_block']:.2f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "## Routing", "", "Denoising steps of a block, adjacent pairs (the paper: cosine "
              f"{PAPER_SIMILARITY} on LLaDA2.0-mini, whole window). Active block: KV cache on, the 32 tokens "
              "being denoised; whole window: no KV cache, every token up to the block. The random tiny model "
              "(16 experts, top-4) ran 10 prompts per task, 64 tokens each.", "",
              "| model | experts | active-block cosine | active top-half overlap | whole-window cosine | "
              "whole-window top-half overlap | distinct experts / step |", "|---|---|---|---|---|---|---|"]
    for label, r in data["routing"].items():
        a, w = r["active_block"], r["whole_window"]
        lines.append(f"| {label} | {r['experts']} | {a['cosine']:.3f} | {a['top_half_overlap']:.3f} | "
                     f"{w['cosine']:.3f} | {w['top_half_overlap']:.3f} | {r['distinct_per_step']:.1f} |")
    lines += ["", "Expert usage over every pass, per MoE layer: share of experts used / largest expert's share "
              "of the assignments (even: 1/experts).", ""]
    for label, r in data["routing"].items():
        usage = ", ".join(f"L{k} {100 * v['used']:.0f}% / {100 * v['largest_share']:.1f}%" for k, v in r["usage"].items())
        lines.append(f"- {label}: {usage}")
    lines += ["", "## Offload on this routing", "", "Each policy replayed over the KV-cache trace (decoding passes); "
              "`static` holds the most popular experts of other prompts; `adaptive` prices uploads and CPU rows "
              f"from {data['routing']['trained demo (q8_0)']['adaptive_prices']}.", "",
              "| model | slots | policy | hit rate | uploads / block | CPU token-slots / block |",
              "|---|---|---|---|---|---|"]
    for label, r in data["routing"].items():
        for o in r["offload"]:
            lines.append(f"| {label} | {o['slots']}/{r['experts']} | {o['policy']} | {o['hit_rate']:.3f} | "
                         f"{o['uploads_per_block']:.1f} | {o['cpu_slots_per_block']:.1f} |")
    wrong = data["models"][0]["wrong"] if data["models"] else []
    if wrong:
        lines += ["", f"Wrong answers of {data['models'][0]['label']} (first 10 of {len(wrong)}):", ""]
        lines += [f"- `{w['question']}` → `{w['answer']}`" for w in wrong[:10]]
    text = "\n".join(lines) + "\n"
    (args.out / "demo.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
