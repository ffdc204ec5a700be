"""`tide profile`: measure what the engine's pieces cost on this machine (``measure``) and
save the profile where the engine and `tide plan` look for it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tide_local.calibration.measure import measure
from tide_local.errors import OutputPathError, UsageError
from tide_local.planner.profile import default_profile_path, preset_names

DESCRIPTION = """\
Measure what the engine's pieces cost on this machine: uploading expert slices to the
device (seconds per copy and per byte), running missed experts on the CPU and hit experts
on the device (by rows and distinct experts), and the fixed work of a pass (attention,
routers, shared experts, LM head). Saves the profile as JSON (by default where the engine
and `tide plan` look for it) and prints it. Takes seconds on the demo model, a few minutes
on a large one."""

EPILOG = f"""\
examples:
  tide profile                                   # the demo model, on the best device (else emulated)
  tide profile -m llada2-mini-q4_k_m.gguf --device CUDA0
  tide profile -m mini.gguf --device emulated -o mini-emulated.json

presets from public specifications (estimates, usable with `tide plan --profile NAME`):
  {', '.join(preset_names())}
"""


def build_parser(prog: str = "tide profile") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", metavar="MODEL.gguf", default=None,
                   help="the model to measure on (default: the demo model, built on first use)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (the first GPU of the loaded libggml, else emulated), cpu, emulated, or a device name")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="where to save the profile (default: the cache directory, per device)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="timed repetitions per point (default 5)")
    p.add_argument("--ctx", type=int, default=1024, metavar="N",
                   help="context for the fixed-work passes (default 1024)")
    return p


def main(argv: list[str] | None = None, prog: str = "tide profile") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.repeat < 1:
        raise UsageError(f"--repeat must be at least 1, got {args.repeat}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    if args.ctx < 64:
        raise UsageError(f"--ctx must be at least 64, got {args.ctx}")
    if args.model is None:
        from tide_local.demo import demo_model_path

        model = demo_model_path()
    else:
        model = args.model
    profile = measure(model, args.device, threads=args.threads, n_ctx=args.ctx, repeat=args.repeat)
    out = Path(args.output) if args.output else default_profile_path(profile.device)
    try:
        profile.save(out)
    except OSError as err:
        raise OutputPathError(f"cannot write the profile to {out} ({err.strerror})") from None
    print(json.dumps({k: v for k, v in profile.to_dict().items() if k != "samples"}, indent=1))
    print(f"profile saved to {out}", file=sys.stderr)
    return 0
