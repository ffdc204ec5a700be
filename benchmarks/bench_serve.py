"""`tide serve` under concurrent clients: batched decoding against the same requests one after another.

    python benchmarks/bench_serve.py                       # demo + mini-shaped, CPU + emulated device
    python benchmarks/bench_serve.py --models demo --devices cpu --clients 1,8

For each model and device the server runs in this process on loopback (the real app, uvicorn and
the OpenAI client), with `--max-batch` equal to the number of clients. C client threads take the
same fixed list of requests from a shared queue, each sending its next request when its last one
is answered. C = 1 is the sequential baseline: one request at a time, nothing batched. Per C:
aggregate completion tokens/s, the ratio to C = 1 (measured in the same run, side by side),
per-request latency (mean, p95), requests per forward and the MoE's rows per expert per
forward (the server's own /metrics), and whether every answer equals the sequential one.

Models: the packaged trained demo model (q8_0, chat requests from the held-out task prompts,
answers stop on their own) and a LLaDA2.0-mini-shaped model with 3 layers (1 dense + 2 MoE: the
real hidden size, 256 experts top-8, the real 157k vocabulary; random weights, built once into
$TIDE_BENCH_DIR or ~/.cache/tide-local/bench; completions of random token ids, 32 new tokens in
8 steps, so every request does the same work). The device is the emulated one (a second CPU
backend) with half of the experts in slots: on this machine it shares the same two cores.

Results: benchmarks/results/serve.md and serve.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tide_local  # noqa: E402
from tide_local.demo import demo_model_path  # noqa: E402
from tide_local.demo_tasks import evaluation_set  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCH_DIR = Path(os.environ.get("TIDE_BENCH_DIR") or Path.home() / ".cache" / "tide-local" / "bench")
MINI_LAYERS = {"num_hidden_layers": 3}  # 1 dense + 2 MoE layers of the mini shape


def mini_model(kind: str) -> Path:
    """The few-layer mini-shaped GGUF, built once."""
    path = BENCH_DIR / f"mini3-{kind}.gguf"
    if path.exists():
        return path
    from tide_local.converters.convert import convert
    from tide_local.converters.testmodel import build_config, make_checkpoint

    print(f"building {path} (once) ...", file=sys.stderr, flush=True)
    checkpoint = make_checkpoint(BENCH_DIR / "mini3-hf", build_config("mini", MINI_LAYERS), seed=5)
    convert(checkpoint, path, kind, progress=True)
    return path


def requests_for(model: str, n: int) -> tuple[str, list[dict]]:
    """(endpoint, request bodies) of the workload."""
    if model == "demo":
        examples = evaluation_set(-(-n // 4), seed=1)[:n]
        return "chat/completions", [{"messages": e.messages(), "max_tokens": 64} for e in examples]
    rng = np.random.default_rng(0)
    return "completions", [{"prompt": [int(t) for t in rng.integers(0, 150000, size=int(rng.integers(8, 90)))],
                            "max_tokens": 32, "steps": 8} for _ in range(n)]


@contextlib.contextmanager
def serving(engine, max_batch: int):
    from tide_local.serve.app import create_app
    from tide_local.serve.server import serve_in_thread

    app = create_app(engine, model_name="bench", max_queue=1024, max_batch=max_batch)
    with serve_in_thread(app) as running:
        yield running.url, app.state.metrics


def answer_text(endpoint: str, reply: dict) -> str:
    choice = reply["choices"][0]
    return choice["message"]["content"] if endpoint == "chat/completions" else choice["text"]


def run_level(engine, endpoint: str, bodies: list[dict], clients: int) -> dict:
    import httpx

    with serving(engine, clients) as (url, metrics):
        work: queue.Queue = queue.Queue()
        for i, body in enumerate(bodies):
            work.put((i, body))
        answers: list = [None] * len(bodies)
        latency: list = [None] * len(bodies)
        tokens = [0] * len(bodies)
        failures: list = []

        def client():
            with httpx.Client(base_url=url, timeout=600) as http:
                while True:
                    try:
                        i, body = work.get_nowait()
                    except queue.Empty:
                        return
                    t0 = time.perf_counter()
                    response = http.post(f"/v1/{endpoint}", json={"model": "bench", **body})
                    latency[i] = time.perf_counter() - t0
                    if response.status_code != 200:
                        failures.append(response.text)
                        continue
                    reply = response.json()
                    answers[i], tokens[i] = answer_text(endpoint, reply), reply["usage"]["completion_tokens"]

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        m = metrics
        steps = m.step_seconds.counts[-1]
        return {"clients": clients, "requests": len(bodies), "failures": len(failures), "wall_s": wall,
                "completion_tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall,
                "latency_mean_s": float(np.mean(latency)), "latency_p95_s": float(np.percentile(latency, 95)),
                "forwards": steps, "requests_per_forward": m.batch_size.sum / max(1, steps),
                "rows_per_expert": m.rows_per_expert.sum / max(1, steps),
                "step_ms": 1000 * m.step_seconds.sum / max(1, steps), "answers": answers}


def bench(model: str, path: Path, device: str, clients: list[int], n_requests: int, threads: int | None) -> dict:
    endpoint, bodies = requests_for(model, n_requests)
    load = dict(device=device, threads=threads, max_batch=max(clients), n_ctx=512)
    if device == "emulated":
        load["expert_slots"] = tide_local.load(path, device="cpu").config.n_experts // 2
    with tide_local.load(path, **load) as engine:
        used = (f"{engine.threads} thread(s)" if engine.cpu_backend is engine.backend else
                f"{engine.threads} device + {engine.cpu_backend.n_threads} CPU thread(s)")
        run_level(engine, endpoint, bodies[: min(4, len(bodies))], 1)  # warm-up: graphs, caches, pages
        levels = []
        for c in clients:
            level = run_level(engine, endpoint, bodies, c)
            print(f"{model:5s} {device:8s} clients {c}: {level['tokens_per_s']:8.1f} tok/s  "
                  f"latency {level['latency_mean_s']:.2f}s  {level['requests_per_forward']:.1f} req/forward  "
                  f"{level['rows_per_expert']:.1f} rows/expert", file=sys.stderr, flush=True)
            levels.append(level)
    base = next(lv for lv in levels if lv["clients"] == 1) if 1 in clients else None
    for lv in levels:
        lv["speedup"] = lv["tokens_per_s"] / base["tokens_per_s"] if base else None
        lv["same_answers"] = (lv["answers"] == base["answers"]) if base else None
    for lv in levels:
        del lv["answers"]
    return {"model": model, "path": path.name, "device": device, "endpoint": endpoint, "threads": used,
            "levels": levels}


def write(results: list[dict], args, started: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                                     "cores": os.cpu_count(), "results": results}, indent=1) + "\n")
    lines = ["# `tide serve` under concurrent clients", "",
             f"`python benchmarks/bench_serve.py --models {args.models} --devices {args.devices} "
             f"--clients {args.clients} --requests {args.requests} --mini-types {args.mini_types}` ({time.strftime('%Y-%m-%d')}, "
             f"{os.cpu_count()} cores, {time.perf_counter() - started:.0f} s). C clients send the same "
             "requests; the server decodes up to C together (`--max-batch C`). C = 1 is the same requests "
             "one after another. ×1 is aggregate throughput over C = 1 in the same run.", ""]
    for r in results:
        lines += [f"## {r['model']} ({r['path']}), {r['device']}, /v1/{r['endpoint']}, {r['threads']}", "",
                  "| clients | tok/s | × C=1 | latency mean s | p95 s | req/forward | rows/expert | ms/forward "
                  "| forwards | same answers |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for lv in r["levels"]:
            lines.append(f"| {lv['clients']} | {lv['tokens_per_s']:.1f} | {lv['speedup']:.2f} | "
                         f"{lv['latency_mean_s']:.2f} | {lv['latency_p95_s']:.2f} | {lv['requests_per_forward']:.2f} | "
                         f"{lv['rows_per_expert']:.1f} | {lv['step_ms']:.0f} | {lv['forwards']} | "
                         f"{'yes' if lv['same_answers'] else 'NO'}{'' if not lv['failures'] else ' (failures)'} |")
        lines.append("")
    (RESULTS / "serve.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,mini", help="demo, mini (comma-separated)")
    p.add_argument("--devices", default="cpu,emulated", help="cpu, emulated (comma-separated)")
    p.add_argument("--clients", default="1,2,4,8", help="concurrent clients per level (1 = sequential)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (default 32)")
    p.add_argument("--mini-types", default="q8_0,q4_k_m",
                   help="the mini-shaped model's types (default q8_0,q4_k_m; K-quants round by row count: "
                        "batched answers may differ from sequential ones, see the README)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engine's: all cores, 1 for the demo)")
    args = p.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    started = time.perf_counter()
    results = []
    models = [("demo", demo_model_path())] if "demo" in args.models.split(",") else []
    if "mini" in args.models.split(","):
        models += [("mini", mini_model(kind)) for kind in args.mini_types.split(",")]
    for model, path in models:
        for device in args.devices.split(","):
            n = args.requests if model == "demo" else max(8, args.requests // 2)
            results.append(bench(model, path, device, clients, n, args.threads))
    write(results, args, started)
    print(f"wrote {RESULTS / 'serve.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
