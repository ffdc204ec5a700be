"""`tide profile`: measure what the engine's pieces cost on this machine (``measure``) and
save the profile where the engine and `tide plan` look for it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tide_local.calibration.measure import measure
from tide_local.errors import OutputPathError, UsageError  # noqa: F401 (UsageError: what the checks raise)
from tide_local.generate_cli import MAX_CTX, MAX_REPEAT, check_range, check_threads
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
                   help="the model to measure on (default: the demo model that ships with tide-local)")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (the first GPU of the loaded libggml, else emulated), cpu, emulated, or a device name")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help="where to save the profile (default: the cache directory, per device)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: all cores; 1 for a small model such as the demo)")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="timed repetitions per point (default 5)")
    p.add_argument("--ctx", type=int, default=1024, metavar="N",
                   help="context for the fixed-work passes (default 1024)")
    return p


def _check_output(out: Path) -> None:
    """The checks of a GGUF output, for a profile's path whose folder `save` may still create."""
    from tide_local.gguf.writer import check_output_path

    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir() and folder != out.parent:  # save makes the missing folders
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"{out}: cannot create its folder in {folder} (not writable)")
        return
    check_output_path(out)


def main(argv: list[str] | None = None, prog: str = "tide profile") -> int:
    args = build_parser(prog).parse_args(argv)
    check_range(args.repeat, "--repeat", 1, MAX_REPEAT)
    check_threads(args.threads)
    check_range(args.ctx, "--ctx", 64, MAX_CTX)
    if args.output:  # saved after minutes of measuring: refuse an unusable path first
        _check_output(Path(args.output))
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
