"""The plans `tide plan` caches, and the lookup behind the engine's ``tau="auto"``.

Pure: reads and writes small cache files, never measures, records or loads a model, so
the engine may import it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from tide_local.errors import ProfileError
from tide_local.experts.memory import MemoryPlan
from tide_local.paths import write_json_atomically
from tide_local.planner.profile import default_profile_path, load_profile
from tide_local.planner.shape import shape_from_file

PLAN_FORMAT = "tide-local plan"
PLAN_VERSION = 1


def plan_dir() -> Path:
    from tide_local.paths import cache_dir

    return cache_dir() / "plans"


def model_identity(model_file) -> dict:
    """What identifies a model for cached plans and traces: its file name, size and shape."""
    shape = shape_from_file(model_file)
    return {"name": model_file.path.name, "file_bytes": model_file.gguf.file_size, **shape.signature()}


def plan_key(identity: dict, budget: int, n_ctx: int, profile_digest: str) -> str:
    body = json.dumps([identity, int(budget), int(n_ctx), profile_digest], sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:20]


def plan_path(identity: dict, budget: int, n_ctx: int, profile_digest: str) -> Path:
    return plan_dir() / f"{plan_key(identity, budget, n_ctx, profile_digest)}.json"


def builtin_trace_path(identity: dict) -> Path:
    """Where `tide plan` caches the routing it records on its built-in prompts for a model."""
    from tide_local.paths import cache_dir

    return cache_dir() / "traces" / f"{plan_key(identity, 0, 0, 'builtin-prompts')}.json"


def cache_plan(result, identity: dict) -> Path:
    """Save a `PlanResult` where the engine's tau="auto" looks for it (same model, budget,
    context, profile)."""
    path = plan_path(identity, result.budget, result.n_ctx, result.profile.digest)
    record = {"format": PLAN_FORMAT, "version": PLAN_VERSION, "model": identity, "budget": result.budget,
              "n_ctx": result.n_ctx, "profile": result.profile.digest, "device": result.profile.device,
              "tau": result.planned.tau, "slots": {str(k): v for k, v in result.planned.slots.items()},
              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "predicted": result.predictions["tide (planned)"].summary()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, record)
    return path


@dataclass
class AutoPlacement:
    """What the engine's tau="auto" resolves to."""

    tau: int
    plan: MemoryPlan
    source: str


def auto_placement(model_file, memory_plan: MemoryPlan, device: str, default_tau: int) -> AutoPlacement:
    """The cached plan for this model, budget, context and the device's saved profile, or
    `default_tau` with the memory plan's uniform slots (and why). Reads two small files at
    most: never profiles or records anything."""
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
        planned = memory_plan.with_slots(slots, f"expert slots per layer from the plan {path}")
        if not planned.fits:
            raise ValueError("its slots do not fit the budget")
    except (ProfileError, OSError, ValueError, KeyError, TypeError) as err:
        return AutoPlacement(default_tau, memory_plan, f"default tau {default_tau}: the cached plan or profile is "
                             f"unusable ({err}); {hint}")
    return AutoPlacement(tau, planned, f"plan {path}")


ADAPTIVE_FALLBACK_PRESET = "a100-40gb-pcie4"


def adaptive_prices(model_file, device: str) -> tuple[tuple[float, float], str]:
    """The adaptive policy's prices for this model on `device`, and where they come from: the
    device's measured profile (`tide profile`), else the fallback preset's specification."""
    from tide_local.errors import ProfileError
    from tide_local.planner.profile import default_profile_path, load_profile
    from tide_local.planner.shape import shape_from_file

    shape = shape_from_file(model_file)
    path = default_profile_path(device)
    if path.exists():
        try:
            return load_profile(path).costs_for(shape).adaptive_prices(shape), f"profile {path}"
        except ProfileError as err:
            why = f"the profile is unusable ({err})"
    else:
        why = f"no profile for device '{device}' (run `tide profile --device {device}`)"
    prices = load_profile(ADAPTIVE_FALLBACK_PRESET).costs_for(shape).adaptive_prices(shape)
    return prices, f"{ADAPTIVE_FALLBACK_PRESET} specification: {why}"
