"""`tide plan`: choose TIDE's refresh interval and the slots of every MoE layer for a budget.

    tide plan -m MODEL.gguf --gpu-memory 6GiB [--profile P] [--trace T] [--ctx N]

The profile (``tide profile``, or a preset from specifications) prices the work; the
routing trace (``tide generate --trace``, else recorded here on a few built-in prompts
with the CPU engine) says what the work is; the program (``tide_local.planner.plan``)
picks the placement. The result is printed next to the same predictions for the
baselines (swap, static, lru, ondemand, cpu) and for the paper's uniform budget, and cached so that
the engine's ``policy="tide", tau="auto"`` uses it for the same model, budget, context
and profile.
"""

from __future__ import annotations

import argparse
import json
import sys

from tide_local.calibration.measure import measure, resolve_device
from tide_local.calibration.traces import record_builtin_trace
from tide_local.errors import UsageError
from tide_local.generate_cli import MAX_CTX, MAX_TAU, check_range, check_threads
from tide_local.experts.memory import budget_for_slots, parse_memory
from tide_local.experts.trace import RoutingTrace
from tide_local.modelfile import ModelFile
from tide_local.planner.lookup import builtin_trace_path, cache_plan, model_identity
from tide_local.planner.plan import PlanResult, make_plan
from tide_local.planner.profile import Profile, default_profile_path, load_profile
from tide_local.planner.shape import ModelShape, shape_from_file
from tide_local.progress import human_bytes


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------------------------
# the report
# -------------------------------------------------------------------------------------------------


def _slots_text(slots: dict[int, int]) -> str:
    values = list(slots.values())
    if len(set(values)) == 1:
        return f"{values[0]} in every MoE layer"
    return " ".join(f"{layer}:{n}" for layer, n in slots.items())


def print_plan(result: PlanResult, out=None) -> None:
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
        tau = pred.tau if pred.policy in ("tide", "prefetch") else (1 if pred.policy == "swap" else "-")
        w(f"{label:<22} {tau!s:>4} {slots:>9} {pred.hit_rate:>8.3f} {pred.uploads_per_block:>8.1f} "
          f"{pred.upload_seconds_per_block:>9.4f} {pred.cpu_token_slots_per_block:>9.1f} "
          f"{pred.cpu_seconds_per_block:>8.4f} {pred.device_seconds_per_block:>8.4f} {pred.block_seconds:>8.4f} "
          f"{pred.tokens_per_second:>9.2f}\n")
    fair = {k: v for k, v in result.predictions.items()
            if k in ("swap", "static (held-out)", "static (ids 0..B-1)", "lru", "ondemand", "cpu")}
    best_label = max(fair, key=lambda k: fair[k].tokens_per_second)
    tide, oracle = result.predictions["tide (planned)"], result.predictions["static (oracle)"]
    w(f"\npredicted: tide (planned) {tide.tokens_per_second / fair[best_label].tokens_per_second:.2f}x the best "
      f"baseline ({best_label}) and {tide.tokens_per_second / oracle.tokens_per_second:.2f}x static with the "
      "trace's most used experts (chosen in-sample: an optimistic Fiddler); tokens/s count "
      f"{s.block_length} tokens per decoded block\n")


# -------------------------------------------------------------------------------------------------
# the command
# -------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Choose TIDE's refresh interval (tau) and the expert slots of every MoE layer for a device
memory budget, by a mixed-integer program over the cost model: a hardware profile prices
uploads, CPU experts, device experts and fixed work; a routing trace replayed through the
engine's policies says how much of each a placement causes. Prints the choice and the
same predictions for swap, static, lru, ondemand, cpu and the paper's uniform budget, and caches
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
    p.add_argument("--demo", action="store_true", help="plan for the demo model that ships with tide-local")
    p.add_argument("--gpu-memory", metavar="SIZE", default=None, help="the device budget, e.g. 6GiB or 10GB")
    p.add_argument("--expert-slots", type=int, metavar="N", default=None,
                   help="instead of --gpu-memory: the budget that gives N slots in every MoE layer")
    p.add_argument("--profile", metavar="P", default=None,
                   help="a profile file from `tide profile`, or a preset name (default: this device's saved profile)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="whose saved profile to use without --profile (default: auto: the GPU, else emulated)")
    p.add_argument("--trace", metavar="T", default=None, help="a routing trace from `tide generate --trace`")
    p.add_argument("--popularity", metavar="T", default=None,
                   help="a routing trace of OTHER prompts: the static baseline keeps its most used experts "
                   "(held out; static with the planned trace's own popularity is shown as an oracle)")
    p.add_argument("--ctx", type=int, default=4096, metavar="N", help="context to plan the KV cache for (default 4096)")
    p.add_argument("--taus", metavar="LIST", default=None, help="refresh intervals to consider, e.g. 1,2,4,8")
    p.add_argument("--per-layer-tau", action="store_true", help="also solve with a tau per layer (reported only)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for recording a trace")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--no-cache", action="store_true", help="do not cache the plan for the engine")
    return p



MAX_TAUS = 64  # refresh intervals to consider: each is a replay of the trace


def _parse_taus(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        taus = sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise UsageError(f"--taus must be a list of positive integers like 1,2,4, got {text}") from None
    if taus[0] < 1 or taus[-1] > MAX_TAU:
        raise UsageError(f"--taus must be between 1 and {MAX_TAU}, got {text}")
    if len(taus) > MAX_TAUS:
        raise UsageError(f"--taus: at most {MAX_TAUS} values, got {len(taus)}")
    return taus


def _budget(args, model: ModelFile, n_ctx: int) -> int:
    """The device budget in bytes, from --expert-slots or --gpu-memory."""
    if args.expert_slots is not None:
        if args.expert_slots < 1:
            raise UsageError(f"--expert-slots must be at least 1, got {args.expert_slots}")
        return budget_for_slots(model, min(args.expert_slots, model.config.n_experts), n_ctx)
    try:
        return parse_memory(args.gpu_memory)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _profile(args, model_path) -> Profile:
    """--profile, else the device's saved profile, measured (and saved) first if there is none."""
    if args.profile:
        return load_profile(args.profile)
    device = resolve_device(args.device)
    path = default_profile_path(device)
    if path.exists():
        return load_profile(path)
    _log(f"plan: no profile for device '{device}' yet: measuring one (`tide profile`) ...")
    profile = measure(model_path, device, threads=args.threads)
    profile.save(path)
    _log(f"plan: profile saved to {path}")
    return profile


def _trace(args, model_path, shape: ModelShape, identity: dict) -> RoutingTrace:
    """--trace, else the routing of the built-in prompts (recorded once per model, then cached)."""
    if args.trace:
        return RoutingTrace.load(args.trace, n_experts=shape.n_experts, moe_layers=list(shape.moe_layers))
    cached = builtin_trace_path(identity)
    if cached.exists():
        trace = RoutingTrace.load(cached, n_experts=shape.n_experts, moe_layers=list(shape.moe_layers))
        _log(f"plan: using the routing trace recorded earlier on the built-in prompts ({cached})")
        return trace
    _log("plan: no --trace: recording the routing of the built-in prompts with the CPU engine ...")
    trace = record_builtin_trace(model_path, threads=args.threads)
    cached.parent.mkdir(parents=True, exist_ok=True)
    trace.save(cached)
    return trace


def main(argv: list[str] | None = None, prog: str = "tide plan") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.demo == bool(args.model):
        raise UsageError("give -m MODEL.gguf or --demo (one of them)")
    if (args.gpu_memory is None) == (args.expert_slots is None):
        raise UsageError("give the budget as --gpu-memory SIZE or --expert-slots N (one of them)")
    taus = _parse_taus(args.taus)
    check_range(args.ctx, "--ctx", 32, MAX_CTX)
    check_threads(args.threads)
    if args.demo:
        from tide_local.demo import demo_model_path

        model_path = demo_model_path()
    else:
        model_path = args.model
    with ModelFile(model_path) as model:
        shape = shape_from_file(model)
        identity = model_identity(model)
        n_ctx = min(args.ctx, model.config.context_length)
        budget = _budget(args, model, n_ctx)
    profile = _profile(args, model_path)
    profile.costs_for(shape)  # a profile of another model is refused before any work
    trace = _trace(args, model_path, shape, identity)
    held_out = (RoutingTrace.load(args.popularity, n_experts=shape.n_experts, moe_layers=list(shape.moe_layers))
                if args.popularity else None)
    result = make_plan(trace, shape, profile, budget, n_ctx, taus=taus, per_layer_tau=args.per_layer_tau,
                       held_out=held_out, log=_log)
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
