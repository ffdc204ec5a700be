"""Routing traces `tide plan` records when it is given none: a few built-in prompts decoded
with the CPU engine (the routing does not depend on where the experts run)."""

from __future__ import annotations

import sys

import tide_local
from tide_local.diffusion import BlockEvent
from tide_local.experts.trace import RoutingTrace
from tide_local.tokenizer import ChatTemplateError

# Short prompts of the kinds the paper evaluates (code) and chat questions.
BUILTIN_PROMPTS = (
    "Write a Python function that returns the n-th Fibonacci number, with a docstring and two asserts.",
    "Explain in a few sentences why the sky is blue and why sunsets are red.",
    "List three prime numbers greater than 100 and show how to check that each is prime.",
)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def record_builtin_trace(model_path, *, prompts: int = 2, blocks: int = 2, threads: int | None = None,
                         log=_log) -> RoutingTrace:
    """Record the routing of a few built-in prompts (`blocks` blocks each) with the CPU engine."""
    eng = tide_local.load(model_path, device="cpu", threads=threads, n_ctx=1024)
    try:
        trace = eng.record_trace()
        block = eng.defaults["block_length"]
        for i, prompt in enumerate(BUILTIN_PROMPTS[:prompts]):
            try:
                ids = eng.chat_prompt([{"role": "user", "content": prompt}])
            except ChatTemplateError:
                ids = eng.tokenizer.encode(prompt)
            done, total = 0, -(-(len(ids) + blocks * block) // block) - len(ids) // block
            for event in eng.stream(ids, max_new_tokens=blocks * block, stop_ids=[]):
                if isinstance(event, BlockEvent) and event.start + block > len(ids):
                    done += 1
                    log(f"trace: prompt {i + 1}/{prompts}, block {done}/{total}")
        eng.stop_trace()
    finally:
        eng.close()
    return trace
