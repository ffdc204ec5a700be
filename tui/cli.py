"""`tide chat`'s command line: options, checks, then the app (tui/app.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .commands import DEFAULT_MAX_NEW_TOKENS

DESCRIPTION = """\
Chat with a LLaDA2 GGUF (written by `tide convert`) in the terminal. Each turn goes through the
model's chat template with the whole conversation. While the model decodes, the active block of
32 tokens is drawn live: masked positions resolve into text as the denoising steps commit them,
and finished blocks flow into the answer. The status line shows tokens/s, steps per block and
tokens per step, and with expert offload the device hit rate, uploads and the CPU's share.

Keys: Enter sends, Ctrl+J inserts a newline, Esc stops an answer, Ctrl+N starts a new
conversation, F1 shows help, Ctrl+Q quits. Commands: /reset, /system TEXT, /set NAME VALUE,
/stats, /help, /quit."""

EPILOG = """\
examples:
  tide chat --demo
  tide chat -m llada2-mini-q4_k_m.gguf --system "You are a concise assistant."
  tide chat -m mini.gguf --gpu-memory 6GiB --policy tide --threshold 0.9
  tide chat -m mini.gguf --device emulated --gpu-memory 2GiB      # watch the offload without a GPU

--demo runs the demo model that ships with tide-local: a small LLaDA2 trained on three tasks
only. Ask it "Reverse: apple pear fig" (it does that well), "What is 123 + 456?" or
"Sort: 5 3 9 1" (right form, mostly wrong numbers).
"""

NO_MODEL = """\
no model given. Either:
  tide chat -m MODEL.gguf   a LLaDA2 GGUF: download a checkpoint as models.md explains
                            (e.g. LLaDA2.0-mini) and convert it with
                            `tide convert ./LLaDA2.0-mini -o mini.gguf --type q4_k_m`
  tide chat --demo          the small demo model that ships with tide-local (it
                            reverses words), no download"""


def build_parser(prog: str = "tide chat") -> argparse.ArgumentParser:
    from tide_local.generate_cli import add_decoding_arguments, add_model_arguments, add_offload_arguments

    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(raw=False)  # for generate_cli's option checks: chat always uses the chat template
    src = p.add_argument_group("model")
    add_model_arguments(src)
    src.add_argument("--system", metavar="TEXT", help="system prompt (change it in the app with /system)")

    dec = p.add_argument_group("decoding (change them in the app with /set NAME VALUE)")
    add_decoding_arguments(dec, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)

    off = p.add_argument_group("device and expert offload (as for `tide generate`)")
    add_offload_arguments(off)
    off.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: all cores)")

    ui = p.add_argument_group("display")
    ui.add_argument("--inline", action="store_true", help="run under the prompt instead of taking the whole screen")
    return p


def main(argv: list[str] | None = None, prog: str = "tide chat") -> int:
    from tide_local.errors import TideError, UsageError
    from tide_local.generate_cli import _check_options, load_options
    from tide_local.modelfile import ModelFile

    args = build_parser(prog).parse_args(argv)
    try:
        options = _check_options(args)
        if not args.model and not args.demo:
            raise UsageError(NO_MODEL)
        if args.model and not Path(args.model).is_file():
            raise UsageError(f"no such file: {args.model} (a LLaDA2 GGUF written by `tide convert`; see models.md)")
        if args.model:  # a file that cannot be a model is one line here, before the full screen
            with ModelFile(args.model):
                pass
    except TideError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code
    from .app import ChatApp  # textual loads only once the options are good

    app = ChatApp(args.model, demo=args.demo, load_options=load_options(args), system=args.system, options=options)
    app.run(inline=args.inline)
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
