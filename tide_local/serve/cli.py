"""`tide serve`: options, checks, the model, then the HTTP server until Ctrl+C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tide_local.errors import TideError, UsageError

DEFAULT_MAX_TOKENS = 512
DEFAULT_PORT = 8080
DEFAULT_MAX_QUEUE = 16
MAX_QUEUE = 1 << 16
DEFAULT_MAX_BATCH = 4
MAX_BATCH = 256
API_KEY_ENV = "TIDE_API_KEY"

DESCRIPTION = """\
Serve a LLaDA2 GGUF (written by `tide convert`) over HTTP with OpenAI's API, so that OpenAI
clients, editors and scripts use it unchanged: /v1/chat/completions (through the model's chat
template), /v1/completions, /v1/models, plus /health and /metrics (Prometheus). Answers stream
as Server-Sent Events, one event per finished block of 32 tokens.

Up to --max-batch requests are decoded together, in arrival order: each step is one forward
over all of their active blocks (more rows per expert: the kernels and the GPU's expert slots
pay off), and each answer is the one it would get alone. Up to --max-queue more wait; past
that they are refused with 429. The decoding options below are the defaults of every request;
a request's own fields (max_tokens, temperature, top_p, seed, and tide's threshold, steps,
top_k) override them."""

EPILOG = f"""\
examples:
  tide serve -m llada2-mini-q4_k_m.gguf
  tide serve --demo --port 0                          # any free port; the URL is printed
  tide serve -m mini.gguf --gpu-memory 6GiB --api-key secret
  tide serve -m mini.gguf --host 0.0.0.0 --model-name llada2-mini --max-queue 64
  tide serve -m mini.gguf --max-batch 8               # 8 requests per forward

  curl http://127.0.0.1:{DEFAULT_PORT}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"messages": [{{"role": "user", "content": "What is 123 + 456?"}}]}}'

The key may come from ${API_KEY_ENV} instead of --api-key. Ctrl+C or SIGTERM stops the server:
the running requests end at their next step, waiting ones get 503.
"""


def build_parser(prog: str = "tide serve") -> argparse.ArgumentParser:
    from tide_local.generate_cli import add_decoding_arguments, add_model_arguments, add_offload_arguments

    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(raw=False, system=None)  # for generate_cli's option checks
    src = p.add_argument_group("model")
    add_model_arguments(src)
    src.add_argument("--model-name", metavar="NAME",
                     help="the model id that clients send and /v1/models lists (default: the file's name, no .gguf)")

    net = p.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every interface)")
    net.add_argument("--port", type=int, default=DEFAULT_PORT,
                     help=f"TCP port; 0 picks a free one (default: {DEFAULT_PORT})")
    net.add_argument("--api-key", metavar="KEY",
                     help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; neither: no key asked)")
    net.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE, metavar="N",
                     help=f"requests that may wait while others decode; more get 429 (default: {DEFAULT_MAX_QUEUE})")
    net.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, metavar="N",
                     help="requests decoded together, one forward per step for all (default: "
                          f"{DEFAULT_MAX_BATCH}; with a GPU, each takes a KV cache of --ctx in its memory plan)")

    dec = p.add_argument_group("decoding (every request's defaults)")
    add_decoding_arguments(dec, max_new_tokens=DEFAULT_MAX_TOKENS)

    off = p.add_argument_group("device and expert offload (as for `tide generate`)")
    add_offload_arguments(off)
    off.add_argument("--threads", type=int, default=None, metavar="N",
                     help="CPU threads (default: all cores; 1 for a small model such as the demo)")
    return p


def main(argv: list[str] | None = None, prog: str = "tide serve") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return _run(args, prog)
    except TideError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code


def _api_key(args) -> str | None:
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the option out")
    return args.api_key or os.environ.get(API_KEY_ENV) or None


def _check(args) -> tuple[dict, str, str | None]:
    """(decoding defaults, model path, API key), checked before anything is loaded."""
    from tide_local.generate_cli import _check_options, _model_path, check_range

    options = _check_options(args)
    check_range(args.port, "--port", 0, 65535)
    check_range(args.max_queue, "--max-queue", 1, MAX_QUEUE)
    check_range(args.max_batch, "--max-batch", 1, MAX_BATCH)
    if args.model_name is not None and not args.model_name.strip():
        raise UsageError("--model-name is empty")
    api_key = _api_key(args)
    path = _model_path(args)
    if not Path(path).is_file():
        raise UsageError(f"no such file: {path} (a LLaDA2 GGUF written by `tide convert`; see models.md)")
    return options, path, api_key


def _run(args, prog: str) -> int:
    options, path, api_key = _check(args)
    from .server import Server, bind, is_loopback, url

    sock = bind(args.host, args.port)  # before the load: a taken port fails at once
    try:
        engine = _load(args, path, prog)
    except BaseException:
        sock.close()
        raise
    from .app import STOP_SECONDS, create_app

    name = args.model_name or Path(path).stem
    app = create_app(engine, model_name=name, defaults=options, api_key=api_key, max_queue=args.max_queue)
    scheduler = app.state.scheduler
    if not is_loopback(args.host):
        print(f"{prog}: warning: listening on {args.host}: any machine that reaches it can use the model"
              + ("" if api_key else " (no --api-key)"), file=sys.stderr)
    address = f"{url(args.host, sock.getsockname()[1])}/v1"
    server = Server(app, on_started=lambda: print(f"serving {name} at {address}", file=sys.stderr, flush=True),
                    before_stop=scheduler.close)
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close()  # done by the app's shutdown, unless the server failed before it
        scheduler.join(STOP_SECONDS)
        if not scheduler.alive():  # never free the engine under a decode
            engine.close()
    return 0


def _load(args, path: str, prog: str):
    import tide_local
    from tide_local.generate_cli import load_options, unused_offload_warning

    try:
        engine = tide_local.load(path, **load_options(args), max_batch=args.max_batch)
    except ValueError as err:  # e.g. an unreadable --gpu-memory
        raise UsageError(str(err)) from None
    warning = unused_offload_warning(engine, args)
    if warning:
        print(f"{prog}: warning: {warning}", file=sys.stderr)
    return engine


if __name__ == "__main__":
    sys.exit(main())
