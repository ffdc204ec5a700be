"""The `tide` command: a thin dispatcher. Each subcommand is its own module with its own
parser and ``main(argv, prog)``, imported only when used so `tide --help` is instant."""

from __future__ import annotations

import errno
import importlib
import os
import sys

from tide_local.errors import TideError

COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("tide_local.converters.convert", "convert a Hugging Face LLaDA2.0 checkpoint (or a GGUF) to GGUF"),
    "pull": ("tide_local.pull_cli", "download a LLaDA2.0 checkpoint from the Hugging Face hub and convert it"),
    "info": ("tide_local.info", "show and validate a LLaDA2 GGUF file"),
    "devices": ("tide_local.devices_cli", "list the compute devices of the loaded libggml (and the one auto takes)"),
    "generate": ("tide_local.generate_cli", "generate text from a prompt (streamed block by block)"),
    "profile": ("tide_local.calibration.profile_cli", "measure upload, CPU and device expert costs on this machine"),
    "plan": ("tide_local.calibration.plan_cli", "choose TIDE's refresh interval and per-layer expert slots for a budget"),
    "bench": ("tide_local.bench.cli", "time a denoising step on the CPU: bandwidth floor, llama.cpp, tokens/s"),
    "chat": ("tide_local.tui.cli", "chat in the terminal, watching each block denoise"),
    "serve": ("tide_local.serve.cli", "serve the model over HTTP with OpenAI's API"),
}

USAGE = """usage: tide COMMAND [options]

Run LLaDA2.0 MoE diffusion language models locally with TIDE expert offload.

commands:
{commands}

`tide COMMAND --help` explains each command's options.
"""


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        return 0
    if argv[0] in ("-V", "--version"):
        from tide_local import __version__

        print(f"tide-local {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"tide: error: unknown command '{name}' (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    try:
        rc = module.main(rest, prog=f"tide {name}") or 0
        sys.stdout.flush()  # here, not at exit: a closed pipe or a full disk is reported below
        return rc
    except TideError as err:
        print(f"tide {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP/... while a file is written
        signum = getattr(err, "signum", 2)
        print(f"tide {name}: interrupted" + (f" ({err})" if signum != 2 else ""), file=sys.stderr)
        return 128 + signum
    except OSError as err:
        if err.errno not in (errno.EPIPE, errno.ENOSPC, errno.EDQUOT):
            raise
        _silence_stdout()
        if err.errno == errno.EPIPE:  # e.g. `tide info m.gguf | head -1`: the reader left; stop quietly
            return 141
        print(f"tide {name}: error: cannot write: {err.strerror}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """After stdout failed (a closed pipe, a full disk): if it still holds unwritable bytes,
    point it at /dev/null, so that the interpreter's flush at exit does not fail again with a
    traceback."""
    try:
        sys.stdout.flush()
        return
    except (OSError, ValueError):
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
