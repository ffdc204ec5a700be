"""The demo model: a small LLaDA2 trained for this project, shipped inside the package.

`--demo` (generate, chat, plan, profile, bench) runs it with no download. It has the
LLaDA2.0 architecture at a small scale (5 layers, 4 of them MoE with 32 experts and top-4
group-limited sigmoid routing, a shared expert, 8.4 M parameters, q8_0) and was trained from
scratch with LLaDA2's block-diffusion objective on the tasks of :mod:`tide_local.demo_tasks`:

    What is 123 + 456?        Sort: 5 3 9 1        Reverse: apple pear fig

It knows nothing else, and 56 minutes of training on 2 CPU cores taught it only part of
that: it reverses words (100% of held-out prompts) and sorts some lists (23%); its sums and
differences follow the trained column procedure, but with wrong digit sums. How it was trained
(the command, the commit) is in ``tide_local/data/DEMO.md``; `benchmarks/bench_demo.py` measures it.
"""

from __future__ import annotations

from pathlib import Path

from tide_local.errors import TideError

DEMO_FILE = "demo-llada2-q8_0.gguf"
DEMO_PROMPTS = ("Reverse: apple pear fig", "What is 123 + 456?", "Sort: 5 3 9 1")
DESCRIPTION = ("a small model trained on three tasks: it reverses words; it sorts some lists; its "
               "sums have the right form but wrong numbers")


def demo_model_path() -> Path:
    """The packaged demo GGUF."""
    path = Path(__file__).parent / "data" / DEMO_FILE
    if not path.is_file():
        raise TideError(f"the demo model is missing from this installation ({path}); reinstall tide-local")
    return path
