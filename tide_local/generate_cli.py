"""`tide generate`: one prompt in, the model's answer streamed out block by block."""

from __future__ import annotations

import argparse
import json
import os
import sys
from itertools import chain

from tide_local.errors import UsageError

DESCRIPTION = """\
Generate text with a LLaDA2 GGUF (written by `tide convert`). The prompt goes through the
model's chat template (as a user turn, after an optional --system turn) unless --raw is given.
The answer is decoded by block diffusion: 32 tokens at a time, several denoising steps per
block, and is printed as each block finishes. A one-line summary (tokens, tokens/s, steps per
block, tokens per step, seconds) follows on stderr."""

EPILOG = """\
examples:
  tide generate -m llada2-mini-q4_k_m.gguf -p "Why is the sky blue?"
  tide generate -m mini.gguf -p "The capital of France is" --raw -n 32
  echo "Write a haiku about rain." | tide generate -m mini.gguf
  tide generate -m mini.gguf -p "Tell me a story." --temperature 0.8 --top-p 0.9 --seed 1
  tide generate -m mini.gguf -p "2+2=" --json | jq .stats
  tide generate --demo -p "Reverse: apple pear fig"

--demo runs the demo model that ships with tide-local: a small LLaDA2 (8 M parameters,
32 experts per MoE layer) trained here on three tasks only, "Reverse: apple pear fig"
(which it does well), "What is A + B?" / "What is A - B?" (0-999) and "Sort: 5 3 9 1"
(right form, mostly wrong numbers). For a real model see models.md, then `tide convert`.
"""

NO_MODEL = (
    "no model given: pass -m MODEL.gguf (download a checkpoint as models.md explains and make the "
    "GGUF with `tide convert`), or try --demo for the small demo model"
)

def add_decoding_arguments(group, *, max_new_tokens: int) -> None:
    """The decoder's options (from DecodeOptions' table), shared by `tide generate` and `tide chat`."""
    from tide_local.diffusion.options import add_decoding_arguments as add

    add(group, max_new_tokens=max_new_tokens)


def add_offload_arguments(group) -> None:
    """Device and expert-offload options, shared by `tide generate` and `tide chat`."""
    group.add_argument("--device", default="auto", metavar="DEV",
                       help="auto (a GPU of the loaded libggml if any, else CPU only), cpu, emulated (a second CPU "
                       "backend standing in for a GPU: for tests and studies), or a device name (default: auto)")
    group.add_argument("--gpu-memory", metavar="SIZE", default=None,
                       help="device budget, e.g. 6GiB or 6000MiB (default: free device memory minus a reserve)")
    from tide_local.experts.policies import POLICIES

    group.add_argument("--policy", default="tide", choices=POLICIES,
                       help="tide: refresh the resident experts every TAU steps from the routing (default); "
                       "prefetch: tide choosing from the layer's previous pass; adaptive: refresh when the misses' CPU "
                       "work since the last refresh pays for the uploads; swap: "
                       "every step; static: never; lru: upload each miss that fits, the rest on the CPU; ondemand: "
                       "upload every miss, nothing on the CPU (Mixtral-Offload); cpu: no experts on the device; "
                       "resident: all experts on the device")
    group.add_argument("--tau", default="auto", metavar="TAU",
                       help="tide's refresh interval in denoising steps (default: auto)")
    group.add_argument("--ctx", type=int, default=None, metavar="N",
                       help="context to plan device memory for (default: 4096 or the model's, if smaller)")


def offload_options_given(args) -> bool:
    """Whether the command line asked for something only a device run does."""
    return args.gpu_memory is not None or args.policy != "tide" or args.tau != "auto"


def unused_offload_warning(eng, args) -> str | None:
    """The warning for offload options that a CPU-only engine ignores (None: nothing to say)."""
    if eng.plan is not None or not offload_options_given(args):
        return None
    why = "with --device cpu" if args.device == "cpu" else "no GPU in this libggml (`tide devices` says how to get one)"
    return f"{why}: --gpu-memory, --policy and --tau do nothing; everything runs on the CPU"


def load_options(args, **extra) -> dict:
    """`tide_local.load` keywords from parsed offload and thread options."""
    return {"device": args.device, "gpu_memory": args.gpu_memory, "policy": args.policy,
            "tau": args.tau if args.tau == "auto" else int(args.tau), "threads": args.threads, "n_ctx": args.ctx,
            **extra}


def add_model_arguments(group) -> None:
    """-m/--model and --demo, for `tide generate` and `tide chat`."""
    from tide_local.demo import DESCRIPTION as DEMO

    group.add_argument("-m", "--model", metavar="MODEL.gguf", help="a LLaDA2 GGUF written by `tide convert`")
    group.add_argument("--demo", action="store_true", help=f"use the demo model that ships with tide-local ({DEMO})")


def build_parser(prog: str = "tide generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_argument_group("model and prompt")
    add_model_arguments(src)
    src.add_argument("-p", "--prompt", metavar="TEXT",
                     help="the prompt; '-' or leaving it out reads it from stdin")
    src.add_argument("--raw", action="store_true",
                     help="use the prompt text as is (no chat template); generation then stops only at end-of-text")
    src.add_argument("--system", metavar="TEXT", help="a system message placed before the prompt (chat template only)")

    dec = p.add_argument_group("decoding")
    add_decoding_arguments(dec, max_new_tokens=256)

    run = p.add_argument_group("output and execution")
    run.add_argument("--json", action="store_true",
                     help="print one JSON object {tokens, text, stats} at the end instead of streaming text")
    run.add_argument("--stats", action="store_true",
                     help="after the summary, print one more line of statistics (blocks, steps per block, "
                     "forwards, prefill time, why generation stopped)")
    run.add_argument("--threads", type=int, default=None, metavar="N",
                     help="CPU threads (default: all cores; 1 for a small model such as the demo)")
    run.add_argument("--no-cache", action="store_true",
                     help="recompute the whole context at every step instead of using the block KV cache "
                     "(slow; same tokens: for checking)")
    off = p.add_argument_group(
        "device and expert offload",
        "Attention, routers, shared experts and the KV cache go to the device; what the budget leaves becomes "
        "expert slots per MoE layer, and tokens routed to other experts run on the CPU. Every policy gives "
        "the same tokens; they differ in speed.")
    add_offload_arguments(off)
    off.add_argument("--static-from", metavar="TRACE", default=None,
                     help="with --policy static: keep each layer's most used experts of this routing trace")
    off.add_argument("--trace", metavar="FILE", default=None,
                     help="record the routing (per block, step and MoE layer, every token's experts) to FILE "
                     "as JSON, for `tide plan` and the static policy")
    return p


def decoding_options(args) -> dict:
    """The decoder options given on the command line (None: not given), checked before any
    model is loaded; a bad one is a UsageError naming its flag."""
    from tide_local.diffusion import DecodeOptions, OptionValueError, option_specs
    from tide_local.diffusion.options import flag_of

    options = {name: getattr(args, name) for name, spec in option_specs().items() if spec.flag is not None}
    try:
        DecodeOptions.build(options)
    except OptionValueError as err:
        # the rule as a user of the flag reads it: "or None" is Python's way to leave an option out
        rule = option_specs()[err.name].rule.removesuffix(" or None")
        raise UsageError(f"{flag_of(err.name)} {rule}, got {options.get(err.name)}") from None
    return options


# Bounds of the numeric options every tool shares (the model's own context bounds --ctx further).
MAX_CTX = 1 << 24
MAX_TAU = 1 << 20
MAX_REPEAT = 1000


def max_threads() -> int:
    """The most threads an option may ask for: 4 per core this process may use."""
    from tide_local.ggml.backend import usable_cores

    return 4 * usable_cores()


def check_threads(threads: int | None, flag: str = "--threads") -> None:
    if threads is not None and not 1 <= threads <= max_threads():
        raise UsageError(f"{flag} must be between 1 and {max_threads()} (4 per core), got {threads}")


def check_range(value: int | None, flag: str, low: int, high: int) -> None:
    """A UsageError unless `value` (None: not given) is in [low, high]."""
    if value is not None and not low <= value <= high:
        raise UsageError(f"{flag} must be between {low} and {high}, got {value}")


def _check_options(args) -> dict:
    """The decoder options given on the command line and the other checks made before loading."""
    options = decoding_options(args)
    check_threads(args.threads)
    if args.raw and args.system is not None:
        raise UsageError("--system needs the chat template; leave out --raw (or put the system text in the prompt)")
    if args.demo and args.model:
        raise UsageError("give either -m MODEL.gguf or --demo, not both")
    if args.tau != "auto" and (not (args.tau.isascii() and args.tau.isdigit()) or not 1 <= int(args.tau) <= MAX_TAU):
        raise UsageError(f"--tau must be an integer between 1 and {MAX_TAU} or auto, got {args.tau}")
    check_range(args.ctx, "--ctx", 32, MAX_CTX)
    trace = getattr(args, "trace", None)
    if trace:  # written at the end: refuse an unusable path before any work
        from tide_local.errors import OutputPathError

        folder = os.path.dirname(trace) or "."
        if os.path.isdir(trace):
            raise OutputPathError(f"--trace {trace}: is a directory; give a file name")
        if os.path.exists(trace):
            if not os.access(trace, os.W_OK):
                raise OutputPathError(f"--trace {trace}: not writable")
        elif not os.path.isdir(folder) or not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"--trace {trace}: the folder {folder} does not exist or is not writable")
    if getattr(args, "prompt", None) is not None:
        _check_text(args.prompt, "the prompt (-p)")
    if args.system is not None:
        _check_text(args.system, "--system")
    return options


def _model_path(args) -> str:
    if args.demo:
        from tide_local.demo import demo_model_path

        return str(demo_model_path())
    if not args.model:
        raise UsageError(NO_MODEL)
    return args.model


def _check_text(text: str, where: str) -> str:
    """`text` if it is valid UTF-8 (Python keeps the undecodable bytes of a command line or
    stdin as lone surrogates), else a UsageError naming where it came from."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = text[err.start]
        what = (f"the byte 0x{ord(char) - 0xDC00:02x}" if 0xDC80 <= ord(char) <= 0xDCFF
                else f"the lone surrogate U+{ord(char):04X}")
        raise UsageError(f"{where} is not valid UTF-8 text: {what} at character {err.start}") from None
    return text


def _read_prompt(args) -> str:
    """The prompt of -p (checked with the options) or stdin, as UTF-8 text."""
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    else:
        if sys.stdin is None:
            raise UsageError("no prompt: give -p TEXT or pipe the prompt on stdin")
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D) ...", file=sys.stderr, flush=True)
        try:
            prompt = _check_text(sys.stdin.read(), "the prompt on stdin")
        except UnicodeDecodeError as err:
            raise UsageError(f"the prompt on stdin is not valid {err.encoding} text: the byte "
                             f"0x{err.object[err.start]:02x} at byte {err.start}") from None
        if prompt.endswith("\n"):  # as shells do with $(...)
            prompt = prompt[:-1]
    if not prompt.strip():
        raise UsageError("the prompt is empty: give -p TEXT or pipe the prompt on stdin")
    return prompt


def _prompt_ids(eng, args, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt token ids, stop ids)."""
    if args.raw:
        return list(eng.tokenizer.encode(prompt)), [eng.eos_id]
    from tide_local.tokenizer import ChatTemplateError

    messages = ([{"role": "system", "content": args.system}] if args.system is not None else [])
    messages.append({"role": "user", "content": prompt})
    try:
        return list(eng.chat_prompt(messages)), list(eng.chat_stop_ids())
    except ChatTemplateError as err:
        raise ChatTemplateError(f"{err} (use --raw)") from None


class TextDeltas:
    """An answer's text as its blocks finish, handed out as the new part each time: decodes all
    the answer's ids so far and returns what was not handed out yet. Trailing U+FFFD (bytes of
    a character whose remaining bytes are in later tokens) are held back until the character is
    complete. `tide generate` prints these parts; `tide serve` streams them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # handed out so far

    def block(self, answer) -> str:
        """The new text once a block's answer tokens (BlockEvent.answer) are added."""
        self.ids.extend(int(t) for t in answer)
        return self.advance(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def advance(self, text: str) -> str:
        """What of `text` (the answer so far, or the final one) was not handed out yet."""
        if text.startswith(self.text):
            new = text[len(self.text):]
        else:  # a detokenizer that rewrote earlier text: hand out what follows the common part
            common = os.path.commonprefix([text, self.text])
            new = text[len(common):] if len(text) > len(self.text) else ""
        self.text += new
        return new


class _Streamer:
    """Prints the generated text as blocks finish (complete characters only: TextDeltas)."""

    def __init__(self, tokenizer, out):
        self.deltas, self.out = TextDeltas(tokenizer), out

    @property
    def printed(self) -> str:
        return self.deltas.text

    def block(self, event) -> None:
        self._write(self.deltas.block(event.answer))

    def finish(self, text: str) -> None:
        self._write(self.deltas.advance(text))
        self.out.write("\n")
        self.out.flush()

    def _write(self, new: str) -> None:
        if new:
            self.out.write(new)
            self.out.flush()


def finish_text(stats) -> str:
    """Why generation stopped, in words."""
    return {"stop": "end of turn/text", "length": f"-n {stats.tokens} reached"}.get(stats.finish_reason,
                                                                                   stats.finish_reason)


def summary_line(stats) -> str:
    return (f"{stats.tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, {stats.mean_steps_per_block:.1f} "
            f"steps/block, {stats.tokens_per_step:.2f} tokens/step, {stats.seconds:.2f} s")


def stats_line(stats, threads: int) -> str:
    return (
        f"prompt {stats.prompt_tokens} tokens, {stats.blocks} blocks, {stats.steps} steps "
        f"(per block {list(stats.steps_per_block)}), {stats.forwards} forwards, "
        f"prefill {stats.prefill_seconds:.2f} s, wall {stats.wall_seconds:.2f} s, "
        f"kv cache {'on' if stats.kv_cache else 'off'}, threads {threads}; stopped: {finish_text(stats)}"
    )


def main(argv: list[str] | None = None, prog: str = "tide generate") -> int:
    args = build_parser(prog).parse_args(argv)
    args.prog = prog
    try:
        return _run(args)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.exit_code


def _run(args) -> int:
    options = _check_options(args)
    path = _model_path(args)

    import tide_local
    from tide_local.diffusion import BlockEvent
    from tide_local.results import GenerationResult

    popularity = None
    if args.static_from:
        from tide_local.experts.trace import RoutingTrace

        popularity = RoutingTrace.load(args.static_from).popularity()
    try:
        eng = tide_local.load(path, **load_options(args, popularity=popularity))
    except ValueError as err:  # e.g. an unreadable --gpu-memory
        raise UsageError(str(err)) from None
    warning = unused_offload_warning(eng, args)
    if warning:
        print(f"{args.prog}: warning: {warning}", file=sys.stderr)
    if eng.plan is not None and args.stats and not args.json:
        print(eng.plan.describe(), file=sys.stderr)
    if args.trace:
        eng.record_trace()
    try:
        prompt = _read_prompt(args)
        ids, stops = _prompt_ids(eng, args, prompt)
        events = eng.stream(ids, kv_cache=not args.no_cache, stop_ids=stops, **options)
        first = next(events)  # the request is checked before the first event: its errors are the user's
    except ValueError as err:  # the engine's check of the request (e.g. a prompt too long for the context)
        eng.close()
        raise UsageError(str(err)) from None
    except BaseException:
        eng.close()
        raise
    threads = eng.threads

    out = sys.stdout
    streamer = None if args.json else _Streamer(eng.tokenizer, out)
    result = None
    try:
        for event in chain([first], events):
            if isinstance(event, GenerationResult):
                result = event
            elif streamer is not None and isinstance(event, BlockEvent):
                streamer.block(event)
        if args.json:
            print(json.dumps({"tokens": result.tokens, "text": result.text, "stats": result.stats.to_dict()},
                             ensure_ascii=False))
            out.flush()
        else:
            streamer.finish(result.text)
    except KeyboardInterrupt:
        if streamer is not None and streamer.printed:
            out.write("\n")
            out.flush()
        raise
    except BrokenPipeError:  # e.g. `| head`: stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0
    finally:
        eng.close()

    if not args.json:
        print(summary_line(result.stats), file=sys.stderr)
    if args.stats:
        print(stats_line(result.stats, threads), file=sys.stderr)
        if result.stats.offload is not None:
            print(offload_table(result.stats), file=sys.stderr)
    if args.trace:
        eng.stop_trace().save(args.trace)
        if not args.json:
            print(f"routing trace written to {args.trace}", file=sys.stderr)
    return 0


def offload_table(stats) -> str:
    """Per MoE layer hits, misses and uploads, then totals and where the time went."""
    o = stats.offload
    lines = [f"expert offload: device {stats.device}, policy {o.policy}" + (f", tau {o.tau}" if o.tau else "")
             + (f" ({o.tau_source})" if o.tau_source and o.tau_source != "given" else ""),
             f"  {'layer':>5} {'hits':>8} {'misses':>8} {'hit rate':>8} {'uploads':>8} {'MB up':>8}"]
    rows = sorted(o.per_layer.items()) + [("all", o)]
    for layer, s in rows:
        lines.append(f"  {layer:>5} {s.hits:>8} {s.misses:>8} {s.hit_rate:>8.2f} {s.uploads:>8} "
                     f"{s.upload_bytes / 1e6:>8.1f}")
    lines.append(
        f"  time: device compute {stats.device_compute_seconds:.2f} s, CPU experts {o.cpu_expert_seconds:.2f} s "
        f"(waited {o.wait_seconds:.2f} s), uploads {o.upload_seconds:.2f} s, host/Python {stats.host_seconds:.2f} s")
    return "\n".join(lines)
