"""`tide bench MODEL.gguf`: how fast a denoising step runs on this machine's CPU, how far
that is from the memory-bandwidth floor, and how it compares with llama.cpp on the same
weights."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tide_local.errors import UsageError
from tide_local.generate_cli import MAX_CTX, MAX_REPEAT, max_threads
from tide_local.ggml.backend import usable_cores
from tide_local.gguf.writer import check_output_path
from tide_local.paths import write_json_atomically
from tide_local.progress import human_bytes

EPILOG = """\
what it measures (each row: one context length and thread count):
  ms/step        our forward of one 32-token block at the end of a context held in the
                 KV cache, logits for all 32 tokens (median after a warm-up)
  MB read        weight bytes the step reads: every matrix but the embedding table, plus
                 the distinct experts its 32 tokens chose in each MoE layer
  floor, x floor those bytes at this machine's read bandwidth (a STREAM-style probe with
                 the same thread count), and how many times the floor the step takes
  kernels        the step's matmuls and attention run alone, op kind by op kind, over the
                 same weights and routing: what ggml's kernels need (x kernels: the rest is
                 our graphs' own work — norms, RoPE, copies — and host time)
  llama.cpp      llama.cpp (llama-cpp-python) decoding the same 32 tokens at the same
                 positions over the same context, timed alternately with ours; it reads a
                 `bailingmoe2` copy of the model written beside it once (same tensors,
                 renamed keys: as large as the model)
Also: load time, peak RSS (the weights are mapped, not copied) and tokens/s end to end;
with --batch, the aggregate tokens/s of several prompts decoded together (one forward per
step for all) against the same prompts one after another.

examples:
  tide bench model.gguf                           contexts 512 and 2048, 1 and all threads
  tide bench model.gguf --context 4096 --threads 4,8 --no-llama-cpp
  tide bench model.gguf --json bench.json         the numbers as JSON too
  tide bench --demo                               the demo model (llama.cpp's copy goes to the cache folder)
  tide bench model.gguf --batch 2,4,8 --no-llama-cpp   what decoding 8 prompts together buys here
"""


MAX_LIST = 16  # values per list option: each is a row of timed runs
MAX_BATCH = 64  # prompts per --batch run


def _int_list(text: str, what: str, allow_all: bool = False, high: int | None = None) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if allow_all and part == "all":
            out.append(usable_cores())
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{what} must be at most {high}, got {value}")
        out.append(value)
    if len(set(out)) > MAX_LIST:
        raise argparse.ArgumentTypeError(f"{what}: at most {MAX_LIST} values, got {len(set(out))}")
    return sorted(set(out))


def build_parser(prog: str = "tide bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL.gguf", nargs="?", help="a GGUF written by `tide convert`")
    p.add_argument("--demo", action="store_true", help="bench the demo model that ships with tide-local")
    p.add_argument("--context", default="512,2048", metavar="N[,N...]",
                   type=lambda s: _int_list(s, "--context", high=MAX_CTX),
                   help="tokens already in the KV cache (default 512,2048)")
    p.add_argument("--threads", default="1,all", metavar="N[,N...]",
                   type=lambda s: _int_list(s, "--threads", allow_all=True, high=max_threads()),
                   help="thread counts to measure; 'all' = every core (default 1,all)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="timed steps per row (default 5)")
    p.add_argument("--generate", type=int, default=64, metavar="N",
                   help="tokens for the end-to-end tokens/s run (0 skips it; default 64)")
    p.add_argument("--batch", default="", metavar="N[,N...]",
                   type=lambda s: _int_list(s, "--batch", high=MAX_BATCH) if s else [],
                   help="also decode max(N) prompts with at most N per forward, against one after another "
                        "(--generate tokens each; default: not measured)")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false", help="skip the llama.cpp comparison")
    p.add_argument("--llama-cpp-copy", type=Path, metavar="PATH",
                   help="where to keep the bailingmoe2 copy for llama.cpp (default: beside the model)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the measurements as JSON")
    return p


def main(argv: list[str] | None = None, prog: str = "tide bench") -> int:
    args = build_parser(prog).parse_args(argv)
    from tide_local.bench.cpu import BenchOptions, render, run
    from tide_local.modelfile import ModelFile

    if args.demo == bool(args.model):
        raise UsageError("give MODEL.gguf or --demo (one of them)")
    if args.demo:
        from tide_local.demo import demo_model_path
        from tide_local.paths import cache_dir

        args.model = str(demo_model_path())
        if args.llama_cpp and args.llama_cpp_copy is None:  # not beside the packaged file
            args.llama_cpp_copy = cache_dir() / "demo-bailingmoe2.gguf"
            try:
                args.llama_cpp_copy.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UsageError(f"cannot create {args.llama_cpp_copy.parent} ({err.strerror}); set TIDE_CACHE_DIR "
                                 "or pass --llama-cpp-copy") from None
    if args.repeats < 1:
        raise UsageError("--repeats must be >= 1")
    if args.repeats > MAX_REPEAT:
        raise UsageError(f"--repeats must be at most {MAX_REPEAT}, got {args.repeats}")
    if args.generate < 0:
        raise UsageError("--generate must be >= 0")
    if args.json is not None and not os.access(args.json.parent if str(args.json.parent) else ".", os.W_OK):
        raise UsageError(f"--json: cannot write to {args.json.parent}")
    if args.json is not None:
        check_output_path(args.json)
    if args.llama_cpp and args.llama_cpp_copy is not None:
        check_output_path(args.llama_cpp_copy)
    with ModelFile(args.model) as model:  # validate first: one line for a bad file
        n_ctx = model.config.context_length
        size = model.gguf.file_size
    if max(args.context) + 32 > n_ctx:
        raise UsageError(f"--context {max(args.context)} leaves no room for a 32-token block "
                         f"in the model's context of {n_ctx}")
    if args.generate > n_ctx:
        raise UsageError(f"--generate {args.generate} is more than the model's context of {n_ctx}")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    mapped = size * (2 if args.llama_cpp else 1)
    print(f"{Path(args.model).name}: {human_bytes(size)} of weights, mapped"
          + (" (and as much again for llama.cpp's copy)" if args.llama_cpp else "")
          + (f"; {human_bytes(ram)} RAM" if ram else ""), file=sys.stderr)
    if ram and mapped > 0.9 * ram:
        print(f"warning: {human_bytes(mapped)} of mapped weights will not stay in {human_bytes(ram)} of RAM; "
              "steps will read from disk" + (" (try --no-llama-cpp)" if args.llama_cpp else ""), file=sys.stderr)
    opts = BenchOptions(contexts=args.context, threads=args.threads, repeats=args.repeats,
                        llama_cpp=args.llama_cpp, llama_cpp_copy=args.llama_cpp_copy, generate_tokens=args.generate,
                        batch=args.batch)
    report = run(args.model, opts, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render(report), end="")
    if args.json:
        write_json_atomically(args.json, report, indent=2)
    return 0
