"""Hardware profiles: what each piece of the engine's work costs on a machine.

A *measured* profile (``tide profile``) times the engine's own pieces on this machine,
on a real GGUF (its expert slices give the sizes that move):

* uploads: ``Tensor.set`` of expert slices and larger blocks into a device buffer,
  fitted as ``a + b·bytes`` per copy (an expert is three copies: gate, up, down);
* CPU experts: the engine's ``CpuExperts`` (mul_mat_id over the memory-mapped stacks)
  run in a worker thread as the engine runs it, for a grid of missed token-slots
  (rows) and distinct experts, fitted as ``c0 + c1·experts·expert_bytes + c2·rows·flops``;
* device experts: mul_mat_id over the device's slot pool as the engine's hit graph
  does, over the same kind of grid;
* the fixed work of a pass (attention, routers, shared experts, host routing, LM head):
  whole engine passes at a few token counts and context lengths, minus the expert
  work the cost model predicts for their (recorded) routing, fitted per MoE layer as
  ``l0 + l1·tokens + l2·tokens·keys`` plus the LM head per logits pass.

A measured profile describes one model's costs (the fixed work is that model's) and
refuses to be used for a model of another shape. A *specification* profile (the
shipped presets, e.g. ``a100-40gb-pcie4``) holds public hardware figures (PCIe, HBM
and host memory bandwidth, FLOPs, launch overheads) and derives the same coefficients
for any model shape: estimates, so that predictions can be made anywhere.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from tide_local.errors import ProfileError, TideError, UsageError
from tide_local.planner.cost import Costs
from tide_local.planner.shape import ModelShape

PROFILE_FORMAT = "tide-local profile"
PROFILE_VERSION = 1
PRESET_DIR = Path(__file__).resolve().parent / "presets"

HARDWARE_FIELDS = (
    "pcie_GBps", "pcie_efficiency", "copy_overhead_s",
    "device_memory_GBps", "device_memory_efficiency", "device_tflops", "device_flops_efficiency",
    "kernel_launch_s", "kernels_per_expert_call", "kernels_per_layer",
    "host_memory_GBps", "host_memory_efficiency", "host_tflops", "host_flops_efficiency",
    "cpu_call_overhead_s", "host_overhead_per_layer_s", "device_memory_GB", "overlap_slowdown",
)
COST_FIELDS = tuple(f.name for f in fields(Costs))
SIGNATURE_FIELDS = ("n_experts", "n_experts_used", "hidden_size", "expert_ffn_dim", "expert_bytes", "n_moe_layers")


def profile_dir() -> Path:
    from tide_local.demo import cache_dir

    return cache_dir() / "profiles"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "device"


def default_profile_path(device: str) -> Path:
    """Where `tide profile` saves, and the engine and `tide plan` look for, a device's profile."""
    return profile_dir() / f"{_safe(device)}.json"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


@dataclass
class Profile:
    device: str
    source: str  # "measured" | "specification"
    description: str = ""
    model: dict | None = None  # the shape a measured profile was taken on
    costs: dict | None = None  # Costs fields (measured)
    hardware: dict | None = None  # HARDWARE_FIELDS (specification)
    machine: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    fit_errors: dict = field(default_factory=dict)
    created: str = ""
    path: str | None = None

    # -- the coefficients for a model ------------------------------------------------------------
    def costs_for(self, shape: ModelShape) -> Costs:
        if self.source == "measured":
            self.check_model(shape)
            return Costs(**self.costs)
        return _costs_from_hardware(self.hardware, shape)

    def check_model(self, shape: ModelShape) -> None:
        if self.source != "measured" or self.model is None:
            return
        mine = {k: self.model.get(k) for k in SIGNATURE_FIELDS}
        theirs = {k: shape.signature()[k] for k in SIGNATURE_FIELDS}
        if mine != theirs:
            diff = ", ".join(f"{k} {mine[k]} vs {theirs[k]}" for k in SIGNATURE_FIELDS if mine[k] != theirs[k])
            raise ProfileError(
                f"{self.path or 'the profile'} was measured on {self.model.get('name', 'another model')}, which "
                f"differs from {shape.name} ({diff}); measure this model with `tide profile -m MODEL.gguf`")

    @property
    def digest(self) -> str:
        """Identifies the figures (not the file name): plans are cached per profile digest."""
        body = {"device": self.device, "source": self.source, "model": self.model, "costs": self.costs,
                "hardware": self.hardware}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    # -- files -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION, "device": self.device, "source": self.source,
             "description": self.description, "created": self.created, "machine": self.machine, "model": self.model}
        if self.costs is not None:
            d["costs"] = self.costs
        if self.hardware is not None:
            d["hardware"] = self.hardware
        if self.fit_errors:
            d["fit_errors"] = self.fit_errors
        if self.samples:
            d["samples"] = self.samples
        return d

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        self.path = str(path)
        return path

    @classmethod
    def from_dict(cls, d: dict, path: str) -> "Profile":
        def bad(why: str):
            return ProfileError(f"{path}: not a usable tide-local profile ({why}); make one with `tide profile` "
                                f"or use a preset ({', '.join(preset_names())})")

        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            raise bad(f"format is not '{PROFILE_FORMAT}'")
        if d.get("version") != PROFILE_VERSION:
            raise bad(f"version {d.get('version')!r}, this tide-local reads version {PROFILE_VERSION}")
        source = d.get("source")
        if source not in ("measured", "specification"):
            raise bad(f"source must be 'measured' or 'specification', not {source!r}")
        wanted = ("costs", COST_FIELDS) if source == "measured" else ("hardware", HARDWARE_FIELDS)
        section = d.get(wanted[0])
        if not isinstance(section, dict):
            raise bad(f"missing '{wanted[0]}'")
        missing = [k for k in wanted[1] if k not in section]
        if missing:
            raise bad(f"'{wanted[0]}' lacks {', '.join(missing)}")
        for k in wanted[1]:
            v = section[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise bad(f"{wanted[0]}.{k} must be a non-negative number, not {v!r}")
        model = d.get("model")
        if source == "measured":
            if not isinstance(model, dict) or any(k not in model for k in SIGNATURE_FIELDS):
                raise bad("a measured profile must name the model shape it was measured on")
        if not isinstance(d.get("device"), str):
            raise bad("missing 'device'")
        return cls(device=d["device"], source=source, description=str(d.get("description", "")), model=model,
                   costs=dict(section) if source == "measured" else None,
                   hardware=dict(section) if source == "specification" else None,
                   machine=d.get("machine") or {}, samples=d.get("samples") or {},
                   fit_errors=d.get("fit_errors") or {}, created=str(d.get("created", "")), path=path)


def load_profile(name_or_path) -> Profile:
    """A profile file, or a preset by name (see `preset_names()`); one ProfileError if unusable."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if not path.exists() and (PRESET_DIR / f"{text}.json").exists():
        path = PRESET_DIR / f"{text}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"{text}: no such profile (give a file written by `tide profile` or a preset: "
                           f"{', '.join(preset_names())})") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ProfileError(f"{text}: not a usable tide-local profile (cannot read it as JSON: {err})") from None
    return Profile.from_dict(data, str(path))


def _costs_from_hardware(hw: dict, shape: ModelShape) -> Costs:
    """Coefficients for `shape` from specification figures (see the presets' notes)."""
    GB, T = 1e9, 1e12
    dev_bw = hw["device_memory_GBps"] * hw["device_memory_efficiency"] * GB
    dev_flops = hw["device_tflops"] * hw["device_flops_efficiency"] * T
    host_bw = hw["host_memory_GBps"] * hw["host_memory_efficiency"] * GB
    host_flops = hw["host_tflops"] * hw["host_flops_efficiency"] * T
    launch = hw["kernel_launch_s"]
    return Costs(
        upload_per_copy_s=hw["copy_overhead_s"],
        upload_per_byte_s=1.0 / (hw["pcie_GBps"] * hw["pcie_efficiency"] * GB),
        copies_per_expert=3,
        upload_per_call_s=0.0,
        cpu_per_call_s=hw["cpu_call_overhead_s"],
        cpu_per_weight_byte_s=1.0 / host_bw,
        cpu_per_flop_s=1.0 / host_flops,
        device_per_call_s=launch * hw["kernels_per_expert_call"],
        device_per_weight_byte_s=1.0 / dev_bw,
        device_per_flop_s=1.0 / dev_flops,
        layer_s=hw["host_overhead_per_layer_s"] + launch * hw["kernels_per_layer"] + shape.layer_bytes / dev_bw,
        layer_per_token_s=shape.layer_flops_per_token / dev_flops,
        layer_per_token_key_s=shape.attention_flops_per_token_key / dev_flops,
        logits_pass_s=shape.vocab_size * shape.hidden_size * shape.bytes_per_weight / dev_bw + 4 * launch,
        overlap_slowdown=hw["overlap_slowdown"],
    )


# -------------------------------------------------------------------------------------------------
# fitting
# -------------------------------------------------------------------------------------------------


def fit_nonnegative(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares in relative error with non-negative coefficients (a feature whose
    coefficient comes out negative is dropped and the rest refitted). Returns the
    coefficients and the median relative error of the fit."""
    X, y = np.asarray(X, dtype=float), np.asarray(y, dtype=float)
    w = 1.0 / np.maximum(y, 1e-9)
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
        if (sol >= 0).all():
            coef[:] = 0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    err = float(np.median(np.abs(X @ coef - y) / np.maximum(y, 1e-12))) if len(y) else 0.0
    return coef, err


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up: graphs, caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# -------------------------------------------------------------------------------------------------
# measuring
# -------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """'auto' → the first accelerator of the loaded libggml, else 'emulated'."""
    if device != "auto":
        return device
    from tide_local import ggml

    backend = ggml.Backend.best_accelerator()
    return backend.name if backend is not None else "emulated"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def measure(model_path, device: str = "auto", *, threads: int | None = None, n_ctx: int = 1024, repeat: int = 5,
            log=_log) -> Profile:
    """Measure this machine on `model_path` (a LLaDA2 GGUF) with the engine's own pieces."""
    import tide_local
    from tide_local import ggml
    from tide_local.experts.memory import BudgetError
    from tide_local.experts.offload import CpuExperts, Placement
    from tide_local.model.router import Routing
    from tide_local.modelfile import ModelFile
    from tide_local.planner.cost import predict_counts, replay_counts
    from tide_local.planner.shape import shape_from_file

    device = resolve_device(device)
    with ModelFile(model_path) as mf:
        shape = shape_from_file(mf)
        n_ctx = min(n_ctx, mf.config.context_length)
    cfg = shape.config
    E, K, H = cfg.n_experts, cfg.n_experts_used, cfg.hidden_size
    log(f"profile: device {device}, model {shape.name} ({shape.n_moe_layers} MoE layers, {E} experts of "
        f"{shape.expert_bytes / 2**20:.2f} MiB)")
    if device == "cpu":
        eng = tide_local.load(model_path, device="cpu", threads=threads, n_ctx=n_ctx)
        policy, slots = "resident", E
    else:
        try:
            eng = tide_local.load(model_path, device=device, policy="resident", expert_slots=E, n_ctx=n_ctx,
                                  threads=threads)
            policy, slots = "resident", E
        except BudgetError:  # a model larger than the device: measure with the slots that fit
            eng = tide_local.load(model_path, device=device, policy="static", n_ctx=n_ctx, threads=threads)
            policy, slots = "static", next(iter(eng.plan.slots.values()))
    samples: dict = {}
    fit_errors: dict = {}
    try:
        layer = shape.moe_layers[0]
        dev_backend, cpu_backend = eng.backend, eng.cpu_backend
        # 1. uploads ------------------------------------------------------------------------------------
        upload_call = 0.0
        slice_sizes = sorted({eng.file.experts(layer, p).slice_bytes for p in ("gate", "up", "down")})
        big = [s for s in (1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24, 1 << 26)]
        sizes = sorted(set(slice_sizes + big))
        ctx = ggml.Context(max_tensors=2)
        scratch = ctx.new_tensor(int(ggml.GGMLType.I8), ne=(max(sizes),))
        buffer = dev_backend.alloc_tensors(ctx)
        host = np.random.default_rng(0).integers(-128, 127, size=max(sizes), dtype=np.int8)
        src = eng.file.gguf.tensor_data(eng.file.experts(layer, "gate").tensor.name).view(np.int8)
        up_x, up_y = [], []
        for i, n in enumerate(sizes):
            data = src[:n] if n <= len(src) else host[:n]
            t = _median_time(lambda: scratch.set(data, offset=0), repeat if n < (1 << 22) else max(2, repeat // 2))
            up_x.append(n)
            up_y.append(t)
        (a, b), err = fit_nonnegative(np.column_stack([np.ones(len(up_x)), up_x]), up_y)
        samples["upload"] = {"bytes": up_x, "seconds": up_y}
        del buffer  # frees the scratch device memory
        if eng.offload is not None and slots:
            # the per-copy cost as the engine pays it (slicing the mapped file, one set per
            # projection and expert), with the bandwidth of the large copies above
            large = [(n, t) for n, t in zip(up_x, up_y) if n >= (1 << 20)]
            if len(large) >= 2:
                (_, b), _ = fit_nonnegative(np.column_stack([np.ones(len(large)), [n for n, _ in large]]),
                                            [t for _, t in large])
            ks, per_call = sorted({1, 2, 4, min(8, slots)}), []
            pick = np.random.default_rng(3)
            for k in ks:
                times = []
                for r in range(repeat + 1):  # another layer and other experts each time: nothing cached
                    where = shape.moe_layers[r % len(shape.moe_layers)]
                    moves = list(zip(pick.permutation(slots)[:k].tolist(), pick.permutation(E)[:k].tolist()))
                    t0 = time.perf_counter()
                    eng.offload._upload(where, moves, count=False)
                    times.append(time.perf_counter() - t0)
                per_call.append(float(np.median(times[1:])))
            (upload_call, expert), err = fit_nonnegative(np.column_stack([np.ones(len(ks)), ks]), per_call)
            a = max(0.0, (expert - b * shape.expert_bytes) / 3)
            samples["upload"]["engine_experts"] = ks
            samples["upload"]["engine_seconds"] = per_call
        fit_errors["upload"] = err
        log(f"profile [1/4] uploads: {len(sizes)} sizes, {upload_call * 1e6:.1f} us per layer + {a * 1e6:.1f} us per "
            f"copy + {1 / max(b, 1e-15) / 1e9:.2f} GB/s (median fit error {100 * err:.1f}%)")

        # 2-3. CPU experts (in a worker thread, as the engine runs them) and device experts (over the
        # slot pool, as the engine's hit graph), each alone; then both at once, as in a pass, for the
        # slowdown of sharing the machine (an emulated device shares the host's cores and memory).
        cpu = CpuExperts(cpu_backend, eng.model.weights, cfg)
        worker = ThreadPoolExecutor(1)
        rng = np.random.default_rng(1)
        moe = list(shape.moe_layers)
        n_pool = slots if eng.offload is not None else E
        allocator = {layer: ggml.GraphAllocator(dev_backend) for layer in moe}

        def pool_of(layer):
            return eng.offload.pools[layer] if eng.offload is not None else eng.model.weights.layers[layer].experts

        def device_job(T: int, d: int):
            """Per MoE layer: a graph of T tokens x K choices over d distinct slots, and its inputs."""
            jobs = []
            for layer in moe:
                pool = pool_of(layer)
                g = ggml.Context(max_tensors=32)
                xt = g.new_tensor(int(ggml.GGMLType.F32), ne=(H, 1, T), input=True)
                ids = g.new_tensor(int(ggml.GGMLType.I32), ne=(K, T), input=True)
                wt = g.new_tensor(int(ggml.GGMLType.F32), ne=(1, K, T), input=True)
                gate = g.mul_mat_id(pool["gate"], xt, ids)
                up = g.mul_mat_id(pool["up"], xt, ids)
                graph = g.build_graph(g.mul_mat_id(pool["down"], g.mul(g.mul(g.silu(gate), up), wt), ids))
                inputs = {xt: rng.standard_normal((T, 1, H)).astype(np.float32),
                          ids: (rng.permutation(n_pool)[:d][np.arange(T * K) % d]).reshape(T, K).astype(np.int32),
                          wt: rng.random((T, K, 1), dtype=np.float32)}
                jobs.append((layer, g, graph, inputs))
            return jobs

        def run_device(job) -> float:
            layer, _, graph, inputs = job
            allocator[layer].bind([graph])
            t0 = time.perf_counter()
            dev_backend.compute(graph, inputs)
            return time.perf_counter() - t0

        def cpu_job(rows: int, d: int):
            T = max(32, -(-rows // K))
            routing = Routing(experts=rng.integers(0, E, size=(T, K)).astype(np.int32),
                              weights=rng.random((T, K), dtype=np.float32))
            flat = np.arange(rows)
            t_idx, k_idx = flat // K, flat % K
            routing.experts[t_idx, k_idx] = rng.permutation(E)[:d][flat % d]
            placement = Placement(np.zeros((T, K), np.int32), np.zeros((T, K), np.float32), t_idx, k_idx, True)
            return rng.standard_normal((T, H)).astype(np.float32), routing, placement

        def run_cpu(layer, job) -> float:
            t0 = time.perf_counter()
            cpu.run(layer, *job)
            return time.perf_counter() - t0

        def mean_over_layers(measure_once) -> float:
            """Mean over `repeat` rounds of one call per MoE layer (weights as cold as in a pass; the mean,
            not the median, because a run's time is a sum and a busy machine's hiccups are part of it)."""
            measure_once(moe[0])  # warm-up: graphs
            return float(np.mean([measure_once(layer) for _ in range(repeat) for layer in moe]))

        grid = []
        for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            for d in sorted({min(x, E) for x in (1, max(1, rows // 4), max(1, rows // 2), rows)}):
                grid.append((rows, d))
        cpu_x, cpu_y = [], []
        for rows, d in grid:
            job = cpu_job(rows, d)

            def once(layer, job=job):  # as the device side waits for it: hand-off to the worker included
                t0 = time.perf_counter()
                worker.submit(run_cpu, layer, job).result()
                return time.perf_counter() - t0

            cpu_x.append((rows, d))
            cpu_y.append(mean_over_layers(once))
        padded = [2 ** math.ceil(math.log2(r)) for r, _ in cpu_x]
        X = np.column_stack([np.ones(len(cpu_x)), [d * shape.expert_bytes for _, d in cpu_x],
                             [p * shape.expert_flops_per_row for p in padded]])
        (c0, c1, c2), err = fit_nonnegative(X, cpu_y)
        fit_errors["cpu_experts"] = err
        samples["cpu_experts"] = {"rows": [r for r, _ in cpu_x], "experts": [d for _, d in cpu_x], "seconds": cpu_y}
        log(f"profile [2/4] CPU experts: {len(grid)} points, "
            f"{c0 * 1e6:.0f} us per call + {c1 * shape.expert_bytes * 1e6:.1f} us per expert + "
            f"{c2 * shape.expert_flops_per_row * 1e9:.0f} ns per row (median fit error {100 * err:.1f}%)")

        dev_x, dev_y = [], []
        for T in (32, 128):
            for d in (1, 2, 4, 8, 16, 32, 64, 128, 256):
                if d > min(n_pool, T * K):
                    continue
                jobs = dict((job[0], job) for job in device_job(T, d))

                def once(layer, jobs=jobs):
                    return run_device(jobs[layer])

                dev_x.append((T * K, d))
                dev_y.append(mean_over_layers(once))
        X = np.column_stack([np.ones(len(dev_x)), [d * shape.expert_bytes for _, d in dev_x],
                             [r * shape.expert_flops_per_row for r, _ in dev_x]])
        (d0, d1, d2), err = fit_nonnegative(X, dev_y)
        fit_errors["device_experts"] = err
        samples["device_experts"] = {"rows": [r for r, _ in dev_x], "experts": [d for _, d in dev_x],
                                     "seconds": dev_y}
        log(f"profile [3/4] device experts: {len(dev_x)} points, "
            f"{d0 * 1e6:.0f} us per call + {d1 * shape.expert_bytes * 1e6:.1f} us per expert + "
            f"{d2 * shape.expert_flops_per_row * 1e9:.0f} ns per row (median fit error {100 * err:.1f}%)")

        slowdown, pairs = 1.0, []
        if eng.offload is not None:  # the engine overlaps the two sides only with a device
            alone = Costs(0, 0, 3, 0, c0, c1, c2, d0, d1, d2, 0, 0, 0, 0)
            for rows, d_cpu in ((16, min(E, 8)), (64, min(E, 16)), (128, min(E, 32)), (256, min(E, 64))):
                job = cpu_job(rows, d_cpu)
                for d_dev in sorted({min(n_pool, 4), min(n_pool, 16)}):
                    dev_jobs = dict((j[0], j) for j in device_job(32, d_dev))

                    def both(layer, job=job, dev_jobs=dev_jobs):
                        t0 = time.perf_counter()
                        future = worker.submit(run_cpu, layer, job)
                        run_device(dev_jobs[layer])
                        future.result()
                        return time.perf_counter() - t0

                    wall = mean_over_layers(both)
                    c = float(alone.cpu_seconds(rows, d_cpu, shape))
                    dv = float(alone.device_seconds(32 * K, d_dev, shape))
                    pairs.append({"rows": rows, "cpu_experts": d_cpu, "device_experts": d_dev, "seconds": wall,
                                  "cpu_alone": c, "device_alone": dv})
            # both at once take max + (slowdown - 1) * min: least squares over the pairs
            longer = np.asarray([max(p["cpu_alone"], p["device_alone"]) for p in pairs])
            shorter = np.asarray([min(p["cpu_alone"], p["device_alone"]) for p in pairs])
            both_wall = np.asarray([p["seconds"] for p in pairs])
            slowdown = float(np.clip(1 + shorter @ (both_wall - longer) / max(1e-18, shorter @ shorter), 1.0, 2.0))
            samples["overlap"] = pairs
            log(f"profile [3/4] both at once: {len(pairs)} pairs, each side {slowdown:.2f}x slower while the other "
                "works")
        worker.shutdown()

        partial = Costs(a, b, 3, upload_call, c0, c1, c2, d0, d1, d2, 0.0, 0.0, 0.0, 0.0, slowdown)
        # 4. the fixed work of whole passes ------------------------------------------------------------
        configs = [(32, s, logits) for logits in (True, False) for s in (0, 256, 768) if s + 32 <= n_ctx]
        configs += [(64, 0, False), (min(128, n_ctx), 0, False)]
        trace = eng.record_trace()
        walls = []
        tokens_rng = np.random.default_rng(2)
        for T, start, logits in configs:
            rows = np.arange(T) if logits else None
            for r in range(repeat + 1):
                tokens = tokens_rng.integers(0, cfg.vocab_size, size=T).astype(np.int32)
                t0 = time.perf_counter()
                eng.model.forward(tokens, start, rows=rows)
                walls.append(time.perf_counter() - t0)  # the first of each builds the graphs
        eng.stop_trace()
        counts = replay_counts(trace, policy, slots)
        variable = predict_counts(counts, shape, partial).pass_seconds
        # one point per configuration: its mean pass, less the expert work the cost model gives its routing
        walls = np.asarray(walls)
        per_config = repeat + 1
        groups = [np.arange(c * per_config + 1, (c + 1) * per_config) for c in range(len(configs))]
        first = np.asarray([g[0] for g in groups])
        tokens = counts.tokens[first].astype(float)
        keys = (counts.start + counts.tokens)[first].astype(float)
        L = shape.n_moe_layers
        mean_wall = np.asarray([walls[g].mean() for g in groups])
        mean_expert = np.asarray([variable[g].mean() for g in groups])
        residual = np.maximum(mean_wall - mean_expert, 1e-6)
        X = np.column_stack([np.full(len(tokens), L), L * tokens, L * tokens * keys, counts.logits[first]])
        (l0, l1, l2, lm), err = fit_nonnegative(X, residual)
        fit_errors["fixed"] = err
        samples["fixed"] = {"tokens": tokens.tolist(), "keys": keys.tolist(), "logits": counts.logits[first].tolist(),
                            "seconds": mean_wall.tolist(), "expert_seconds": mean_expert.tolist(),
                            "all_seconds": walls.tolist()}
        log(f"profile [4/4] fixed work: {len(walls)} passes, {l0 * 1e6:.0f} us per MoE layer + "
            f"{l1 * 1e6:.2f} us per token + LM head {lm * 1e3:.2f} ms (median fit error {100 * err:.1f}%)")
        costs = Costs(a, b, 3, upload_call, c0, c1, c2, d0, d1, d2, l0, l1, l2, lm, slowdown)
        machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "device_threads": dev_backend.n_threads,
                   "cpu_expert_threads": cpu_backend.n_threads, "n_ctx": n_ctx,
                   "measured_with": {"policy": policy, "slots": slots}}
    finally:
        eng.close()
    figures = {f.name: float(getattr(costs, f.name)) for f in fields(Costs)}
    figures["copies_per_expert"] = costs.copies_per_expert
    return Profile(device=device, source="measured", description=f"measured on this machine with {shape.name}",
                   model={"name": shape.name, **shape.signature()}, costs=figures, machine=machine, samples=samples,
                   fit_errors={k: float(v) for k, v in fit_errors.items()},
                   created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))


# -------------------------------------------------------------------------------------------------
# `tide profile`
# -------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Measure what the engine's pieces cost on this machine: uploading expert slices to the
device (seconds per copy and per byte), running missed experts on the CPU and hit experts
on the device (by rows and distinct experts), and the fixed work of a pass (attention,
routers, shared experts, LM head). Saves the profile as JSON (by default where the engine
and `tide plan` look for it) and prints it. Takes seconds on the demo model, a few minutes
on a large one."""

EPILOG = f"""\
examples:
  tide profile                                   # the demo model, on the best device (else emulated)
  tide profile -m llada2-mini-q4_k_m.gguf --device CUDA0
  tide profile -m mini.gguf --device emulated -o mini-emulated.json

presets from public specifications (estimates, usable with `tide plan --profile NAME`):
  {', '.join(preset_names())}
"""


def build_parser(prog: str = "tide profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", metavar="MODEL.gguf", default=None,
                   help="the model to measure on (default: the demo model, built on first use)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (the first GPU of the loaded libggml, else emulated), cpu, emulated, or a device name")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="where to save the profile (default: the cache directory, per device)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="timed repetitions per point (default 5)")
    p.add_argument("--ctx", type=int, default=1024, metavar="N",
                   help="context for the fixed-work passes (default 1024)")
    return p


def main(argv: list[str] | None = None, prog: str = "tide profile") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.ctx < 64:
        raise UsageError(f"--ctx must be at least 64, got {args.ctx}")
    if args.model is None:
        from tide_local.demo import demo_model_path

        model = demo_model_path()
    else:
        model = args.model
    profile = measure(model, args.device, threads=args.threads, n_ctx=args.ctx, repeat=args.repeat)
    out = Path(args.output) if args.output else default_profile_path(profile.device)
    try:
        profile.save(out)
    except OSError as err:
        from tide_local.errors import OutputPathError

        raise OutputPathError(f"cannot write the profile to {out} ({err.strerror})") from None
    print(json.dumps({k: v for k, v in profile.to_dict().items() if k != "samples"}, indent=1))
    print(f"profile saved to {out}", file=sys.stderr)
    return 0
