"""CPU speed at full size: our denoising step against the memory-bandwidth floor and
against llama.cpp on the same weights (`tide bench` on the tiny and mini-shaped models).

    python benchmarks/bench_cpu.py                 # tiny + LLaDA2.0-mini-shaped model
    python benchmarks/bench_cpu.py --skip-mini     # tiny model only (a minute)

For each model: `tide_local.bench.cpu.run` (what each column means is in
`tide bench --help`) at contexts 512 and 2048 with 1 thread and every core, llama.cpp
timed alternately in the same process on a `bailingmoe2` copy of the same GGUF, the
STREAM-style read bandwidth, load time, peak RSS and tokens/s end to end.

The mini-shaped model (20 layers, 256 experts, hidden 2048, random weights, q4_k_m,
about 9.9 GB) is made once by benchmarks/bench_step.py's recipe in the cache dir
(``$TIDE_BENCH_DIR`` or ``~/.cache/tide-local/bench``), its llama.cpp copy beside it.
Both stay mapped during the run: the machine needs about twice the model in RAM.
Results go to benchmarks/results/cpu.md and cpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_step import cache_dir, log, mini_model, preread, tiny_models  # noqa: E402

from tide_local.bench.cpu import BenchOptions, render, run  # noqa: E402
from tide_local.bench.llamacpp import view_path, write_bailingmoe2_copy  # noqa: E402
from tide_local.progress import human_bytes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-mini", action="store_true", help="only the tiny model")
    p.add_argument("--repeats", type=int, default=7, help="timed steps per row (default 7)")
    p.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    root = cache_dir()
    models = [("tiny", root / "tiny-q8_0.gguf")]
    tiny_models(root)
    if not args.skip_mini:
        models.append(("mini-shaped", mini_model(root)))
    report = {"command": "python benchmarks/bench_cpu.py" + ("" if not argv and len(sys.argv) == 1 else
                                                           " " + " ".join(argv if argv is not None else sys.argv[1:])),
              "date": time.strftime("%Y-%m-%d %H:%M"), "models": []}
    for name, path in models:
        copy = view_path(path)
        write_bailingmoe2_copy(path, copy)
        for f in (path, copy):  # both into the page cache: the timed steps should not read the disk
            pr = preread(f)
            log(f"{f.name}: {human_bytes(pr['bytes'])} read in {pr['seconds']:.1f} s")
        opts = BenchOptions(repeats=args.repeats, generate_tokens=64 if name == "tiny" else 32)
        r = run(path, opts, log=lambda m, n=name: log(f"[{n}] {m}"))
        r["name"] = name
        report["models"].append(r)
    text = "# CPU benchmark\n\n`" + report["command"] + "` — " + report["date"] + "\n\n"
    text += "\n".join(f"## {r['name']}\n\n{render(r)}" for r in report["models"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.md").write_text(text)
    (out / "cpu.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(text)
    log(f"wrote {out / 'cpu.md'} and {out / 'cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
