"""`tide plan`: choose TIDE's refresh interval and the slots of every MoE layer for a budget.

    tide plan -m MODEL.gguf --gpu-memory 6GiB [--profile P] [--trace T] [--ctx N]

The profile (``tide profile``, or a preset from specifications) prices the work; the
routing trace (``tide generate --trace``, else recorded here on a few built-in prompts
with the CPU engine) says what the work is; the program (``milp``) picks the placement.
The result is printed next to the same predictions for the baselines (swap, static,
lru, cpu) and for the paper's uniform budget, and cached so that the engine's
``policy="tide", tau="auto"`` uses it for the same model, budget, context and profile.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from tide_local.errors import TideError, UsageError

PLAN_FORMAT = "tide-local plan"
PLAN_VERSION = 1

# Short prompts of the kinds the paper evaluates (code) and chat questions.
BUILTIN_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and two asserts.",
    "Explain in a few sentences why the sky is blue and why sunsets are red.",
    "List three prime numbers greater than 100 and show how to check that each is prime.",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------
# the plan cache
# -------------------------------------------------------------------------------------------------


def plan_dir() -> Path:
    from tide_local.demo import cache_dir

    return cache_dir() / "plans"


def model_identity(model_file) -> dict:
    """What identifies a model for cached plans and traces: its file name, size and shape."""
    from tide_local.planner.shape import shape_from_file

    shape = shape_from_file(model_file)
    return {"name": model_file.path.name, "file_bytes": model_file.gguf.file_size, **shape.signature()}


def plan_key(identity: dict, budget: int, n_ctx: int, profile_digest: str) -> str:
    body = json.dumps([identity, int(budget), int(n_ctx), profile_digest], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def plan_path(identity: dict, budget: int, n_ctx: int, profile_digest: str) -> Path:
    return plan_dir() / f"{plan_key(identity, budget, n_ctx, profile_digest)}.json"


@dataclass
class AutoPlacement:
    """What the engine's tau="auto" resolves to."""

    tau: int
    plan: object  # MemoryPlan
    source: str


def auto_placement(model_file, memory_plan, device: str, default_tau: int) -> AutoPlacement:
    """The cached plan for this model, budget, context and the device's saved profile, or
    `default_tau` with the memory plan's uniform slots (and why). Reads two small files at
    most: never profiles or records anything."""
    from tide_local.planner.profile import ProfileError, default_profile_path, load_profile

    hint = f"run `tide plan -m {model_file.path.name} --gpu-memory {memory_plan.budget} --ctx {memory_plan.n_ctx}`"
    profile_file = default_profile_path(device)
    if not profile_file.exists():
        return AutoPlacement(default_tau, memory_plan, f"default tau {default_tau}: no profile for device '{device}' "
                             f"(run `tide profile --device {device}`, then {hint[4:]})")
    try:
        profile = load_profile(profile_file)
        identity = model_identity(model_file)
        path = plan_path(identity, memory_plan.budget, memory_plan.n_ctx, profile.digest)
        if not path.exists():
            return AutoPlacement(default_tau, memory_plan, f"default tau {default_tau}: no cached plan for this model, "
                                 f"budget, context and profile ({hint})")
        data = json.loads(path.read_text())
        slots = {int(k): int(v) for k, v in data["slots"].items()}
        tau = int(data["tau"])
        if data.get("model") != identity or sorted(slots) != sorted(memory_plan.slots) or tau < 1:
            raise ValueError("it is of another model")
        expert_bytes = sum(slots.values()) * memory_plan.expert_bytes
        if memory_plan.fixed_bytes + expert_bytes > memory_plan.budget or \
                any(not 0 <= n <= memory_plan.n_experts for n in slots.values()):
            raise ValueError("its slots do not fit the budget")
    except (ProfileError, OSError, ValueError, KeyError, TypeError) as err:
        return AutoPlacement(default_tau, memory_plan, f"default tau {default_tau}: the cached plan or profile is "
                             f"unusable ({err}); {hint}")
    from tide_local.experts.memory import MemoryPlan

    device_bytes = dict(memory_plan.device_bytes)
    device_bytes["expert slots"] = expert_bytes
    planned = MemoryPlan(memory_plan.budget, device_bytes, memory_plan.expert_bytes, slots, memory_plan.n_experts,
                         memory_plan.n_ctx, list(memory_plan.notes) + [f"expert slots per layer from the plan {path}"])
    return AutoPlacement(tau, planned, f"plan {path}")


# -------------------------------------------------------------------------------------------------
# traces
# -------------------------------------------------------------------------------------------------


def record_builtin_trace(model_path, *, prompts: int = 2, blocks: int = 2, threads: int | None = None,
                         log=_log):
    """Record the routing of a few built-in prompts (`blocks` blocks each) with the CPU engine."""
    import tide_local
    from tide_local.diffusion import BlockEvent
    from tide_local.tokenizer import ChatTemplateError

    eng = tide_local.load(model_path, device="cpu", threads=threads, n_ctx=1024)
    try:
        trace = eng.record_trace()
        block = eng.defaults["block_length"]
        for i, prompt in enumerate(BUILTIN_PROMPTS[:prompts]):
            try:
                ids = eng.chat_prompt([{"role": "user", "content": prompt}])
            except ChatTemplateError:
                ids = eng.tokenizer.encode(prompt)
            done, total = 0, -(-(len(ids) + blocks * block) // block) - len(ids) // block
            for event in eng.stream(ids, max_new_tokens=blocks * block, stop_ids=[]):
                if isinstance(event, BlockEvent) and event.start + block > len(ids):
                    done += 1
                    log(f"trace: prompt {i + 1}/{prompts}, block {done}/{total}")
        eng.stop_trace()
    finally:
        eng.close()
    return trace


# -------------------------------------------------------------------------------------------------
# planning
# -------------------------------------------------------------------------------------------------


@dataclass
class PlanResult:
    shape: object
    profile: object
    budget: int
    n_ctx: int
    fixed_bytes: int
    uniform_slots: int
    table: object  # CostTable
    planned: object  # Solution: per-layer budgets, one tau
    paper: object  # Solution: uniform budget, tau alone
    per_layer_tau: object | None
    predictions: dict  # label → Prediction

    def to_dict(self) -> dict:
        return {
            "model": self.shape.name, "profile": {"device": self.profile.device, "source": self.profile.source,
                                                  "path": self.profile.path, "digest": self.profile.digest},
            "budget": self.budget, "n_ctx": self.n_ctx, "fixed_bytes": self.fixed_bytes,
            "expert_bytes": self.shape.expert_bytes, "uniform_slots": self.uniform_slots,
            "tau": self.planned.tau, "slots": {str(k): v for k, v in self.planned.slots.items()},
            "grid": {"budgets": self.table.budgets, "taus": self.table.taus},
            "programs": {"planned": self.planned.to_dict(), "paper": self.paper.to_dict(),
                         **({"per_layer_tau": self.per_layer_tau.to_dict()} if self.per_layer_tau else {})},
            "predictions": {label: p.summary() for label, p in self.predictions.items()},
        }


def make_plan(trace, shape, profile, budget: int, n_ctx: int, *, budgets=None, taus=None, per_layer_tau: bool = False,
              log=None) -> PlanResult:
    """Solve the program for `budget` bytes and predict the baselines beside it."""
    from tide_local.experts.memory import BudgetError
    from tide_local.planner.cost import check_trace, predict
    from tide_local.planner.milp import build_cost_table, default_budgets, default_taus, paper_program, solve
    from tide_local.progress import human_bytes

    check_trace(trace, shape)
    costs = profile.costs_for(shape)
    fixed = shape.fixed_device_bytes(n_ctx)
    if budget < fixed:
        raise BudgetError(f"a device budget of {human_bytes(budget)} cannot hold the non-expert part of the model "
                          f"({human_bytes(fixed)} at context {n_ctx}); the smallest budget that works is "
                          f"{human_bytes(fixed)} (or lower the context)")
    capacity = budget - fixed
    L, E = shape.n_moe_layers, shape.n_experts
    uniform = min(E, capacity // (shape.expert_bytes * L))
    if uniform < 1:
        need = fixed + shape.expert_bytes * L
        raise BudgetError(f"a device budget of {human_bytes(budget)} leaves no room for an expert slot in every MoE "
                          f"layer (that needs {human_bytes(need)}); with less, every expert runs on the CPU "
                          "(policy 'cpu'): nothing to plan")
    max_steps = max((p["step"] for p in trace.passes if p["logits"]), default=0) + 1
    budgets = sorted(set(budgets or default_budgets(E, uniform, min(E, capacity // shape.expert_bytes))) | {uniform})
    taus = list(taus or default_taus(max_steps))
    table = build_cost_table(trace, shape, costs, budgets=budgets, taus=taus, capacity=capacity,
                             progress=(lambda d, n: log(f"plan: costing {d}/{n} placements")
                                       if log and (d == n or d % max(1, n // 4) == 0) else None))
    planned = solve(table, name="planned (per-layer budgets, one tau)")
    paper = paper_program(table, uniform)
    per_layer = solve(table, per_layer_tau=True) if per_layer_tau else None
    popularity = trace.popularity()
    predictions = {
        "tide (planned)": predict(trace, shape, costs, "tide", planned.slots, tau=planned.tau),
        "tide (uniform, paper)": predict(trace, shape, costs, "tide", uniform, tau=paper.tau),
        "swap": predict(trace, shape, costs, "swap", uniform),
        "static": predict(trace, shape, costs, "static", uniform, popularity=popularity),
        "static (ids 0..B-1)": predict(trace, shape, costs, "static", uniform),
        "lru": predict(trace, shape, costs, "lru", uniform),
        "cpu": predict(trace, shape, costs, "cpu", 0),
    }
    return PlanResult(shape, profile, budget, n_ctx, fixed, uniform, table, planned, paper, per_layer, predictions)


def cache_plan(result: PlanResult, identity: dict) -> Path:
    """Save the plan where the engine's tau="auto" looks for it (same model, budget, context, profile)."""
    path = plan_path(identity, result.budget, result.n_ctx, result.profile.digest)
    record = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": identity, "budget": result.budget,
              "n_ctx": result.n_ctx, "profile": result.profile.digest, "device": result.profile.device,
              "tau": result.planned.tau, "slots": {str(k): v for k, v in result.planned.slots.items()},
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "predicted": result.predictions["tide (planned)"].summary()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def _slots_text(slots: dict[int, int]) -> str:
    values = list(slots.values())
    if len(set(values)) == 1:
        return f"{values[0]} in every MoE layer"
    return " ".join(f"{layer}:{n}" for layer, n in slots.items())


def print_plan(result: PlanResult, out=None) -> None:
    from tide_local.progress import human_bytes

    out = out or sys.stdout
    s, p = result.shape, result.profile
    kind = "measured" if p.source == "measured" else "ESTIMATE from specifications"
    w = out.write
    w(f"plan for {s.name}: budget {human_bytes(result.budget)}, context {result.n_ctx}\n")
    w(f"  profile: {p.device} ({kind}){' ' + p.path if p.path else ''}\n")
    w(f"  memory: fixed {human_bytes(result.fixed_bytes)}, one expert {human_bytes(s.expert_bytes)} x "
      f"{s.n_moe_layers} MoE layers; a uniform budget gives {result.uniform_slots} slots per layer\n")
    w(f"  trace: {result.table.blocks} decoded blocks; grid: slots {result.table.budgets}, tau {result.table.taus}\n")
    planned, paper = result.planned, result.paper
    w(f"\nchosen: tau {planned.tau}, expert slots {_slots_text(planned.slots)} "
      f"({human_bytes(planned.memory_bytes)} of experts)\n")
    w(f"  program: {planned.binaries} binaries, solved in {planned.solve_seconds:.2f} s; predicted "
      f"{planned.seconds_per_block:.4g} s per block vs {paper.seconds_per_block:.4g} s for the paper's program "
      f"(uniform {result.uniform_slots} slots, tau {paper.tau}): "
      f"{paper.seconds_per_block / planned.seconds_per_block:.3f}x\n")
    if result.per_layer_tau is not None:
        pl = result.per_layer_tau
        w(f"  with a tau per layer: {pl.seconds_per_block:.4g} s per block (taus {_slots_text(pl.taus)}; the engine "
          "runs one tau)\n")
    w("\n")
    head = (f"{'placement':<22} {'tau':>4} {'slots':>9} {'hit rate':>8} {'uploads':>8} {'upload s':>9} "
            f"{'CPU slots':>9} {'CPU s':>8} {'device s':>8} {'block s':>8} {'tokens/s':>9}\n")
    w(head)
    w(f"{'':<22} {'':>4} {'':>9} {'':>8} {'per block':>8} {'per block':>9} {'per block':>9} {'per block':>8} "
      f"{'per block':>8}\n")
    for label, pred in result.predictions.items():
        vals = list(pred.slots.values())
        slots = str(vals[0]) if len(set(vals)) == 1 else f"{min(vals)}-{max(vals)}"
        tau = pred.tau if pred.policy == "tide" else (1 if pred.policy == "swap" else "-")
        w(f"{label:<22} {tau!s:>4} {slots:>9} {pred.hit_rate:>8.3f} {pred.uploads_per_block:>8.1f} "
          f"{pred.upload_seconds_per_block:>9.4f} {pred.cpu_token_slots_per_block:>9.1f} "
          f"{pred.cpu_seconds_per_block:>8.4f} {pred.device_seconds_per_block:>8.4f} {pred.block_seconds:>8.4f} "
          f"{pred.tokens_per_second:>9.2f}\n")
    fair = {k: v for k, v in result.predictions.items() if k in ("swap", "static (ids 0..B-1)", "lru", "cpu")}
    best_label = max(fair, key=lambda k: fair[k].tokens_per_second)
    tide, oracle = result.predictions["tide (planned)"], result.predictions["static"]
    w(f"\npredicted: tide (planned) {tide.tokens_per_second / fair[best_label].tokens_per_second:.2f}x the best "
      f"baseline ({best_label}) and {tide.tokens_per_second / oracle.tokens_per_second:.2f}x static with the "
      "trace's most used experts (chosen in-sample: an optimistic Fiddler); tokens/s count "
      f"{s.block_length} tokens per decoded block\n")


# -------------------------------------------------------------------------------------------------
# `tide plan`
# -------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Choose TIDE's refresh interval (tau) and the expert slots of every MoE layer for a device
memory budget, by a mixed-integer program over the cost model: a hardware profile prices
uploads, CPU experts, device experts and fixed work; a routing trace replayed through the
engine's policies says how much of each a placement causes. Prints the choice and the
same predictions for swap, static, lru, cpu and the paper's uniform budget, and caches
the plan so that `tide generate --policy tide` (tau auto) uses it."""

EPILOG = """\
examples:
  tide plan -m mini.gguf --gpu-memory 10GB
  tide plan -m mini.gguf --gpu-memory 10GB --profile a100-40gb-pcie4 --trace mini-trace.json
  tide plan --demo --expert-slots 6 --json

Without --profile the device's saved profile is used (measured first if there is none).
Without --trace the routing of a few built-in prompts is recorded with the CPU engine
first (and cached). Record your own with `tide generate --trace FILE`.
"""


def build_parser(prog: str = "tide plan") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", metavar="MODEL.gguf", help="a LLaDA2 GGUF written by `tide convert`")
    p.add_argument("--demo", action="store_true", help="plan for the demo model (tiny, random weights)")
    p.add_argument("--gpu-memory", metavar="SIZE", default=None, help="the device budget, e.g. 6GiB or 10GB")
    p.add_argument("--expert-slots", type=int, metavar="N", default=None,
                   help="instead of --gpu-memory: the budget that gives N slots in every MoE layer")
    p.add_argument("--profile", metavar="P", default=None,
                   help="a profile file from `tide profile`, or a preset name (default: this device's saved profile)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="whose saved profile to use without --profile (default: auto: the GPU, else emulated)")
    p.add_argument("--trace", metavar="T", default=None, help="a routing trace from `tide generate --trace`")
    p.add_argument("--ctx", type=int, default=4096, metavar="N", help="context to plan the KV cache for (default 4096)")
    p.add_argument("--taus", metavar="LIST", default=None, help="refresh intervals to consider, e.g. 1,2,4,8")
    p.add_argument("--per-layer-tau", action="store_true", help="also solve with a tau per layer (reported only)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for recording a trace")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-cache", action="store_true", help="do not cache the plan for the engine")
    return p


def main(argv: list[str] | None = None, prog: str = "tide plan") -> int:
    args = build_parser(prog).parse_args(argv)
    from tide_local.experts.memory import budget_for_slots, parse_memory
    from tide_local.experts.trace import RoutingTrace
    from tide_local.modelfile import ModelFile
    from tide_local.planner.profile import default_profile_path, load_profile, measure, resolve_device
    from tide_local.planner.shape import shape_from_file

    if args.demo == bool(args.model):
        raise UsageError("give -m MODEL.gguf or --demo (one of them)")
    if (args.gpu_memory is None) == (args.expert_slots is None):
        raise UsageError("give the budget as --gpu-memory SIZE or --expert-slots N (one of them)")
    taus = None
    if args.taus:
        try:
            taus = sorted({int(t) for t in args.taus.split(",")})
        except ValueError:
            raise UsageError(f"--taus must be a list of positive integers like 1,2,4, got {args.taus}") from None
        if taus[0] < 1:
            raise UsageError(f"--taus must be positive, got {args.taus}")
    if args.ctx < 32:
        raise UsageError(f"--ctx must be at least 32, got {args.ctx}")
    if args.demo:
        from tide_local.demo import demo_model_path

        model_path = demo_model_path()
    else:
        model_path = args.model
    with ModelFile(model_path) as mf:
        shape = shape_from_file(mf)
        identity = model_identity(mf)
        n_ctx = min(args.ctx, mf.config.context_length)
        if args.expert_slots is not None:
            if args.expert_slots < 1:
                raise UsageError(f"--expert-slots must be at least 1, got {args.expert_slots}")
            budget = budget_for_slots(mf, min(args.expert_slots, mf.config.n_experts), n_ctx)
        else:
            try:
                budget = parse_memory(args.gpu_memory)
            except ValueError as err:
                raise UsageError(str(err)) from None
    # the profile
    if args.profile:
        profile = load_profile(args.profile)
    else:
        device = resolve_device(args.device)
        path = default_profile_path(device)
        if path.exists():
            profile = load_profile(path)
        else:
            _log(f"plan: no profile for device '{device}' yet: measuring one (`tide profile`) ...")
            profile = measure(model_path, device, threads=args.threads)
            profile.save(path)
            _log(f"plan: profile saved to {path}")
    profile.costs_for(shape)  # a profile of another model is refused before any work
    # the trace
    if args.trace:
        trace = RoutingTrace.load(args.trace, n_experts=shape.n_experts, moe_layers=list(shape.moe_layers))
    else:
        from tide_local.demo import cache_dir

        cached = cache_dir() / "traces" / f"{plan_key(identity, 0, 0, 'builtin-prompts')}.json"
        if cached.exists():
            trace = RoutingTrace.load(cached, n_experts=shape.n_experts, moe_layers=list(shape.moe_layers))
            _log(f"plan: using the routing trace recorded earlier on the built-in prompts ({cached})")
        else:
            _log("plan: no --trace: recording the routing of the built-in prompts with the CPU engine ...")
            trace = record_builtin_trace(model_path, threads=args.threads)
            cached.parent.mkdir(parents=True, exist_ok=True)
            trace.save(cached)
    result = make_plan(trace, shape, profile, budget, n_ctx, taus=taus, per_layer_tau=args.per_layer_tau, log=_log)
    data = result.to_dict()
    if not args.no_cache:
        try:
            data["cached"] = str(cache_plan(result, identity))
        except OSError as err:
            _log(f"plan: could not cache the plan ({err.strerror}); the engine will use its default tau")
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print_plan(result)
        if "cached" in data:
            print(f"cached for the engine (policy tide, tau auto) with this budget and context: {data['cached']}")
    return 0


