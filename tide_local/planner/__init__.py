"""The planner: hardware profiles, a cost model over routing traces, and the program that
chooses TIDE's refresh interval and every MoE layer's expert slots under a memory limit.

Pure (no model is loaded, nothing is measured): the engine imports ``lookup``, and
``tide_local.calibration`` (measuring, `tide profile`, `tide plan`) builds on all of it.

    shape.py    what the planner needs of a model: sizes, FLOPs, the fixed device bytes
    profile.py  profile files: measured coefficients, or estimates from specifications (presets/)
    cost.py     replay a placement over a routing trace and predict its time per block
    milp.py     the mixed-integer program (pulp/CBC) over tau and per-layer slot budgets
    plan.py     a plan for a budget: the program's choice and the baselines' predictions
    lookup.py   the plan cache: where plans go, and what the engine's tau="auto" uses
    synth.py    synthetic routing traces with a tunable step-to-step stability
"""
