"""The chat's text: status line, answer footers, load stages, /stats and error messages."""

from __future__ import annotations

import os
from pathlib import Path

from tide_local.errors import TideError
from tide_local.units import human_bytes


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def speed_text(stats) -> str:
    return (f"{stats.tokens_per_second:.1f} tokens/s · {stats.mean_steps_per_block:.1f} steps/block · "
            f"{stats.tokens_per_step:.2f} tokens/step")


def offload_text(stats, plan) -> str:
    """Hit rate, upload volume, the CPU's share of the routed expert work and the device
    memory in use; empty without offload."""
    o = stats.offload
    if o is None:
        return ""
    parts = [f"{stats.device} hits {o.hit_rate * 100:.1f}%", f"{_mb(o.upload_bytes)} uploaded",
             f"CPU {(1 - o.hit_rate) * 100 if o.hits + o.misses else 0.0:.1f}% of experts"]
    if plan is not None:
        parts.append(f"device memory {plan.total_bytes / 2**20:.0f} MiB")
    return " · ".join(parts)


def live_text(snap) -> str:
    """The status line while a block decodes (`snap`: a live.Snapshot)."""
    rate = snap.tokens / snap.seconds if snap.seconds > 0 else 0.0
    per_step = snap.tokens / snap.steps if snap.steps else 0.0
    return (f"decoding block {snap.block} · {snap.tokens} tokens · {rate:.1f} tokens/s · "
            f"{per_step:.2f} tokens/step · Esc stops")


def turn_footer(stats) -> str:
    end = " · hit max_new_tokens" if stats.finish_reason == "length" else ""
    return (f"{stats.tokens} tokens · {stats.tokens_per_second:.1f} tok/s · {stats.mean_steps_per_block:.1f} "
            f"steps/block · {stats.tokens_per_step:.2f} tok/step · {stats.wall_seconds:.1f} s{end}")


def describe_error(err: BaseException) -> str:
    if isinstance(err, (TideError, ValueError)):
        return str(err)
    return f"{type(err).__name__}: {err}"


def placement_text(engine) -> str:
    """Where the model runs: the device and threads, or the device and offload policy."""
    if engine is None:
        return ""
    if engine.plan is None:
        return f"{engine.device}, {engine.threads} threads"
    tau = f" tau {engine.tau}" if engine.tau else ""
    return f"{engine.device} · {engine.policy}{tau}"


def load_stage_text(path: str, load_options: dict) -> str:
    """What loading `path` with `load_options` (as for tide_local.load) is about to do."""
    size = human_bytes(os.path.getsize(path)) if os.path.exists(path) else "?"
    text = f"loading {Path(path).name} ({size}): memory-mapping the file, reading the tokenizer"
    device = load_options.get("device", "auto")
    if device == "cpu":
        return text
    budget = load_options.get("gpu_memory") or "free memory"
    upload = (f"planning device memory (budget: {budget}) and uploading attention, shared experts, "
              "the LM head and the expert slots")
    if device == "auto":
        return f"{text}; with a GPU, {upload} to it"
    return f"{text}; {upload} to {device}"


def stats_text(stats, engine, settings) -> str:
    """/stats: the last answer's statistics (None: no answer yet), the placement and memory
    plan, and the generation options (a commands.GenerationSettings)."""
    from tide_local.generate_cli import offload_table, summary_line

    lines = []
    if stats is None:
        lines.append("no answer yet")
    else:
        lines.append(summary_line(stats))
        lines.append(f"prompt {stats.prompt_tokens} tokens (prefill {stats.prefill_seconds:.2f} s), "
                     f"{stats.blocks} blocks, {stats.steps} steps (per block {list(stats.steps_per_block)}), "
                     f"{stats.forwards} forwards")
        if stats.offload is not None:
            lines.append(offload_table(stats))
    if engine is not None:
        lines.append(f"placement: {placement_text(engine)}")
        if engine.plan is not None:
            lines.append(engine.plan.describe())
    lines.append("generation options:\n" + settings.describe())
    return "\n".join(lines)
