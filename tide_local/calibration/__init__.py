"""Calibration: measuring this machine and the `tide profile` / `tide plan` commands.

Above the engine (it loads models and runs them through the engine's public surface);
the pure planner (``tide_local.planner``) below it prices and solves.

    measure.py        `measure`: a profile of this machine, stage by stage (uploads, fixed work)
    expert_timing.py  the CPU and device expert stages, alone and both at once
    fitting.py        timers, the non-negative fit, each stage's coefficients → `Costs`
    traces.py         the routing of a few built-in prompts, recorded with the CPU engine
    profile_cli.py    `tide profile`
    plan_cli.py       `tide plan`: find a profile and a trace, plan, print, cache
"""
