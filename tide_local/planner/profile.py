"""Hardware profiles: what each piece of the engine's work costs on a machine, as a file.

A *measured* profile (``tide profile``, measured by ``tide_local.calibration.measure``)
holds the coefficients of `Costs` fitted on this machine with one model; it describes
that model's costs (the fixed work is that model's) and refuses to be used for a model
of another shape. A *specification* profile (the shipped presets, e.g.
``a100-40gb-pcie4``) holds public hardware figures (PCIe, HBM and host memory
bandwidth, FLOPs, launch overheads) and derives the same coefficients for any model
shape: estimates, so that predictions can be made anywhere.

Pure: reads and writes profile files, never measures (the engine's tau="auto" reads them).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from tide_local.errors import ProfileError
from tide_local.paths import write_json_atomically
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
    from tide_local.paths import cache_dir

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
        write_json_atomically(path, self.to_dict())
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
