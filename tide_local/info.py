"""`tide info MODEL.gguf`: what a model file holds, after validating it."""

from __future__ import annotations

import argparse
import json

from gguf import LlamaFileType

from tide_local import architecture
from tide_local.errors import UsageError
from tide_local.modelfile import ModelFile
from tide_local.progress import human_bytes


def _file_type(value) -> str | None:
    """general.file_type (llama.cpp's LlamaFileType) as `tide convert` names types: q8_0, q4_k_m."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    try:
        name = LlamaFileType(value).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


def describe(model: ModelFile) -> dict:
    """Everything `tide info` shows, as plain data."""
    cfg, g = model.config, model.gguf
    types: dict[str, dict] = {}
    for t in g.tensors.values():
        entry = types.setdefault(t.type_name, {"tensors": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["bytes"] += t.nbytes
    first_moe = next(iter(cfg.moe_layers), None)
    slices = {}
    if first_moe is not None:
        for proj in architecture.EXPERT_PROJECTIONS:
            layout = model.experts(first_moe, proj)
            slices[proj] = {"bytes": layout.slice_bytes, "type": layout.tensor.type_name}
    return {
        "file": str(model.path),
        "file_bytes": g.file_size,
        "architecture": g.get("general.architecture"),
        "name": g.get("general.name"),
        "output_type": g.get("tide.output_type") or _file_type(g.get("general.file_type")),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "tensor_types": types,
        "expert_slice": slices,
        "expert_bytes": model.expert_bytes(),
        "non_expert_bytes": model.non_expert_bytes(),
        "type_fallbacks": list(g.get("tide.type_fallbacks", [])),
        "special_token_ids": model.special_ids,
        "decoding": model.decoding_defaults(),
        "chat_template": "tokenizer.chat_template" in g.metadata,
        "tokenizer": "tokenizer.json" if "tokenizer.huggingface.json" in g.metadata else "tokenizer.ggml",
        "alignment": g.alignment,
        "expert_stacks_page_aligned": model.expert_stacks_page_aligned(),
        "tide_keys": model.has_tide_keys,
    }


def print_description(d: dict) -> None:
    cfg = d["config"]
    print(f"{d['file']}: {d['architecture']} '{d['name']}', {human_bytes(d['file_bytes'])}"
          + (f", {d['output_type']}" if d["output_type"] else ""))
    print(
        f"  layers {cfg['n_layers']} ({cfg['n_dense_layers']} dense), hidden {cfg['hidden_size']}, "
        f"heads {cfg['n_heads']}/{cfg['n_kv_heads']} x {cfg['head_dim']}, rotary {cfg['rotary_dim']} "
        f"(theta {cfg['rope_theta']:g}), vocab {cfg['vocab_size']}, context {cfg['context_length']}"
    )
    print(
        f"  experts {cfg['n_experts']} (use {cfg['n_experts_used']}, {cfg['n_groups']} groups keep "
        f"{cfg['n_groups_used']}, scale {cfg['routed_scaling_factor']:g}), expert ffn {cfg['expert_ffn_dim']}, "
        f"shared {cfg['n_shared_experts']}, dense ffn {cfg['ffn_dim']}"
    )
    print("  tensor types:")
    for name, t in sorted(d["tensor_types"].items(), key=lambda kv: -kv[1]["bytes"]):
        print(f"    {name:<6} {t['tensors']:6d} tensors {human_bytes(t['bytes']):>12}")
    if d["expert_slice"]:
        parts = ", ".join(f"{p} {human_bytes(s['bytes'])} ({s['type']})" for p, s in d["expert_slice"].items())
        print(f"  bytes per expert slice: {parts}")
        if not d["expert_stacks_page_aligned"]:
            print(f"  expert stacks not page-aligned (file alignment {d['alignment']}): they load and run correctly;"
                  "\n    `tide convert` of the Hugging Face checkpoint starts each on a page")
    total = d["expert_bytes"] + d["non_expert_bytes"]
    print(f"  routed experts {human_bytes(d['expert_bytes'])} ({100 * d['expert_bytes'] / max(1, total):.1f}%), "
          f"everything else {human_bytes(d['non_expert_bytes'])}")
    for note in d["type_fallbacks"]:
        print(f"  fallback {note}")
    ids = ", ".join(f"{k} {v}" for k, v in d["special_token_ids"].items())
    print(f"  special tokens: {ids}; chat template: {'yes' if d['chat_template'] else 'no'}")
    dec = d["decoding"]
    print(f"  decoding defaults: block {dec['block_length']}, steps {dec['steps']}, threshold {dec['threshold']:g}"
          + ("" if d["tide_keys"] else " (the family's: the file has no tide.* keys, e.g. from llama.cpp's converter)"))
    if d["tokenizer"] != "tokenizer.json":
        print("  tokenizer: built from tokenizer.ggml.* (byte-level BPE; the file stores no tokenizer.json)")


def build_parser(prog: str = "tide info") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Validate a LLaDA2 GGUF file and show its architecture, hyperparameters, tensor types, "
        "the size of one expert slice (what the offload engine moves), and the special token ids.",
        epilog="example:\n  tide info llada2-mini-q4_k_m.gguf\n  tide info model.gguf --json | jq .expert_slice",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL.gguf",
                   help="a LLaDA2 GGUF written by `tide convert` or by llama.cpp's converter")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--gpu-memory", metavar="SIZE", default=None,
                   help="also show the device memory plan for this budget (e.g. 6GiB): bytes by kind, expert "
                   "slots per MoE layer, the share of experts resident")
    p.add_argument("--ctx", type=int, default=4096, metavar="N", help="context to plan the KV cache for (default 4096)")
    return p


def main(argv: list[str] | None = None, prog: str = "tide info") -> int:
    args = build_parser(prog).parse_args(argv)
    from tide_local.experts.memory import parse_memory, plan_memory
    from tide_local.generate_cli import MAX_CTX, check_range

    check_range(args.ctx, "--ctx", 32, MAX_CTX)
    budget = None
    if args.gpu_memory is not None:
        try:
            budget = parse_memory(args.gpu_memory)
        except ValueError as err:
            raise UsageError(f"--gpu-memory: {err}") from None
    with ModelFile(args.model) as model:
        d = describe(model)
        plan = None
        if budget is not None:
            plan = plan_memory(model, budget, min(args.ctx, model.config.context_length))
    if args.json:
        if plan is not None:
            d["memory_plan"] = {"budget": plan.budget, "device_bytes": plan.device_bytes, "slots": plan.slots,
                                "expert_bytes": plan.expert_bytes, "resident_fraction": plan.resident_fraction}
        print(json.dumps(d, indent=2))
    else:
        print_description(d)
        if plan is not None:
            print(plan.describe())
    return 0
