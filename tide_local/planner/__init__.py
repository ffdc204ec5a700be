"""The planner: hardware profiles, a cost model over routing traces, and the program that
chooses TIDE's refresh interval and every MoE layer's expert slots under a memory limit.

    profile.py  what each piece of work costs on a machine (measured, or from specifications)
    cost.py     replay a placement over a routing trace and predict its time per block
    milp.py     the mixed-integer program (pulp/CBC) over tau and per-layer slot budgets
    synth.py    synthetic routing traces with a tunable step-to-step stability
    plan.py     `tide plan`, the plan cache, and what the engine's tau="auto" uses
"""
