"""The CPU benchmark behind `tide bench`: a denoising step against the memory-bandwidth
floor and against llama.cpp on the same weights.

What one row of the report says, for a context length and a thread count:
- *ms/step*: our forward of one 32-token block at the end of a context already in the KV
  cache, logits for all 32 tokens (a block's first denoising step), median of the timed runs;
- *llama.cpp ms*: llama.cpp decoding the same 32 tokens at the same positions over the same
  context with logits for all 32, timed alternately with ours (in a child process: see
  `llamacpp.LlamaCppProcess`);
- *MB read*: the weight bytes our step reads (every matrix but the embedding table, plus the
  distinct experts the 32 tokens chose in each MoE layer, from the step's own routing);
- *floor*: those bytes at this machine's read bandwidth with the same thread count
  (`bandwidth.read_bandwidth`), and *× floor* = ms/step / floor.

Also measured once: load time, tokens/s end to end through `Engine.generate`, and memory
(peak RSS, and how much of it is anonymous: the weights are mapped, not copied).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

import tide_local
from tide_local import ggml
from tide_local.bench.bandwidth import read_bandwidth
from tide_local.bench.batching import batched_throughput
from tide_local.bench.ops import OP_KINDS, op_jobs
from tide_local.engine import CachedBlockModel
from tide_local.ggml.backend import usable_cores

BLOCK = 32


@dataclass
class BenchOptions:
    contexts: list[int] = field(default_factory=lambda: [512, 2048])
    threads: list[int] = field(default_factory=lambda: sorted({1, usable_cores()}))
    repeats: int = 5  # timed steps per (context, threads), after one warm-up
    llama_cpp: bool = True
    llama_cpp_copy: Path | None = None  # where the bailingmoe2 copy goes (default: beside the model)
    generate_tokens: int = 64  # end-to-end run; 0 skips it
    batch: list[int] = field(default_factory=list)  # sequences per forward to measure against one at a time
    seed: int = 0


def memory_status() -> dict:
    """Peak and current resident memory of this process (Linux /proc; ru_maxrss elsewhere)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        import resource

        scale = 1 if platform.system() == "Darwin" else 1024
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return out


def machine() -> dict:
    """This machine for a benchmark report: CPU model and vector ISA, cores, RAM, load, and
    the versions of Python, numpy, llama-cpp-python and the loaded libggml."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine(), platform.processor()):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = None
    try:
        llama = version("llama-cpp-python")
    except PackageNotFoundError:
        llama = None
    info = ggml.library_info()
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "usable_cores": usable_cores(), "ram_bytes": ram,
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "numpy": np.__version__, "llama_cpp_python": llama,
            "ggml_version": info.get("version"), "ggml_commit": info.get("commit")}


def plain_token_range(eng) -> int:
    """Random ids are drawn below the first special id (plain tokens of the tokenizer)."""
    specials = [i for i in (eng.mask_id, eng.eos_id, eng.role_end_id) if i is not None]
    return min(specials + [eng.config.vocab_size])


def _distinct_experts(model) -> dict[int, int]:
    return {layer: int(np.unique(r.experts).size) for layer, r in model.last_routing.items()}


def run(model_path: str | os.PathLike, opts: BenchOptions, log=lambda msg: None) -> dict:
    """Measure everything the report shows; returns it as a JSON-ready dict."""
    model_path = Path(model_path)
    report: dict = {"model": str(model_path), "options": {k: str(v) if isinstance(v, Path) else v
                                                          for k, v in asdict(opts).items()},
                    "machine": machine(), "rows": [], "prefill": []}
    n_ctx = max(opts.contexts) + BLOCK
    log(f"loading {model_path.name}")
    t0 = time.perf_counter()
    eng = tide_local.load(model_path, device="cpu", threads=max(opts.threads), n_ctx=n_ctx,
                          max_batch=max(opts.batch, default=1))
    report["load_seconds"] = time.perf_counter() - t0
    runner = None
    try:
        cfg = eng.config
        report["model_info"] = {"layers": cfg.n_layers, "experts": cfg.n_experts, "experts_used": cfg.n_experts_used,
                                "file_bytes": model_path.stat().st_size,
                                "type": eng.file.gguf.get("tide.output_type", "?")}
        rng = np.random.default_rng(opts.seed)
        high = plain_token_range(eng)
        if opts.generate_tokens:
            report["generate"] = _end_to_end(eng, rng, high, opts, log)
        if opts.batch:
            report["batched"] = _batched(eng, rng, high, opts, log)
        report["memory"] = memory_status()  # before the bandwidth probe's 1 GiB buffer counts too
        log("read bandwidth (STREAM-style probe)")
        report["bandwidth"] = {t: read_bandwidth(t) for t in opts.threads}

        if opts.llama_cpp:
            runner = _open_llama_cpp(model_path, opts, n_ctx, log)
            report["llama_cpp_load_seconds"] = runner.load_s
        for context in opts.contexts:
            rows, prefill = _measure_context(eng, runner, context, rng, high, opts, report["bandwidth"], log)
            report["rows"] += rows
            report["prefill"].append(prefill)
    finally:
        if runner is not None:
            runner.close()
        eng.close()
    return report


def _end_to_end(eng, rng, high: int, opts: BenchOptions, log) -> dict:
    """Tokens per second through the public API (prompt of 32 plain tokens, no stop ids, so
    every requested token is decoded; random weights commit about one token per step)."""
    eng.backend.n_threads = max(opts.threads)
    prompt = rng.integers(0, high, BLOCK).tolist()
    log(f"end to end: generating {opts.generate_tokens} tokens")
    res = eng.generate(prompt, max_new_tokens=opts.generate_tokens, stop_ids=[])
    s = res.stats
    return {"threads": max(opts.threads), "tokens": s.tokens, "steps": s.steps,
            "seconds": s.seconds, "tokens_per_second": s.tokens_per_second,
            "tokens_per_step": s.tokens_per_step, "prefill_seconds": s.prefill_seconds}


def _batched(eng, rng, high: int, opts: BenchOptions, log) -> dict:
    """`batched_throughput` over as many prompts of 32 plain tokens as the largest batch, no stop
    ids (every requested token is decoded)."""
    eng.backend.n_threads = max(opts.threads)
    n_new = opts.generate_tokens or BLOCK
    prompts = [rng.integers(0, high, BLOCK).tolist() for _ in range(max(opts.batch))]
    log(f"batched: {len(prompts)} prompts of {BLOCK} tokens, {n_new} new tokens each")
    rows = batched_throughput(eng, prompts, opts.batch, max_new_tokens=n_new, stop_ids=[])
    return {"threads": max(opts.threads), "prompts": len(prompts), "new_tokens": n_new, "rows": rows}


def _open_llama_cpp(model_path: Path, opts: BenchOptions, n_ctx: int, log):
    from tide_local.bench.llamacpp import LlamaCppProcess, view_path, write_bailingmoe2_copy

    copy = opts.llama_cpp_copy or view_path(model_path)
    log(f"llama.cpp: bailingmoe2 copy at {copy}")
    write_bailingmoe2_copy(model_path, copy)
    return LlamaCppProcess(copy, threads=max(opts.threads), n_ctx=n_ctx, batch=BLOCK)


def _measure_context(eng, runner, context: int, rng, high: int, opts: BenchOptions, bandwidth: dict,
                     log) -> tuple[list[dict], dict]:
    ctx_ids = rng.integers(0, high, context).astype(np.int32)
    block = rng.integers(0, high, BLOCK).astype(np.int32)
    rows = np.arange(BLOCK)
    log(f"context {context}: prefill")
    bm = CachedBlockModel(eng.model, BLOCK)
    eng.backend.n_threads = max(opts.threads)
    t0 = time.perf_counter()
    bm.prefill(ctx_ids)
    prefill_s = time.perf_counter() - t0
    prefill = {"context": context, "threads": max(opts.threads), "seconds": prefill_s}
    if runner is not None:
        runner.set_threads(max(opts.threads))
        t0 = time.perf_counter()
        runner.prefill(ctx_ids)
        prefill["llama_cpp_seconds"] = time.perf_counter() - t0

    def ours() -> float:
        t = time.perf_counter()
        bm.block_logits(block, context, rows)
        return time.perf_counter() - t

    out = []
    for threads in opts.threads:
        log(f"context {context}, {threads} thread(s): timing")
        eng.backend.n_threads = threads
        if runner is not None:
            runner.set_threads(threads)
        ours()  # warm-up: builds the pass of (32 tokens, start=context) and its LM head
        if runner is not None:
            runner.time_batch(block)
        mine, theirs = [], []
        for i in range(opts.repeats):  # alternate who goes first: load elsewhere falls on both
            if i % 2 == 0 or runner is None:
                mine.append(ours())
            if runner is not None:
                theirs.append(runner.time_batch(block))
            if i % 2 == 1 and runner is not None:
                mine.append(ours())
        distinct = _distinct_experts(eng.model)
        nbytes = eng.file.bytes_read_per_forward(distinct)
        step = float(np.median(mine))
        floor = nbytes / bandwidth[threads]
        # the same step's matmuls and attention one op kind at a time: what ggml's kernels need
        routing = {layer: (r.experts.copy(), r.weights.copy()) for layer, r in eng.model.last_routing.items()}
        ops = dict.fromkeys(OP_KINDS, 0.0)
        for kind, job in op_jobs(eng, context, BLOCK, [routing]):
            ops[kind] += job()
        kernels = sum(ops.values())
        row = {"context": context, "threads": threads, "ms_per_step": 1e3 * step, "ms_min": 1e3 * min(mine),
               "distinct_experts_per_layer": float(np.mean(list(distinct.values()))) if distinct else 0.0,
               "bytes_read": nbytes, "achieved_gbps": nbytes / step / 1e9,
               "bandwidth_gbps": bandwidth[threads] / 1e9, "floor_ms": 1e3 * floor, "x_floor": step / floor,
               "ops_ms": {k: 1e3 * v for k, v in ops.items()}, "kernels_ms": 1e3 * kernels,
               "x_kernels": step / kernels}
        if runner is not None:
            lc = float(np.median(theirs))
            row.update({"llama_cpp_ms": 1e3 * lc, "llama_cpp_ms_min": 1e3 * min(theirs),
                        "ours_over_llama_cpp": step / lc})
        out.append(row)
    return out, prefill


# -- the report ------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def render(report: dict) -> str:
    m, info = report["machine"], report.get("model_info", {})
    lines = [f"Model: `{Path(report['model']).name}` ({info.get('type', '?')}, {_gib(info.get('file_bytes', 0))}, "
             f"{info.get('layers')} layers, {info.get('experts_used')} of {info.get('experts')} experts per token)",
             f"Machine: {m['cpu']}, {m['cores']} cores, {_gib(m['ram_bytes'] or 0)} RAM; load average {m['load_average']}",
             ""]
    has_llama = any("llama_cpp_ms" in r for r in report["rows"])
    head = ["context", "threads", "ms/step", "min", "experts/layer", "MB read", "GB/s", "read bw GB/s",
            "floor ms", "× floor", "kernels ms", "× kernels"]
    if has_llama:
        head += ["llama.cpp ms", "ours / llama.cpp"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [r["context"], r["threads"], f"**{r['ms_per_step']:.1f}**", f"{r['ms_min']:.1f}",
                 f"{r['distinct_experts_per_layer']:.0f}", f"{r['bytes_read'] / 1e6:.0f}", f"{r['achieved_gbps']:.1f}",
                 f"{r['bandwidth_gbps']:.1f}", f"{r['floor_ms']:.1f}", f"{r['x_floor']:.2f}×",
                 f"{r['kernels_ms']:.1f}", f"{r['x_kernels']:.2f}×"]
        if has_llama:
            cells += [f"{r['llama_cpp_ms']:.1f}", f"**{r['ours_over_llama_cpp']:.2f}**"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "*kernels*: the step's matmuls and attention run alone, one op kind at a time over the same "
              "weights and routing (`tide_local.bench.ops`): what ggml's kernels need for the step. Split, ms:", ""]
    head = ["context", "threads"] + list(OP_KINDS)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        lines.append("| " + " | ".join([str(r["context"]), str(r["threads"])]
                                       + [f"{r['ops_ms'][k]:.1f}" for k in OP_KINDS]) + " |")
    lines.append("")
    if report.get("prefill"):
        head = ["prompt (tokens)", "threads", "ours s", "tokens/s"] + (["llama.cpp s", "tokens/s"] if has_llama else [])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in report["prefill"]:
            cells = [p["context"], p["threads"], f"{p['seconds']:.2f}", f"{p['context'] / p['seconds']:.0f}"]
            if "llama_cpp_seconds" in p:
                cells += [f"{p['llama_cpp_seconds']:.2f}", f"{p['context'] / p['llama_cpp_seconds']:.0f}"]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    lines.append(f"Load: {report['load_seconds']:.2f} s (ours)"
                 + (f", {report['llama_cpp_load_seconds']:.2f} s (llama.cpp)" if "llama_cpp_load_seconds" in report else ""))
    mem = report.get("memory", {})
    if mem:
        lines.append(f"Memory after loading and generating: peak RSS {_gib(mem.get('VmHWM', 0))}"
                     + (f", of which anonymous {_gib(mem['RssAnon'])} and mapped file {_gib(mem['RssFile'])} now"
                        if "RssAnon" in mem else ""))
    g = report.get("generate")
    if g:
        lines.append(f"End to end ({g['threads']} threads): {g['tokens']} tokens in {g['steps']} steps, "
                     f"{g['seconds']:.2f} s: **{g['tokens_per_second']:.2f} tokens/s** "
                     f"({g['tokens_per_step']:.2f} tokens/step; random weights commit about one token a step, "
                     "so this is a lower bound)")
    b = report.get("batched")
    if b:
        threads = f"{b['threads']} thread" + ("s" if b["threads"] != 1 else "")
        lines += ["", f"Batched ({threads}): {b['prompts']} prompts of 32 tokens, {b['new_tokens']} new tokens each, "
                  "one after another and then several per forward (what `tide serve --max-batch` does):",
                  "", "| sequences per forward | tokens/s | × one at a time | same tokens |", "|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['tokens_per_second']:.1f} | {r['over_one_at_a_time']:.2f}× | "
                  f"{'yes' if r['same_tokens'] else 'no (K-quant rounding)'} |" for r in b["rows"]]
    return "\n".join(lines) + "\n"
