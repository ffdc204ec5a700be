"""GGUF file sizes of the real LLaDA2.0 models for every `tide convert --type` (for models.md).

Computed from the published shapes with the converter's own type plan, so it needs no
download:  python benchmarks/model_sizes.py
"""

from __future__ import annotations

from tide_local.converters.quant_plan import OUTPUT_TYPES, plan_types
from tide_local.converters.testmodel import build_config
from tide_local.gguf import tensor_nbytes
from tide_local.architecture import LLaDA2Config, tensor_specs


def sizes(preset: str) -> dict[str, tuple[float, float]]:
    cfg = LLaDA2Config.from_hf(build_config(preset))
    specs = tensor_specs(cfg)
    out = {}
    for name in OUTPUT_TYPES:
        plans = plan_types(specs, name, cfg.n_layers)
        total = sum(tensor_nbytes(p.spec.ne, p.ggml_type) for p in plans)
        experts = sum(tensor_nbytes(p.spec.ne, p.ggml_type) for p in plans if p.spec.is_expert_stack)
        out[name] = (total / 1e9, (total - experts) / 1e9)
    return out


def main() -> None:
    table = {preset: sizes(preset) for preset in ("mini", "flash")}
    print("| type | mini: file (GB) | mini: non-expert (GB) | flash: file (GB) | flash: non-expert (GB) |")
    print("|---|---|---|---|---|")
    for name in OUTPUT_TYPES:
        m, f = table["mini"][name], table["flash"][name]
        print(f"| `{name}` | {m[0]:.1f} | {m[1]:.2f} | {f[0]:.1f} | {f[1]:.2f} |")


if __name__ == "__main__":
    main()
