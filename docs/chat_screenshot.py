"""Write docs/chat.svg: `tide chat --demo` on the emulated device, a block mid-denoise.

    python docs/chat_screenshot.py [OUT.svg]

Two questions are answered in full, then the third answer is paused after the first
denoising step of its block (through a wrapper around the engine's stream), so the picture
shows the tokens that step committed at once and the masked positions still to resolve.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

from tide_local.diffusion import StepEvent
from tide_local.tui.app import ChatApp
from tide_local.tui.widgets import PromptInput

SIZE = (100, 34)
PAUSE_AT = (1, 0)  # (block of the answer, step in it)
ANSWERED = ("Reverse: apple pear fig plum", "What is 123 + 456?")
PAUSED = "Reverse: cat dog sun moon star tree bird fish"


async def _until(pilot, condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get there")
        await pilot.pause(0.02)


def _pause_stream(app: ChatApp, block: int, step: int):
    real = app.engine.stream
    reached, release = threading.Event(), threading.Event()

    def stream(ids, **kwargs):
        blocks: list[int] = []
        for event in real(ids, **kwargs):
            yield event
            if isinstance(event, StepEvent):
                if event.block_index not in blocks:
                    blocks.append(event.block_index)
                if len(blocks) == block and event.step == step:
                    reached.set()
                    release.wait(30)

    app.engine.stream = stream
    return reached, release


async def _scenario(app: ChatApp, out: Path) -> None:
    async with app.run_test(size=SIZE) as pilot:
        prompt = app.query_one(PromptInput)
        await _until(pilot, lambda: not prompt.disabled)
        for question in ANSWERED:
            prompt.text = question
            await pilot.press("enter")
            await _until(pilot, lambda: app.turn is None)
        reached, release = _pause_stream(app, *PAUSE_AT)
        prompt.text = PAUSED
        await pilot.press("enter")
        await _until(pilot, reached.is_set)
        await pilot.pause(0.3)
        app.save_screenshot(out.name, path=str(out.parent))
        release.set()
        await _until(pilot, lambda: app.turn is None)


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("chat.svg")).resolve()
    app = ChatApp(demo=True, load_options={"device": "emulated", "threads": 1}, options={"max_new_tokens": 96})
    asyncio.run(_scenario(app, out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
