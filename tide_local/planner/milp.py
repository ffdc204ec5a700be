"""The program: TIDE's refresh interval and every MoE layer's slot budget, under one memory limit.

Decision: tau (one for all layers, or one per layer) and the slots B_l of every MoE
layer, from discrete grids. Constraint: sum_l B_l · expert_bytes + fixed <= gpu_memory.
Objective: predicted seconds per decoded block.

A layer's cost depends only on its own B_l and tau (every policy keeps per-layer state),
and within a layer it is non-linear (uploads, then max(device, CPU) per pass), so it is
tabulated: the cost model replays the trace once per (B, tau) on the grid and charges
each layer its seconds per block. The program is then linear with one binary
x[l, B, tau] per choice:

    minimise   sum x[l,B,tau] · cost[l,B,tau]
    subject to sum_{B,tau} x[l,B,tau] = 1                 every layer picks one choice
               sum x[l,B,tau] · B · expert_bytes <= capacity
               sum_B x[l,B,tau] = y[tau],  sum y = 1        one tau for all layers (global tau)
               sum_tau x[l,B,tau] = z[B],  sum z = 1        one B for all layers (uniform)

The paper's program is the special case with a single uniform B (the most that fits)
and a global tau: a search over tau alone. CBC solves it; the shared choices (y, z) are
branched on first, one restricted program per value (see `solve`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from tide_local.experts.memory import BudgetError
from tide_local.planner.cost import Costs, layer_times, replay_counts
from tide_local.planner.shape import ModelShape


@dataclass
class CostTable:
    layers: list[int]
    budgets: list[int]
    taus: list[int]
    seconds: np.ndarray  # [L, nB, nT]: a layer's placement-dependent seconds per decoded block
    hits: np.ndarray  # [L, nB, nT] per block
    misses: np.ndarray
    uploads: np.ndarray
    fixed_seconds: float  # per block, the same for every choice
    expert_bytes: int
    capacity: int  # bytes for expert slots: the budget less the fixed device bytes
    blocks: int

    def cost(self, slots: dict[int, int], taus: dict[int, int] | int) -> float:
        """Seconds per block of a placement on the grid."""
        total = self.fixed_seconds
        for j, layer in enumerate(self.layers):
            tau = taus if isinstance(taus, int) else taus[layer]
            total += self.seconds[j, self.budgets.index(slots[layer]), self.taus.index(tau)]
        return float(total)


def default_budgets(n_experts: int, uniform: int, most: int) -> list[int]:
    """0, every n_experts/16 (all values when there are few experts) and the uniform budget,
    up to what one layer could hold."""
    step = max(1, n_experts // 16)
    grid = set(range(0, n_experts + 1, step)) | {uniform, n_experts}
    return sorted(b for b in grid if b <= most)


def default_taus(max_steps: int) -> list[int]:
    """1..8 and a few longer intervals, up to one refresh per block."""
    grid = [t for t in (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32) if t <= max(1, max_steps)]
    if max_steps > grid[-1]:
        grid.append(max_steps)
    return grid


def build_cost_table(trace, shape: ModelShape, costs: Costs, *, budgets: list[int], taus: list[int],
                     capacity: int, progress=None) -> CostTable:
    layers = list(trace.moe_layers)
    L, nB, nT = len(layers), len(budgets), len(taus)
    tables = {k: np.zeros((L, nB, nT)) for k in ("seconds", "hits", "misses", "uploads")}
    fixed = 0.0
    blocks = 1
    done = 0
    for b, B in enumerate(budgets):
        for t, tau in enumerate(taus):
            if B == 0 and t > 0:  # no slots: tau changes nothing
                for k in tables:
                    tables[k][:, b, t] = tables[k][:, b, 0]
                continue
            counts = replay_counts(trace, "tide", B, tau=tau)
            times = layer_times(counts, shape, costs)
            decode = counts.block >= 0
            blocks = max(1, counts.n_blocks)
            tables["seconds"][:, b, t] = times.variable[decode].sum(axis=0) / blocks
            tables["hits"][:, b, t] = counts.hits[decode].sum(axis=0) / blocks
            tables["misses"][:, b, t] = counts.misses[decode].sum(axis=0) / blocks
            tables["uploads"][:, b, t] = counts.uploads[decode].sum(axis=0) / blocks
            fixed = float((times.fixed[decode].sum() + costs.logits_pass_s * counts.logits[decode].sum()) / blocks)
            done += 1
            if progress:
                progress(done, nB * nT)
    return CostTable(layers, list(budgets), list(taus), tables["seconds"], tables["hits"], tables["misses"],
                     tables["uploads"], fixed, shape.expert_bytes, capacity, blocks)


@dataclass
class Solution:
    name: str
    tau: int | None  # the global tau (None with per-layer taus)
    taus: dict[int, int]
    slots: dict[int, int]
    seconds_per_block: float
    status: str
    solve_seconds: float
    binaries: int
    memory_bytes: int  # expert slots
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "tau": self.tau, "taus": {str(k): v for k, v in self.taus.items()},
                "slots": {str(k): v for k, v in self.slots.items()}, "seconds_per_block": self.seconds_per_block,
                "status": self.status, "solve_seconds": self.solve_seconds, "binaries": self.binaries,
                "memory_bytes": self.memory_bytes}


def solve(table: CostTable, *, per_layer_tau: bool = False, uniform: bool = False,
          budgets: list[int] | None = None, taus: list[int] | None = None, name: str | None = None,
          branch_shared: bool = True, time_limit: float | None = None) -> Solution:
    """The optimum of the program over `table` (optionally restricted to some budgets / taus).

    With `branch_shared` the shared choices (the global tau; the uniform budget) are branched
    on first, outside the solver: the program is solved once with each y[tau] (z[B]) fixed to
    1, and the best is kept. It is the same program and the same optimum, but CBC's own
    branch-and-bound can stall on it when layers are nearly alike (a 0.03% gap between two
    taus kept it busy for over 20 minutes on 4.7k binaries), while each restriction is a
    multiple-choice knapsack it solves in a fraction of a second. `branch_shared=False`
    hands CBC the whole linked program (used by the tests on small instances)."""
    allowed_b = [b for b, B in enumerate(table.budgets) if (budgets is None or B in budgets)
                 and B * table.expert_bytes <= table.capacity]
    allowed_t = [t for t, tau in enumerate(table.taus) if taus is None or tau in taus]
    if not allowed_b or not allowed_t:
        raise BudgetError("no slot budget on the grid fits the memory left for experts")
    label = name or ("per-layer tau" if per_layer_tau else "uniform" if uniform else "per-layer budgets")
    L = len(table.layers)
    binaries = L * len(allowed_b) * len(allowed_t) + (0 if per_layer_tau else len(allowed_t)) + \
        (len(allowed_b) if uniform else 0)
    fix_t = [[t] for t in allowed_t] if branch_shared and not per_layer_tau and len(allowed_t) > 1 else [allowed_t]
    fix_b = [[b] for b in allowed_b] if branch_shared and uniform and len(allowed_b) > 1 else [allowed_b]
    best, elapsed = None, 0.0
    for ts in fix_t:
        for bs in fix_b:
            sol = _solve_linked(table, bs, ts, per_layer_tau, uniform, label, time_limit)
            elapsed += sol.solve_seconds
            if sol.status == "Optimal" and (best is None or sol.seconds_per_block < best.seconds_per_block):
                best = sol
    if best is None:
        raise BudgetError("the placement program has no solution: the budget leaves too little memory")
    best.solve_seconds, best.binaries = elapsed, binaries
    return best


def _solve_linked(table: CostTable, allowed_b: list[int], allowed_t: list[int], per_layer_tau: bool, uniform: bool,
                  label: str, time_limit: float | None) -> Solution:
    import warnings

    import pulp

    scale = 1e6  # microseconds: keeps the solver's tolerances far below the differences that matter
    L = len(table.layers)
    prob = pulp.LpProblem("tide_placement", pulp.LpMinimize)

    def binary(name: str):
        if hasattr(prob, "add_variable"):  # pulp >= 3.3
            return prob.add_variable(name, cat="Binary")
        return pulp.LpVariable(name, cat="Binary")

    x = {(j, b, t): binary(f"x_{j}_{b}_{t}") for j in range(L) for b in allowed_b for t in allowed_t}
    prob += pulp.lpSum(float(table.seconds[j, b, t] * scale) * v for (j, b, t), v in x.items())
    for j in range(L):
        prob += pulp.lpSum(x[j, b, t] for b in allowed_b for t in allowed_t) == 1
    prob += pulp.lpSum(table.budgets[b] * table.expert_bytes * v for (j, b, t), v in x.items()) <= table.capacity
    if not per_layer_tau and len(allowed_t) > 1:
        y = {t: binary(f"tau_{t}") for t in allowed_t}
        prob += pulp.lpSum(y.values()) == 1
        for j in range(L):
            for t in allowed_t:
                prob += pulp.lpSum(x[j, b, t] for b in allowed_b) == y[t]
    if uniform and len(allowed_b) > 1:
        z = {b: binary(f"budget_{b}") for b in allowed_b}
        prob += pulp.lpSum(z.values()) == 1
        for j in range(L):
            for b in allowed_b:
                prob += pulp.lpSum(x[j, b, t] for t in allowed_t) == z[b]
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # pulp 3.3 announces PULP_CBC_CMD's move; its bundled CBC is what we use
        warnings.simplefilter("ignore", DeprecationWarning)
        prob.solve(pulp.PULP_CBC_CMD(msg=0, timeLimit=time_limit))
    elapsed = time.perf_counter() - t0
    status = pulp.LpStatus[prob.status]
    slots, layer_taus = {}, {}
    if status == "Optimal":
        for (j, b, t), v in x.items():
            if v.value() is not None and v.value() > 0.5:
                slots[table.layers[j]] = table.budgets[b]
                layer_taus[table.layers[j]] = table.taus[t]
    if len(slots) != L:
        return Solution(label, None, {}, {}, float("inf"), status if status != "Optimal" else "Incomplete", elapsed,
                        len(x), 0)
    tau_values = set(layer_taus.values())
    return Solution(label, next(iter(tau_values)) if len(tau_values) == 1 else None, layer_taus, slots,
                    table.cost(slots, layer_taus), status, elapsed, len(x), sum(slots.values()) * table.expert_bytes)


def brute_force(table: CostTable, *, per_layer_tau: bool = False, uniform: bool = False) -> float:
    """The same optimum by enumeration (for tests: tiny grids only)."""
    fits = [B for B in table.budgets if B * table.expert_bytes <= table.capacity]
    best = float("inf")
    L = len(table.layers)
    budget_choices = [(B,) * L for B in fits] if uniform else itertools.product(fits, repeat=L)
    for combo in budget_choices:
        if sum(combo) * table.expert_bytes > table.capacity:
            continue
        slots = dict(zip(table.layers, combo))
        if per_layer_tau:
            total = table.fixed_seconds
            for j, B in enumerate(combo):
                total += table.seconds[j, table.budgets.index(B)].min()
            best = min(best, total)
        else:
            for tau in table.taus:
                best = min(best, table.cost(slots, tau))
    return best


def paper_program(table: CostTable, uniform_slots: int) -> Solution:
    """The paper's program: B fixed (the most that fits in every layer alike), tau alone chosen."""
    if uniform_slots not in table.budgets:
        raise ValueError(f"the budget grid lacks the uniform budget {uniform_slots}")
    return solve(table, uniform=True, budgets=[uniform_slots], name="uniform (paper)")
