"""The engine's step benchmark: ms per denoising step, where it goes, and the KV cache's gain.

    python benchmarks/bench_step.py                      # tiny + LLaDA2.0-mini-shaped model
    python benchmarks/bench_step.py --skip-mini          # tiny model only (a few minutes)

Measures, on the code path a user runs (``tide_local.load`` → ``Engine`` →
``CachedBlockModel`` → ``LLaDA2Model.forward``):

1. ms per denoising step: the active 32-token block forwarded against the KV cache,
   ``block_logits(block, start, rows=masked rows)``, with ``--context`` tokens already in
   the cache (prefilled through the engine's own prefill). The timed steps walk a block's
   denoising schedule evenly (masked rows from 32 down to 1, the LM head runs on those
   rows only), after warm-up steps that build the graphs; the median is reported.
   For the tiny model (f32, q8_0) and a LLaDA2.0-mini-shaped one (20 layers, 256
   experts, hidden 2048, random weights, q4_k_m), with 1 thread and all cores. The
   thread counts of a model are open at once and driven step by step in turn, so load
   from elsewhere on a shared machine falls on each alike.
2. Where a step goes: the engine's own phase timer (``Engine.timer``, a
   ``tide_local.model.timing.PhaseTimer``, reset before each timed step; nothing is
   patched): ggml compute (the ``compute_*`` phases: ``Backend.compute`` of the layer,
   expert and LM-head graphs), host routing (reading the router logits and choosing
   experts), the embedding lookup and upload, the experts' inputs, the logits read-back,
   and pass and LM-head graph construction; everything outside the compute phases is
   host time. Tensor set/get (the ctypes copies) has no phase of its own and is no
   longer a column: each copy is counted in the phase it serves (embedding, routing,
   experts' inputs, logits). Then the step's op kinds one at a time over the model's own
   weights (routed experts with each step's own routing, shared expert, attention
   projections and core, router, dense FFN, LM head), and the weights a step reads.
3. The block KV cache against full-window recompute: ``Engine.generate`` with
   ``kv_cache=True`` and ``kv_cache=False`` on the same prompt, alternated, default
   threshold, no stop ids so every run decodes all tokens; the report says whether the
   two gave the same tokens.

The mini-shaped model is made once: a random Hugging Face checkpoint (32.5 GB bf16,
fast mode) in the cache dir (``$TIDE_BENCH_DIR`` or ``~/.cache/tide-local/bench``),
converted to q4_k_m (about 9.9 GB), then the checkpoint is deleted. Later runs reuse the
GGUF. Results go to benchmarks/results/step.md and step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tide_local  # noqa: E402
from tide_local.converters.convert import convert  # noqa: E402
from tide_local.converters.testmodel import build_config, checkpoint_nbytes, make_checkpoint  # noqa: E402
from tide_local.bench.cpu import machine, plain_token_range  # noqa: E402
from tide_local.bench.ops import OP_KINDS, op_jobs  # noqa: E402
from tide_local.engine import CachedBlockModel  # noqa: E402
from tide_local.ggml.backend import usable_cores  # noqa: E402
from tide_local.model.timing import COMPUTE_PHASES, PHASES  # noqa: E402
from tide_local.progress import human_bytes, human_seconds  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BLOCK = 32


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------


def cache_dir() -> Path:
    d = Path(os.environ.get("TIDE_BENCH_DIR") or Path.home() / ".cache" / "tide-local" / "bench")
    d.mkdir(parents=True, exist_ok=True)
    return d


class _WriteProgress:
    """progress(done, total) for make_checkpoint: a redrawn line on a terminal, a line per 5% otherwise."""

    def __init__(self, label: str):
        self.label, self.start, self.last, self.tty = label, time.monotonic(), -1.0, sys.stderr.isatty()

    def __call__(self, done: int, total: int) -> None:
        frac = done / max(1, total)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0
        line = (f"{self.label}: {frac * 100:5.1f}% {human_bytes(done)}/{human_bytes(total)} "
                f"{human_bytes(done / max(elapsed, 1e-9))}/s ETA {human_seconds(eta)}")
        if self.tty:
            if elapsed - self.last > 0.2 or done >= total:
                self.last = elapsed
                print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
        elif int(frac * 20) > int(self.last) or done >= total:
            self.last = int(frac * 20)
            log(line)


def tiny_models(root: Path) -> dict[str, Path]:
    """The tiny preset (seed 0) as f32 and q8_0 GGUFs (made in seconds if missing)."""
    out = {t: root / f"tiny-{t}.gguf" for t in ("f32", "q8_0")}
    if not all(p.is_file() for p in out.values()):
        hf = make_checkpoint(root / "tiny-hf", preset="tiny", seed=0)
        for t, p in out.items():
            if not p.is_file():
                convert(hf, p, t, progress=False)
        shutil.rmtree(hf)
    return out


def mini_model(root: Path) -> Path:
    """The LLaDA2.0-mini-shaped random model as q4_k_m, made once (HF checkpoint deleted after)."""
    gguf = root / "mini-q4_k_m.gguf"
    if gguf.is_file():
        log(f"mini-shaped model: reusing {gguf} ({human_bytes(gguf.stat().st_size)})")
        return gguf
    hf = root / "mini-hf"
    need = checkpoint_nbytes(build_config("mini")) + 10.5e9
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"{root}: making the mini-shaped model needs about {human_bytes(need)} free, "
                         f"{human_bytes(free)} is (set TIDE_BENCH_DIR, or --skip-mini)")
    t0 = time.perf_counter()
    log(f"mini-shaped model: writing a random LLaDA2.0-mini checkpoint to {hf} (once)")
    make_checkpoint(hf, preset="mini", seed=0, fast=True, progress=_WriteProgress("  checkpoint"))
    t1 = time.perf_counter()
    log(f"  checkpoint written in {human_seconds(t1 - t0)}; converting to q4_k_m")
    convert(hf, gguf, "q4_k_m", progress=True, log=_ThrottledStream())
    t2 = time.perf_counter()
    log(f"  converted in {human_seconds(t2 - t1)}; deleting the checkpoint")
    shutil.rmtree(hf)
    return gguf


class _ThrottledStream:
    """A stream for Progress: on a terminal it passes through; otherwise it keeps the latest
    redrawn line and prints it at most every `every` seconds (and the final lines), so logs
    show progress without a line per redraw."""

    def __init__(self, every: float = 30.0):
        self.tty, self.every, self.last, self.pending = sys.stderr.isatty(), every, time.monotonic(), ""

    def isatty(self) -> bool:
        return self.tty

    def write(self, s: str) -> int:
        if self.tty:
            return sys.stderr.write(s)
        for part in s.replace("\x1b[K", "").split("\r"):
            if "\n" in part:
                done, _, rest = part.rpartition("\n")
                sys.stderr.write(done + "\n")
                self.pending = rest
            elif part:
                self.pending = part
        if self.pending and time.monotonic() - self.last > self.every:
            self.last = time.monotonic()
            sys.stderr.write(self.pending + "\n")
            self.pending = ""
        return len(s)

    def flush(self) -> None:
        sys.stderr.flush()


def preread(path: Path) -> dict:
    """Read the file once so its pages are in the page cache (a model that fits in RAM runs
    from memory after its first steps; this makes the first timed steps the same)."""
    t0 = time.perf_counter()
    size = path.stat().st_size
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while f.readinto(buf):
            pass
    return {"bytes": size, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------
# where a step's time goes: the engine's phase timer
# ---------------------------------------------------------------------------------------


def timed(eng, fn) -> tuple[float, dict[str, float], dict[str, int]]:
    """Run fn() with the engine's PhaseTimer reset first: its wall seconds, then seconds and
    calls per phase (``tide_local.model.timing``; nothing is patched)."""
    timer = eng.timer
    timer.reset()
    t0 = time.perf_counter()
    fn()
    total = time.perf_counter() - t0
    return total, dict(timer.seconds), dict(timer.calls)


# ---------------------------------------------------------------------------------------
# 1 + 2: the denoising step
# ---------------------------------------------------------------------------------------


def masked_schedule(n_steps: int) -> list[int]:
    """Masked rows of the timed steps: evenly over a block's schedule, 32 down to 1."""
    if n_steps == 1:
        return [BLOCK]
    return [int(m) for m in np.round(np.linspace(BLOCK, 1, n_steps))]


def step_inputs(rng, engine, masked: int) -> tuple[np.ndarray, np.ndarray]:
    block = rng.integers(0, plain_token_range(engine), size=BLOCK).astype(np.int32)
    block[BLOCK - masked:] = engine.mask_id
    return block, np.arange(BLOCK - masked, BLOCK)


class _Run:
    """One engine (one thread count) of a model, prefilled to `context`."""

    def __init__(self, path: Path, threads: int, context: int, seed: int):
        self.threads, self.context = threads, context
        self.eng = tide_local.load(path, threads=threads)
        self.bm = CachedBlockModel(self.eng.model, BLOCK)
        rng = np.random.default_rng(seed)  # the same context for every thread count
        t0 = time.perf_counter()
        self.bm.prefill(rng.integers(0, plain_token_range(self.eng), size=context).astype(np.int32))
        self.prefill_s = time.perf_counter() - t0
        self.times, self.parts, self.routings = [], [], []

    def step(self, block, rows) -> tuple[float, dict[str, float], dict[str, int]]:
        """One step: its wall seconds and the engine's phase timer (seconds, calls) over it."""
        return timed(self.eng, lambda: self.bm.block_logits(block, self.context, rows))


def measure_steps(path: Path, threads: list[int], context: int, n_steps: int, seed: int = 0) -> list[dict]:
    """The step on one model for each thread count. One engine per thread count, all open at
    once and driven in turn step by step (alternating which goes first), so that load from
    elsewhere on the machine falls on every thread count alike."""
    load = os.getloadavg()[0]
    runs = [_Run(path, t, context, seed) for t in threads]
    try:
        eng0 = runs[0].eng
        cfg = eng0.config
        rng = np.random.default_rng(seed + 1)
        sched = masked_schedule(n_steps)
        inputs = [step_inputs(rng, eng0, m) for m in sched]
        # warm-up: builds the pass of (32 tokens, start=context) and an LM head per row count
        for r in runs:
            r.eng.timer.reset()
            for block, rows in inputs:
                r.bm.block_logits(block, r.context, rows)
            sec, calls = r.eng.timer.seconds, r.eng.timer.calls
            r.builds = {"pass_ms": 1e3 * sec["build_pass"] / max(1, calls["build_pass"]),
                        "lm_head_ms": 1e3 * sec["build_lm_head"] / max(1, calls["build_lm_head"])}
        order = lambda i: runs if i % 2 == 0 else runs[::-1]  # noqa: E731
        # the timed steps, each with the engine's phase timer; the routing each step chose
        for i, (block, rows) in enumerate(inputs):
            for r in order(i):
                total, sec, calls = r.step(block, rows)
                r.times.append(total)
                graphs = sum(calls.get(k, 0) for k in COMPUTE_PHASES)
                r.parts.append({**{k: sec.get(k, 0.0) for k in PHASES}, "total": total, "graphs": graphs})
                r.routings.append({l: (x.experts.copy(), x.weights.copy()) for l, x in r.eng.model.last_routing.items()})
        # where the compute goes: the same op jobs for every thread count, in turn
        n_rows = int(np.median(sched))
        jobs = [op_jobs(r.eng, context, n_rows, r.routings) for r in runs]
        acc = [dict.fromkeys(OP_KINDS, 0.0) for _ in runs]
        for j in range(len(jobs[0])):
            for k in (range(len(runs)) if j % 2 == 0 else reversed(range(len(runs)))):
                category, job = jobs[k][j]
                acc[k][category] += job()
        results = []
        for r, a in zip(runs, acc):
            breakdown = {key: 1e3 * v for key, v in a.items()}
            distinct = [{l: len(np.unique(rt[l][0])) for l in cfg.moe_layers} for rt in r.routings]
            results.append(_summary(r, path, cfg, sched, load, breakdown, distinct))
        return results
    finally:
        for r in runs:
            r.eng.close()


def _summary(r: _Run, path: Path, cfg, sched, load, breakdown, distinct) -> dict:
    parts, times = r.parts, r.times
    mean = {k: 1e3 * float(np.mean([p[k] for p in parts])) for k in parts[0]}
    compute = sum(mean[k] for k in COMPUTE_PHASES)
    host = mean["total"] - compute
    experts_host = mean["experts"] - mean["compute_experts"]  # compute_experts runs inside experts
    per_layer = [float(np.mean(list(d.values()))) for d in distinct]
    touched = [r.eng.file.bytes_read_per_forward(d) for d in distinct]
    return {
        "model": None, "file": str(path), "file_bytes": path.stat().st_size, "threads": r.threads,
        "context": r.context, "masked_rows": sched, "prefill_s": r.prefill_s, "load_before": load,
        "ms_per_step": 1e3 * statistics.median(times), "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times),
        "ms_steps": [1e3 * t for t in times],
        "mean_ms": mean["total"], "phases_ms": {k: mean[k] for k in PHASES},
        "compute_ms": compute, "compute_layers_ms": mean["compute_layers"],
        "host_ms": host, "host_share": host / mean["total"],
        "route_ms": mean["route"], "embed_ms": mean["embed"], "experts_host_ms": experts_host,
        "lm_head_ms": mean["compute_lm_head"] + mean["logits"],
        "lm_head_compute_ms": mean["compute_lm_head"], "lm_head_get_ms": mean["logits"],
        "other_host_ms": host - mean["route"] - mean["embed"] - experts_host - mean["logits"],
        "graphs_per_step": parts[0]["graphs"],
        "build_pass_ms": r.builds["pass_ms"], "build_lm_head_ms": r.builds["lm_head_ms"],
        "experts_per_layer": float(np.mean(per_layer)), "experts_per_layer_steps": per_layer,
        "n_experts": cfg.n_experts, "breakdown_ms": breakdown,
        "weight_bytes_per_step": float(np.mean(touched)),
        "weight_gb_per_s": float(np.mean(touched)) / (mean["compute_layers"] / 1e3) / 1e9,
    }




# ---------------------------------------------------------------------------------------
# 3: KV cache vs full-window recompute
# ---------------------------------------------------------------------------------------


def kv_compare(path: Path, threads: int, prompt_len: int, new_tokens: int, repeats: int, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    load = os.getloadavg()[0]
    with tide_local.load(path, threads=threads) as eng:
        prompt = [int(i) for i in rng.integers(0, plain_token_range(eng), size=prompt_len)]
        for kv in (True, False):  # warm-up: pages, allocator sizes
            eng.generate(prompt, max_new_tokens=BLOCK, kv_cache=kv, stop_ids=[])
        runs = {True: [], False: []}
        tokens = {}
        for r in range(repeats):
            for kv in ((True, False) if r % 2 == 0 else (False, True)):
                log(f"    kv_cache={kv} run {r + 1}/{repeats} ...")
                res = eng.generate(prompt, max_new_tokens=new_tokens, kv_cache=kv, stop_ids=[])
                runs[kv].append(res.stats)
                tokens[kv] = res.tokens
                log(f"      {res.stats.wall_seconds:.2f} s, {res.stats.steps} steps")
        defaults = dict(eng.defaults)
    med = {kv: statistics.median(s.wall_seconds for s in runs[kv]) for kv in runs}
    first = runs[True][0]
    same = tokens[True] == tokens[False]
    diff = next((i for i, (a, b) in enumerate(zip(tokens[True], tokens[False])) if a != b), None)
    return {
        "file": str(path), "threads": threads, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
        "threshold": defaults["threshold"], "steps_per_block": defaults["steps"], "repeats": repeats,
        "cached_s": med[True], "uncached_s": med[False], "speedup": med[False] / med[True],
        "pair_speedups": [u.wall_seconds / c.wall_seconds for c, u in zip(runs[True], runs[False])],
        "cached_runs_s": [s.wall_seconds for s in runs[True]],
        "uncached_runs_s": [s.wall_seconds for s in runs[False]],
        "steps": first.steps, "generated": len(tokens[True]),
        "cached_forwarded_tokens": first.forwarded_tokens, "uncached_forwarded_tokens": runs[False][0].forwarded_tokens,
        "cached_ms_per_step": 1e3 * med[True] / first.steps,
        "uncached_ms_per_step": 1e3 * med[False] / first.steps,
        "identical_tokens": same, "first_difference": diff, "load_before": load,
    }


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------


def _f(x, nd=1):
    return "–" if x is None else f"{x:.{nd}f}"


def render(report: dict) -> str:
    m = report["machine"]
    out = [
        "# Step benchmark",
        "",
        f"`{report['command']}` — {report['date']}",
        "",
        f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['usable_cores']} cores, "
        f"{human_bytes(m['ram_bytes'] or 0)} RAM; Python {m['python']}, numpy {m['numpy']}, "
        f"ggml {m['ggml_version']} (llama-cpp-python {m['llama_cpp_python']}), CPU backend.",
        "",
        f"## ms per denoising step (32-token block, {report['context']} tokens in the KV cache)",
        "",
        "Median of the timed steps (masked rows spread over a block's schedule, "
        f"{report['steps'][0]['masked_rows'] if report['steps'] else ''}; the LM head runs on the masked rows), "
        "graphs already built; the thread counts of a model run in one process, step by step in turn. *compute* is the "
        "engine's compute phases (`Backend.compute` of the step's graphs: ggml compute and its call); *host* is the "
        "rest of the step (Python graph driving, ctypes, tensor copies, host routing), from the engine's phase timer "
        "over the same steps. *load*: the 1-minute load average before the measurement (the machine may be "
        "shared; with every core busy elsewhere the multi-thread numbers suffer most).",
        "",
        "| model | weights | threads | ms/step | min | ggml compute ms | host ms | host share | routing ms | LM head ms | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        out.append(
            f"| {s['model']} | {s['type']} ({human_bytes(s['file_bytes'])}) | {s['threads']} | **{_f(s['ms_per_step'])}** | "
            f"{_f(s['ms_min'])} | {_f(s['compute_ms'])} | {_f(s['host_ms'])} | {100 * s['host_share']:.0f}% | "
            f"{_f(s['route_ms'], 2)} | {_f(s['lm_head_ms'], 2)} | {s['load_before']:.1f} |"
        )
    out += [
        "",
        "Host time split, and graph construction (not in ms/step: a new block position builds a new pass, "
        "and every new masked-row count builds an LM-head graph, which during generation is nearly every step). "
        "Phases of the engine's timer: *routing* includes reading the router logits back; *experts' inputs* is the "
        "experts executor's host work before a layer's graph (expert ids and weights; with offload also uploads and "
        "waiting for the CPU share); *other host* is the step's time outside every phase (Python graph driving "
        "between them); tensor set/get is no column of its own, each copy counts in the phase it serves. "
        "*LM-head graph build* averages every LM-head graph built, the one a pass reserves included (that one is "
        "in the pass build too):",
        "",
        "| model | threads | graphs/step | routing ms | embedding ms | experts' inputs ms | other host ms | "
        "LM head: compute / logits read ms | pass build ms (per block) | LM-head graph build ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        out.append(
            f"| {s['model']} {s['type']} | {s['threads']} | {s['graphs_per_step']} | {_f(s['route_ms'], 2)} | "
            f"{_f(s['embed_ms'], 2)} | {_f(s['experts_host_ms'], 2)} | {_f(s['other_host_ms'], 2)} | "
            f"{_f(s['lm_head_compute_ms'], 2)} / {_f(s['lm_head_get_ms'], 2)} | {_f(s['build_pass_ms'])} | "
            f"{_f(s['build_lm_head_ms'], 2)} |"
        )
    out += [
        "",
        "Where the ggml compute goes: the step's matmuls and attention, one op kind at a time over the model's "
        "own weights (every layer; routed experts with each timed step's own routing, averaged; LM head on the median masked-row "
        "count; thread counts in turn, op by op), ms per step. *rest* = ggml compute of the step minus these: "
        "norms, RoPE, K/V cache copies, adds; it is negative where one-op graphs cost more than the same ops "
        "inside the step's graphs (each graph has its own start-up).",
        "",
        "| model | threads | routed experts | shared expert | attention proj. | attention core | router | dense FFN | LM head | rest |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        b = s["breakdown_ms"]
        rest = s["compute_ms"] - sum(b.values())
        out.append(
            f"| {s['model']} {s['type']} | {s['threads']} | " + " | ".join(
                f"{b[k]:.1f} ({100 * b[k] / s['compute_ms']:.0f}%)" for k in
                ("routed_experts", "shared_expert", "attn_proj", "attn_core", "router", "dense_ffn", "lm_head"))
            + f" | {rest:.1f} ({100 * rest / s['compute_ms']:.0f}%) |"
        )
    last = report["steps"][-1] if report["steps"] else None
    big = [s for s in report["steps"] if (s["model"], s["type"]) == (last["model"], last["type"])] if last else []
    if big:
        out += [
            "",
            f"Step time against the block's content ({big[0]['model']} {big[0]['type']}): masked positions all hold "
            "the same token, so a block with many masks routes to fewer distinct experts:",
            "",
            "| masked rows | distinct experts / layer | " + " | ".join(f"ms, {s['threads']} thr." for s in big) + " |",
            "|---|---|" + "---|" * len(big),
        ]
        for i, m in enumerate(big[0]["masked_rows"]):
            out.append(f"| {m} | {big[0]['experts_per_layer_steps'][i]:.0f} | "
                       + " | ".join(f"{s['ms_steps'][i]:.0f}" for s in big) + " |")
    out += [
        "",
        "Weights a step reads: every non-expert matrix (attention, shared experts, dense layer, router, LM head) "
        "plus the distinct routed experts the block's 32 tokens chose in each MoE layer:",
        "",
        "| model | threads | distinct experts / layer | weight MB / step | GB/s over layer compute |",
        "|---|---|---|---|---|",
    ]
    for s in report["steps"]:
        out.append(
            f"| {s['model']} {s['type']} | {s['threads']} | {s['experts_per_layer']:.0f} of {s['n_experts']} | "
            f"{s['weight_bytes_per_step'] / 1e6:.0f} | {s['weight_gb_per_s']:.1f} |"
        )
    if report["kv"]:
        out += [
            "",
            "## Block KV cache vs full-window recompute",
            "",
            "`Engine.generate` with `kv_cache=True` and `kv_cache=False`, alternated in one process; "
            "default threshold (random weights: one token per step), no stop ids, so both decode every token. "
            "Seconds are medians (prefill included).",
            "",
            "| model | threads | prompt | new tokens | steps | kv_cache=True s | kv_cache=False s | speedup | "
            "forwarded tokens (cached / full) | cached ms/step | same tokens |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for k in report["kv"]:
            out.append(
                f"| {k['model']} | {k['threads']} | {k['prompt_tokens']} | {k['new_tokens']} | {k['steps']} | "
                f"{k['cached_s']:.2f} | {k['uncached_s']:.2f} | **{k['speedup']:.1f}×** | "
                f"{k['cached_forwarded_tokens']} / {k['uncached_forwarded_tokens']} | {k['cached_ms_per_step']:.1f} | "
                f"{'yes' if k['identical_tokens'] else 'no, from token ' + str(k['first_difference'])} |"
            )
    if any(not k["identical_tokens"] for k in report["kv"]):
        out += ["", "Different tokens between the modes: both compute the same math, in passes of different shapes "
                "(the block alone vs the whole window). ggml's CPU K-quant matmul takes a tiled kernel for a matrix "
                "or expert with 8 rows or more and a per-row kernel below that, and the two round differently in "
                "the last bits; MoE routing flips amplify that, and random weights give flat logits, so greedy "
                "argmaxes can part. With GGML_CPU_TILED_MM=0 the two modes are bit-identical "
                "(tests/test_exact_kernels.py); the tests also check both modes against the torch reference's "
                "tokens on the tiny model."]
    if report.get("notes"):
        out += ["", *report["notes"]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def parse_threads(text: str | None) -> list[int]:
    cores = usable_cores()
    if not text:
        return sorted({1, cores})
    return [cores if t == "all" else int(t) for t in text.split(",")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-mini", action="store_true", help="only the tiny model (no 32 GB checkpoint / 9.9 GB GGUF)")
    p.add_argument("--threads", help="comma-separated thread counts ('all' = every core; default: 1 and all cores)")
    p.add_argument("--steps", type=int, default=16, help="timed steps per measurement (default 16)")
    p.add_argument("--context", type=int, default=512, help="tokens in the KV cache before the active block (multiple of 32)")
    p.add_argument("--kv-tokens", type=int, default=1024, help="tokens generated for the KV-cache comparison on tiny (0: skip)")
    p.add_argument("--mini-kv-tokens", type=int, default=256,
                   help="tokens generated for the KV-cache comparison on the mini shape (0: skip)")
    p.add_argument("--repeats", type=int, default=3, help="generate runs per mode on tiny (mini: 1)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.context % BLOCK or args.context < 0:
        p.error(f"--context must be a multiple of {BLOCK}")
    if args.steps < 1:
        p.error("--steps must be at least 1")
    threads = parse_threads(args.threads)
    load_start = os.getloadavg()
    root = cache_dir()
    report = {
        "command": "python benchmarks/bench_step.py" + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "context": args.context,
        "steps": [], "kv": [], "notes": [],
    }
    models = [("tiny", t, path) for t, path in tiny_models(root).items()]
    if not args.skip_mini:
        mini = mini_model(root)
        log(f"reading {mini.name} into the page cache ...")
        pr = preread(mini)
        log(f"  {human_bytes(pr['bytes'])} in {pr['seconds']:.1f} s")
        models.append(("mini-shaped", "q4_k_m", mini))
    for name, wtype, path in models:
        log(f"step: {name} {wtype}, threads {threads} (interleaved), context {args.context}, {args.steps} timed steps ...")
        for s in measure_steps(path, threads, args.context, args.steps):
            s.update(model=name, type=wtype)
            report["steps"].append(s)
            log(f"  {s['threads']} thread(s): {s['ms_per_step']:.1f} ms/step (compute {s['compute_ms']:.1f}, "
                f"host {s['host_ms']:.1f} ms, {100 * s['host_share']:.0f}%; routing {s['route_ms']:.2f}, "
                f"LM head {s['lm_head_ms']:.2f} ms)")
    t_all = max(threads)
    kv_jobs = []
    if args.kv_tokens:
        kv_jobs.append(("tiny q8_0", root / "tiny-q8_0.gguf", args.kv_tokens, args.repeats))
    if not args.skip_mini and args.mini_kv_tokens:
        kv_jobs.append(("mini-shaped q4_k_m", root / "mini-q4_k_m.gguf", args.mini_kv_tokens, 1))
    for name, path, n, repeats in kv_jobs:
        log(f"kv cache: {name}, {n} new tokens, {t_all} thread(s), {repeats} run(s) per mode ...")
        k = kv_compare(path, t_all, BLOCK, n, repeats)
        k["model"] = name
        report["kv"].append(k)
        log(f"  cached {k['cached_s']:.2f} s, full window {k['uncached_s']:.2f} s: {k['speedup']:.2f}x")
    load = os.getloadavg()
    report["load_average"] = {"start": list(load_start), "end": list(load)}
    report["notes"].append(
        f"Load average (1 min) at start {load_start[0]:.1f}, at the end {load[0]:.1f} on {report['machine']['usable_cores']} "
        "cores: other work on the machine inflates the multi-thread numbers most (ggml's threads wait for each other)."
    )
    text = render(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step.md").write_text(text)
    (out / "step.json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)
    log(f"wrote {out / 'step.md'} and {out / 'step.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
