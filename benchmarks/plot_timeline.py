"""Plot the per-layer timeline of an offloaded generation: when each MoE layer's refresh
uploads, device experts, CPU misses and the wait for them ran, so the overlap can be seen.

    tide generate -m MODEL.gguf --device emulated --gpu-memory 2GiB --trace run.json "prompt"
    python benchmarks/plot_timeline.py run.json -o timeline.png          # 2 passes from the middle
    python benchmarks/plot_timeline.py run.json --passes 5-8

The trace's "timeline" holds, per pass and MoE layer, (start, end) seconds of "upload",
"device", "cpu" (in the CPU worker thread) and "wait" (the device side waiting for the CPU).
It also prints per phase the total seconds and how much of the CPU's time ran beside the
uploads and the device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PHASES = [("upload", "#d62728"), ("device", "#1f77b4"), ("cpu", "#2ca02c"), ("wait", "#7f7f7f")]


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def summary(timeline: list[dict]) -> dict:
    """Seconds per phase, and the CPU's seconds that ran beside an upload or the device."""
    totals = {name: sum(s[name][1] - s[name][0] for s in timeline if name in s) for name, _ in PHASES}
    beside = sum(overlap(s["cpu"], s[o]) for s in timeline if "cpu" in s for o in ("upload", "device") if o in s)
    return {**totals, "cpu_beside_device": beside}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="a trace written by `tide generate --trace` with a device")
    p.add_argument("-o", "--output", type=Path, default=Path("timeline.png"))
    p.add_argument("--passes", default=None, help="FIRST-LAST passes to draw (default: 2 from the middle)")
    args = p.parse_args(argv)
    try:
        timeline = json.loads(args.trace.read_text()).get("timeline")
    except (OSError, ValueError, AttributeError) as err:
        sys.exit(f"{args.trace}: not a readable trace ({err})")
    if not timeline:
        sys.exit(f"{args.trace}: no timeline (record it with a device: --device/--gpu-memory and --trace)")
    passes = sorted({s["pass"] for s in timeline})
    if args.passes:
        first, _, last = args.passes.partition("-")
        chosen = {n for n in passes if int(first) <= n <= int(last or first)}
    else:
        middle = len(passes) // 2
        chosen = set(passes[middle:middle + 2])
    spans = [s for s in timeline if s["pass"] in chosen]
    if not spans:
        sys.exit(f"no passes {args.passes} in the timeline (it has {passes[0]}..{passes[-1]})")
    totals = summary(timeline)
    print("whole trace: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in totals.items()))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({s["layer"] for s in spans})
    t0 = min(v[0] for s in spans for k, v in s.items() if isinstance(v, list))
    fig, ax = plt.subplots(figsize=(11, 1 + 0.5 * len(layers)))
    for s in spans:
        y = layers.index(s["layer"])
        for i, (name, color) in enumerate(PHASES):
            if name in s:
                start, end = s[name]
                ax.barh(y + (i - 1.5) * 0.2, (end - start) * 1e3, left=(start - t0) * 1e3, height=0.18, color=color,
                        label=name if s is spans[0] or name not in ax.get_legend_handles_labels()[1] else None)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.set_xlabel("ms")
    ax.set_title(f"{args.trace.name}: passes {min(chosen)}..{max(chosen)}")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
