"""`tide convert`: a LLaDA2.0 Hugging Face checkpoint, or a LLaDA2 GGUF, → one GGUF file.

Streams tensor by tensor and row chunk by row chunk (bounded memory whatever the model
size), quantizes with ggml's own kernels in worker threads, writes to a temporary file
and renames it into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T, GGUFValueType

from tide_local import architecture
from tide_local.errors import OutputPathError, UsageError
from tide_local.gguf import GGUFStreamWriter, tensor_nbytes
from tide_local.gguf.writer import check_output_path, remove_stale_partials
from tide_local.progress import Progress, human_bytes

from .gguf_source import GGUFSource, is_gguf
from .hf_checkpoint import HFCheckpoint
from .quant_plan import OUTPUT_TYPES, TensorPlan, plan_types
from .tokenizer_meta import tokenizer_metadata

# Values per work item: 4M float32 = 16 MiB. With a few items in flight per thread the
# converter's memory stays far below its 3 GB bound.
CHUNK_VALUES = 1 << 22
DEFAULT_ALIGNMENT = 4096  # expert slices start on page boundaries where their sizes allow


def encode_rows(rows: np.ndarray, ggml_type: T) -> np.ndarray:
    """float32 [n, row] → the bytes of those rows in `ggml_type`."""
    if ggml_type == T.F32:
        return rows.astype("<f4", copy=False)
    if ggml_type == T.F16:
        return rows.astype("<f2")
    if ggml_type == T.BF16:
        bits = rows.astype("<f4", copy=False).view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))  # nearest even
        return (rounded >> np.uint32(16)).astype("<u2")
    from tide_local.ggml import quantize_rows

    return quantize_rows(np.ascontiguousarray(rows, dtype=np.float32), int(ggml_type))


def _work_items(source: HFCheckpoint | GGUFSource, plan: TensorPlan):
    """(source tensor name, first row, end row) pieces of one output tensor, in file order."""
    spec = plan.spec
    per_chunk = max(1, CHUNK_VALUES // max(1, spec.n_per_row))
    if isinstance(source, GGUFSource):  # one tensor, expert stacks as rows
        pieces = [(spec.name, source.n_rows(spec.name))]
    else:  # one per expert for stacks, expert-major
        pieces = [(name, source.tensors[name].n_rows) for name in spec.hf_names]
    for name, rows in pieces:
        for start in range(0, rows, per_chunk):
            yield name, start, min(rows, start + per_chunk)


def _read_job(source: HFCheckpoint | GGUFSource, plan: TensorPlan):
    """item → the bytes of those rows in the planned type (a GGUF's rows of that type: copied)."""
    if isinstance(source, GGUFSource) and source.source_type(plan.spec.name) == plan.ggml_type:
        return lambda item: np.array(source.raw_rows(*item))
    return lambda item: encode_rows(source.read_rows(*item), plan.ggml_type)


def _metadata(source: HFCheckpoint | GGUFSource, plans: list[TensorPlan], output_type: str, alignment: int) -> dict:
    """Key → value, or → (value, vtype, item_type) where the GGUF types are given."""
    cfg = source.config
    meta: dict[str, object] = {
        "general.architecture": architecture.ARCH,
        "general.type": "model",  # llama.cpp's converters write it; its loader reads it
        "general.name": source.name if isinstance(source, GGUFSource) else source.dir.name,
        "general.file_type": int(OUTPUT_TYPES[output_type][1]),
        "general.quantization_version": 2,
    }
    meta.update(cfg.gguf_metadata())  # with attention.value_length and expert_shared_feed_forward_length
    meta.update(architecture.CONSTANT_ARCH_METADATA)
    meta.update({
        "tide.layout_version": architecture.LAYOUT_VERSION,
        "tide.output_type": output_type,
        "tide.expert_alignment": alignment,
        "tide.block_length": architecture.DEFAULT_BLOCK_LENGTH,
        "tide.steps": architecture.DEFAULT_STEPS,
        "tide.threshold": architecture.DEFAULT_THRESHOLD,
    })
    types = {p.spec.name: p.ggml_type for p in plans}
    for proj in architecture.EXPERT_PROJECTIONS:
        slice_bytes = []
        for layer in range(cfg.n_layers):
            name = architecture.expert_tensor_name(layer, proj)
            if name in types:
                ne = next(p.spec.ne for p in plans if p.spec.name == name)
                slice_bytes.append(tensor_nbytes(ne[:2], types[name]))
            else:
                slice_bytes.append(0)
        meta[f"tide.expert_slice_bytes.{proj}"] = slice_bytes
    fallbacks = [p.fallback_note() for p in plans if p.fallback]
    if fallbacks:
        meta["tide.type_fallbacks"] = fallbacks
    if isinstance(source, GGUFSource):
        meta.update(source.tokenizer_metadata())
    else:
        meta.update(tokenizer_metadata(source.tokenizer_path, source.tokenizer_config, cfg.vocab_size))
    return meta


_ITEM_TYPES = {"tokenizer.ggml.token_type": GGUFValueType.INT32}
_ITEM_TYPES.update({f"tide.expert_slice_bytes.{p}": GGUFValueType.UINT64 for p in architecture.EXPERT_PROJECTIONS})


def _check_output(out: Path, log) -> None:
    """Refuse an unusable output before any work (a directory, a device or pipe, a missing or
    read-only folder), then remove what killed conversions left in the folder."""
    target = check_output_path(out)  # a symlink's target is replaced; the link stays
    directory = target.parent if str(target.parent) else Path(".")
    for path, size in remove_stale_partials(directory):
        print(f"removed {path} ({human_bytes(size)}), left by a conversion that was killed", file=log)


def max_threads() -> int:
    """The most threads an option may ask for: a few per core this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return 4 * max(1, cores)


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    if threads is not None and not 1 <= threads <= max_threads():
        raise UsageError(f"{flag} must be between 1 and {max_threads()} (4 per core), got {threads}")


def open_source(path) -> HFCheckpoint | GGUFSource:
    """A checkpoint folder, or a LLaDA2 GGUF file."""
    return GGUFSource(path) if not os.path.isdir(path) and is_gguf(path) else HFCheckpoint(path)


def convert(source_path, out, output_type: str = "q8_0", *, threads: int | None = None, dry_run: bool = False,
            alignment: int = DEFAULT_ALIGNMENT, progress: bool | None = None, log=None,
            allow_requantize: bool = False) -> dict:
    """Convert a Hugging Face checkpoint folder or a LLaDA2 GGUF; returns a summary dict
    (tensors, types, sizes). Raises TideError subclasses. Progress and notes go to `log`
    (default: sys.stderr at the time of the call). From a GGUF, a tensor quantized to another
    type than planned is refused unless `allow_requantize`."""
    log = log if log is not None else sys.stderr
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown type {output_type}; choose from {', '.join(OUTPUT_TYPES)}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    out = Path(out)
    if os.path.exists(out) and os.path.exists(source_path) and os.path.samefile(out, source_path):
        raise UsageError(f"{out} is the file being converted; write the output to another file")
    if not dry_run:
        _check_output(out, log)
    source = open_source(source_path)
    try:
        return _convert(source, out, output_type, threads, dry_run, alignment, progress, log, allow_requantize)
    finally:
        if isinstance(source, GGUFSource):
            source.close()


def _convert(source, out: Path, output_type, threads, dry_run, alignment, progress, log, allow_requantize) -> dict:
    plans = plan_types(source.specs, output_type, source.config.n_layers)
    if isinstance(source, GGUFSource):
        source.check_types(plans, allow_requantize)
    meta = _metadata(source, plans, output_type, alignment)
    writer = GGUFStreamWriter(out, alignment=alignment)
    for key, value in meta.items():
        if isinstance(value, tuple):  # copied with its GGUF types
            writer.add(key, *value)
        else:
            writer.add(key, value, item_type=_ITEM_TYPES.get(key))
    for p in plans:
        writer.add_tensor(p.spec.name, p.spec.ne, p.ggml_type)
    summary = {
        "tensors": len(plans),
        "output_bytes": writer.total_size(),
        "source_bytes": source.total_bytes,
        "plans": plans,
        "fallbacks": [p.fallback_note() for p in plans if p.fallback],
    }
    if dry_run:
        return summary
    threads = threads or min(8, os.cpu_count() or 1)
    bar = Progress(f"converting to {output_type}", summary["output_bytes"], len(plans), enabled=progress, stream=log)
    with writer, ThreadPoolExecutor(threads) as pool:
        writer.begin_data()
        free = shutil.disk_usage(writer.path.parent).free
        if free < summary["output_bytes"]:
            raise OutputPathError(
                f"{out}: needs {human_bytes(summary['output_bytes'])} but only {human_bytes(free)} is free there"
            )
        for p in plans:
            _convert_tensor(source, p, writer, pool, threads, bar)
        writer.finish()
    bar.close(f"wrote {out} ({human_bytes(summary['output_bytes'])}, {len(plans)} tensors)")
    return summary


def _convert_tensor(source, plan: TensorPlan, writer, pool, threads, bar) -> None:
    job = _read_job(source, plan)
    in_flight: deque = deque()
    for item in _work_items(source, plan):
        in_flight.append(pool.submit(job, item))
        if len(in_flight) >= 2 * threads:  # bounded: memory stays a few chunks per thread
            _drain_one(in_flight, plan, writer, bar)
    while in_flight:
        _drain_one(in_flight, plan, writer, bar)
    bar.advance(items=1)


def _drain_one(in_flight, plan, writer, bar) -> None:
    data = in_flight.popleft().result()
    writer.write(plan.spec.name, data)
    bar.advance(data.nbytes)


# -- command line -------------------------------------------------------------------------

EPILOG = """types:
  f32, f16, bf16          unquantized (bf16 copies the checkpoint's weights exactly)
  q8_0                    8-bit, near lossless (default)
  q6_k, q5_k, q4_k, q4_0  k-quants and legacy 4-bit, every matrix the same type
  q4_k_m, q5_k_m          mixes as in llama.cpp: LM head q6_k, fused QKV and ffn_down
                          on some layers at higher precision
  Norms, router weights and expert bias stay f32. A matrix whose rows do not divide
  into the type's blocks falls back to the nearest type that fits (`tide info` lists them).

From a GGUF (ours, or a LLaDA2 GGUF from llama.cpp's converter): the file is laid out
again for tide (page-aligned experts: faster uploads to a GPU; decoding defaults). Tensors
that keep their type are copied unchanged; from f32/f16/bf16 any type can be made; weights
already quantized to another type are refused unless --allow-requantize (their quantization
error would compound: convert from the checkpoint instead). --type defaults to the file's.

examples:
  tide convert ./LLaDA2.0-mini -o llada2-mini-q4_k_m.gguf --type q4_k_m
  tide convert ./LLaDA2.0-mini -o mini.gguf --type q8_0 --dry-run
  tide convert LLaDA2.0-mini-Q8_0.gguf -o mini-q8_0.gguf      re-lay out a llama.cpp GGUF
  tide convert mini-f16.gguf -o mini-q4_k_m.gguf --type q4_k_m
"""


def build_parser(prog: str = "tide convert") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert a LLaDA2.0 Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json), "
        "or a LLaDA2 GGUF, to a GGUF file for tide. Streams in bounded memory: a 206 GB checkpoint converts with "
        "a few GB of RAM.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="HF_DIR|IN.gguf",
                   help="checkpoint directory as published on Hugging Face, or a LLaDA2 GGUF")
    p.add_argument("-o", "--output", metavar="OUT.gguf", help="output file (default: SOURCE-TYPE.gguf beside SOURCE)")
    p.add_argument("-t", "--type", default=None, choices=list(OUTPUT_TYPES), metavar="TYPE",
                   help="weight type (default: q8_0, or a GGUF's own type; see the list below)")
    p.add_argument("--allow-requantize", action="store_true",
                   help="from a GGUF, allow quantized weights to be quantized to another type")
    p.add_argument("--threads", type=int, default=None, help="quantization threads (default: CPU cores, at most 8)")
    p.add_argument("--dry-run", action="store_true", help="print the tensor plan, types and output size; write nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="with --dry-run, list every tensor")
    return p


def default_output(source_path: str, output_type: str) -> str:
    """SOURCE-TYPE.gguf beside SOURCE (a GGUF's name without its .gguf)."""
    source = Path(source_path.rstrip("/\\") or source_path or ".")
    if source.name in ("", ".", ".."):
        source = Path(os.path.abspath(source))
    if not source.name:  # the root folder
        raise UsageError(f"give the output file with -o (no default beside {source_path})")
    stem = source.stem if source.suffix.lower() == ".gguf" else source.name
    return str(source.with_name(f"{stem}-{output_type}.gguf"))


def source_type_name(source_path: str) -> str:
    """The output type to default to: a GGUF's own (its tide.output_type or general.file_type), else q8_0."""
    if os.path.isdir(source_path) or not is_gguf(source_path):
        return "q8_0"
    from tide_local.gguf import GGUFFile

    with GGUFFile(source_path) as g:
        named = g.get("tide.output_type")
        if named in OUTPUT_TYPES:
            return named
        by_file_type = {int(ft): name for name, (_, ft) in OUTPUT_TYPES.items()}
        return by_file_type.get(g.get("general.file_type"), "q8_0")


def main(argv: list[str] | None = None, prog: str = "tide convert") -> int:
    args = build_parser(prog).parse_args(argv)
    check_threads(args.threads)
    output_type = args.type or source_type_name(args.source)
    out = args.output or default_output(args.source, output_type)
    summary = convert(args.source, out, output_type, threads=args.threads, dry_run=args.dry_run,
                      allow_requantize=args.allow_requantize)
    if args.dry_run:
        print_plan(summary, out, args.type, verbose=args.verbose)
    return 0


def print_plan(summary: dict, out: str, output_type: str, verbose: bool = False) -> None:
    plans: list[TensorPlan] = summary["plans"]
    by_type: dict[str, list[int]] = {}
    for p in plans:
        nbytes = tensor_nbytes(p.spec.ne, p.ggml_type)
        entry = by_type.setdefault(p.ggml_type.name, [0, 0])
        entry[0] += 1
        entry[1] += nbytes
        if verbose:
            print(f"  {p.spec.name:<36} {str(list(p.spec.ne)):<22} {p.ggml_type.name:<6} {human_bytes(nbytes):>10}")
    print(f"plan for {out} ({output_type}): {summary['tensors']} tensors")
    for name, (count, nbytes) in sorted(by_type.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<6} {count:5d} tensors {human_bytes(nbytes):>12}")
    for note in summary["fallbacks"]:
        print(f"  fallback {note}")
    print(f"source {human_bytes(summary['source_bytes'])} -> output {human_bytes(summary['output_bytes'])} "
          "(dry run: nothing written)")
