"""A plan: TIDE's refresh interval and the slots of every MoE layer for a device budget.

`make_plan` prices a routing trace with a profile's costs (``cost``), solves the program
(``milp``) and predicts the same trace for the baselines (swap, static, lru, ondemand, cpu) and
the paper's uniform budget beside it. Pure: `tide plan` (``tide_local.calibration``)
finds the profile and the trace, prints the result and caches it (``lookup``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tide_local.errors import BudgetError
from tide_local.experts.policies import AdaptivePolicy
from tide_local.experts.trace import RoutingTrace
from tide_local.planner.cost import Prediction, check_trace, predict
from tide_local.planner.milp import (CostTable, Solution, build_cost_table, default_budgets, default_taus,
                                     paper_program, solve)
from tide_local.planner.profile import Profile
from tide_local.planner.shape import ModelShape
from tide_local.progress import human_bytes


@dataclass
class PlanResult:
    shape: ModelShape
    profile: Profile
    budget: int
    n_ctx: int
    fixed_bytes: int
    uniform_slots: int
    table: CostTable
    planned: Solution  # per-layer budgets, one tau
    paper: Solution  # uniform budget, tau alone
    per_layer_tau: Solution | None
    predictions: dict[str, Prediction]  # by label

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


def make_plan(trace: RoutingTrace, shape: ModelShape, profile: Profile, budget: int, n_ctx: int, *, budgets=None,
              taus=None, per_layer_tau: bool = False, held_out: RoutingTrace | None = None,
              log=None) -> PlanResult:
    """Solve the program for `budget` bytes and predict the baselines beside it. `held_out`: a
    trace of other prompts whose most used experts the fair static baseline keeps (static with
    the planned trace's own popularity is an oracle, and is labelled so)."""
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
        "prefetch (planned)": predict(trace, shape, costs, "prefetch", planned.slots, tau=planned.tau),
        "adaptive": predict(trace, shape, costs, AdaptivePolicy(*costs.adaptive_prices(shape)), uniform),
        "swap": predict(trace, shape, costs, "swap", uniform),
        "static (oracle)": predict(trace, shape, costs, "static", uniform, popularity=popularity),
        **({"static (held-out)": predict(trace, shape, costs, "static", uniform, popularity=held_out.popularity())}
           if held_out is not None else {}),
        "static (ids 0..B-1)": predict(trace, shape, costs, "static", uniform),
        "lru": predict(trace, shape, costs, "lru", uniform),
        "ondemand": predict(trace, shape, costs, "ondemand", uniform),
        "cpu": predict(trace, shape, costs, "cpu", 0),
    }
    return PlanResult(shape, profile, budget, n_ctx, fixed, uniform, table, planned, paper, per_layer, predictions)
